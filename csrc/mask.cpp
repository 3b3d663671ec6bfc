// Bit-packed mask primitives: pack, unpack, per-segment popcount, word-wise set algebra.
// Bit i of a segment is bit (i % 32) of word offset + i / 32 (little-endian within a word).
#include "common.h"

#include <cstring>

namespace cpift::CPIFT_CAP {

// Eight bool bytes (0/1, little-endian in x) -> eight bits: byte j's bit lands on bit 56 + j of the
// product and no two partial products overlap, so no carries disturb the top byte.
inline uint32_t pack8(uint64_t x) { return static_cast<uint32_t>((x * 0x0102040810204080ULL) >> 56); }

at::Tensor mask_pack(const at::Tensor& bits) {
  TORCH_CHECK(bits.dtype() == at::kBool, "mask_pack: bits must be bool, got ", bits.dtype());
  TORCH_CHECK(bits.device().is_cpu(), "mask_pack: bits must be a CPU tensor");
  const at::Tensor flat = bits.contiguous().view(-1);
  const int64_t n = flat.numel();
  const int64_t nwords = (n + 31) / 32;
  at::Tensor words = at::empty({nwords}, flat.options().dtype(at::kInt));
  const uint8_t* src = reinterpret_cast<const uint8_t*>(flat.data_ptr<bool>());
  int32_t* dst = words.data_ptr<int32_t>();
  const int64_t full = n / 32;
  at::parallel_for(0, full, kGrain / 32, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      uint64_t x[4];
      std::memcpy(x, src + w * 32, 32);
      dst[w] = static_cast<int32_t>(pack8(x[0]) | pack8(x[1]) << 8 | pack8(x[2]) << 16 | pack8(x[3]) << 24);
    }
  });
  if (full < nwords) {  // the last, partial word
    uint32_t acc = 0;
    for (int64_t b = 0; b < n - full * 32; ++b) acc |= static_cast<uint32_t>(src[full * 32 + b] != 0) << b;
    dst[full] = static_cast<int32_t>(acc);
  }
  return words;
}

at::Tensor mask_unpack(const at::Tensor& words, int64_t numel) {
  check_words(words, "mask_unpack: words");
  TORCH_CHECK(numel >= 0 && (numel + 31) / 32 <= words.numel(), "mask_unpack: numel ", numel,
              " needs ", (numel + 31) / 32, " words, got ", words.numel());
  at::Tensor bits = at::empty({numel}, words.options().dtype(at::kBool));
  const int32_t* src = words.data_ptr<int32_t>();
  bool* dst = bits.data_ptr<bool>();
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = (as_u32(src[i >> 5]) >> (i & 31)) & 1u;
  });
  return bits;
}

at::Tensor mask_popcount(const at::Tensor& words, const at::Tensor& offsets) {
  check_words(words, "mask_popcount: words");
  TORCH_CHECK(offsets.dtype() == at::kLong && offsets.dim() == 1 && offsets.numel() >= 1,
              "mask_popcount: offsets must be a 1-D int64 tensor of T+1 word offsets");
  const at::Tensor offs = offsets.contiguous();
  const int64_t nseg = offs.numel() - 1;
  const int64_t* o = offs.data_ptr<int64_t>();
  TORCH_CHECK(o[nseg] <= words.numel(), "mask_popcount: last offset ", o[nseg], " exceeds ",
              words.numel(), " words");
  at::Tensor counts = at::zeros({nseg}, offs.options());
  int64_t* c = counts.data_ptr<int64_t>();
  const int32_t* w = words.data_ptr<int32_t>();
  for (int64_t s = 0; s < nseg; ++s) {
    c[s] = at::parallel_reduce(
        o[s], o[s + 1], kGrain, int64_t(0),
        [&](int64_t begin, int64_t end, int64_t acc) {
          int64_t local = 0;
#pragma omp simd reduction(+ : local)
          for (int64_t i = begin; i < end; ++i) local += __builtin_popcount(as_u32(w[i]));
          return acc + local;
        },
        std::plus<int64_t>());
  }
  return counts;
}

// op: 0 = a & b, 1 = a | b, 2 = a & ~b, 3 = a ^ b
at::Tensor mask_binary(const at::Tensor& a, const at::Tensor& b, int64_t op) {
  check_words(a, "mask_binary: a");
  check_words(b, "mask_binary: b");
  TORCH_CHECK(a.numel() == b.numel(), "mask_binary: word counts differ (", a.numel(), " vs ",
              b.numel(), ")");
  TORCH_CHECK(op >= 0 && op <= 3, "mask_binary: op must be 0 (and), 1 (or), 2 (andnot), 3 (xor); got ", op);
  at::Tensor out = at::empty_like(a);
  const int32_t* pa = a.data_ptr<int32_t>();
  const int32_t* pb = b.data_ptr<int32_t>();
  int32_t* po = out.data_ptr<int32_t>();
  at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
    switch (op) {
      case 0: for (int64_t i = begin; i < end; ++i) po[i] = pa[i] & pb[i]; break;
      case 1: for (int64_t i = begin; i < end; ++i) po[i] = pa[i] | pb[i]; break;
      case 2: for (int64_t i = begin; i < end; ++i) po[i] = pa[i] & ~pb[i]; break;
      default: for (int64_t i = begin; i < end; ++i) po[i] = pa[i] ^ pb[i]; break;
    }
  });
  return out;
}

}  // namespace cpift::CPIFT_CAP

// Schemas live in cpift_fast/ops/ (Python). The DEFAULT compile registers the CPU kernels, each calling
// the copy of the capability in use (dispatch.h).
#ifdef CPIFT_REGISTERS
CPIFT_DECLARE_CAPS(mask_pack)
CPIFT_DECLARE_CAPS(mask_unpack)
CPIFT_DECLARE_CAPS(mask_popcount)
CPIFT_DECLARE_CAPS(mask_binary)
TORCH_LIBRARY_IMPL(cpift, CPU, m) {
  m.impl("mask_pack", CPIFT_KERNEL(mask_pack));
  m.impl("mask_unpack", CPIFT_KERNEL(mask_unpack));
  m.impl("mask_popcount", CPIFT_KERNEL(mask_popcount));
  m.impl("mask_binary", CPIFT_KERNEL(mask_binary));
}
#endif
