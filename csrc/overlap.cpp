// Pairwise overlap of T bit-packed masks in one pass: out[i][j] = popcount(m_i & m_j).
// Each word of each mask is read from memory once. With AVX-512 VPOPCNTDQ (the AVX512 capability's
// compile, on a CPU that has it: checked at run time) T <= 8: one 64-byte vector of every
// mask is loaded into registers and all T(T+1)/2 pairs are formed from registers (per-pair vector
// accumulators). T > 8: the words of a tile (kTile 64-bit words of every mask) are combined
// pairwise while they sit in L1. Unions follow from |a ∪ b| = |a| + |b| − |a ∩ b| (the diagonal
// holds |a|), so only AND popcounts are needed.
// GCC 12 flags the `undefined` registers inside its own AVX-512 intrinsic headers (false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "common.h"

#include <cstring>
#include <mutex>
#include <vector>
#if defined(CPU_CAPABILITY_AVX512)
#define CPIFT_OVERLAP_VPOPCNT __attribute__((target("avx512vpopcntdq")))
#endif

namespace cpift::CPIFT_CAP {
namespace {

constexpr int64_t kTile = 64;  // 64-bit words per mask per tile

// acc[i * T + j] (j >= i) += popcount(p[i][begin:end] & p[j][begin:end]), for 64-bit words.
// p[i] points at mask i's int32 words, read as 64-bit words (unaligned loads via memcpy / loadu).
inline uint64_t load64(const uint32_t* p) {
  uint64_t x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

#ifdef CPIFT_OVERLAP_VPOPCNT
// Register-blocked kernel for a fixed T: returns the first 64-bit word it did not process.
template <int T>
CPIFT_OVERLAP_VPOPCNT int64_t overlap_registers(const uint32_t* const* p, int64_t begin, int64_t end, int64_t* acc) {
  constexpr int kPairs = T * (T + 1) / 2;
  __m512i s[kPairs];
#pragma GCC unroll 36
  for (int k = 0; k < kPairs; ++k) s[k] = _mm512_setzero_si512();
  int64_t w = begin;
  for (; w + 8 <= end; w += 8) {
    __m512i v[T];
#pragma GCC unroll 8
    for (int i = 0; i < T; ++i) v[i] = _mm512_loadu_si512(p[i] + 2 * w);
    int k = 0;
#pragma GCC unroll 8
    for (int i = 0; i < T; ++i) {
      s[k] = _mm512_add_epi64(s[k], _mm512_popcnt_epi64(v[i]));
      ++k;
#pragma GCC unroll 8
      for (int j = i + 1; j < T; ++j) {
        s[k] = _mm512_add_epi64(s[k], _mm512_popcnt_epi64(_mm512_and_si512(v[i], v[j])));
        ++k;
      }
    }
  }
  int k = 0;
  for (int i = 0; i < T; ++i)
    for (int j = i; j < T; ++j) acc[i * T + j] += _mm512_reduce_add_epi64(s[k++]);
  return w;
}

// The whole tiles of [begin, end) with vector popcounts; returns the first 64-bit word left.
CPIFT_OVERLAP_VPOPCNT int64_t overlap_vpopcnt(const std::vector<const uint32_t*>& p, int64_t begin, int64_t end,
                                              int64_t* acc) {
  const int64_t T = static_cast<int64_t>(p.size());
  switch (T) {
    case 1: begin = overlap_registers<1>(p.data(), begin, end, acc); break;
    case 2: begin = overlap_registers<2>(p.data(), begin, end, acc); break;
    case 3: begin = overlap_registers<3>(p.data(), begin, end, acc); break;
    case 4: begin = overlap_registers<4>(p.data(), begin, end, acc); break;
    case 5: begin = overlap_registers<5>(p.data(), begin, end, acc); break;
    case 6: begin = overlap_registers<6>(p.data(), begin, end, acc); break;
    case 7: begin = overlap_registers<7>(p.data(), begin, end, acc); break;
    case 8: begin = overlap_registers<8>(p.data(), begin, end, acc); break;
    default: break;
  }
  // per-pair vector accumulators (8 x u64 lanes), kept in plain memory: unaligned load/store
  std::vector<uint64_t> vacc(T * T * 8, 0);
  int64_t w = begin;
  for (; w + kTile <= end; w += kTile) {
    for (int64_t i = 0; i < T; ++i) {
      const uint32_t* a = p[i] + 2 * w;
      for (int64_t j = i; j < T; ++j) {
        const uint32_t* b = p[j] + 2 * w;
        __m512i s = _mm512_loadu_si512(&vacc[(i * T + j) * 8]);
        for (int64_t k = 0; k < kTile; k += 8) {
          const __m512i x = _mm512_and_si512(_mm512_loadu_si512(a + 2 * k), _mm512_loadu_si512(b + 2 * k));
          s = _mm512_add_epi64(s, _mm512_popcnt_epi64(x));
        }
        _mm512_storeu_si512(&vacc[(i * T + j) * 8], s);
      }
    }
  }
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = i; j < T; ++j) acc[i * T + j] += _mm512_reduce_add_epi64(_mm512_loadu_si512(&vacc[(i * T + j) * 8]));
  return w;
}
#endif

void overlap_range(const std::vector<const uint32_t*>& p, int64_t begin, int64_t end, int64_t* acc) {
  const int64_t T = static_cast<int64_t>(p.size());
#ifdef CPIFT_OVERLAP_VPOPCNT
  static const bool has_vpopcnt = __builtin_cpu_supports("avx512vpopcntdq");
  if (has_vpopcnt) begin = overlap_vpopcnt(p, begin, end, acc);
#endif
  for (int64_t w0 = begin; w0 < end; w0 += kTile) {
    const int64_t w1 = std::min(end, w0 + kTile);
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = i; j < T; ++j) {
        int64_t s = 0;
        for (int64_t k = w0; k < w1; ++k) s += __builtin_popcountll(load64(p[i] + 2 * k) & load64(p[j] + 2 * k));
        acc[i * T + j] += s;
      }
  }
}

}  // namespace

at::Tensor overlap_counts(const at::TensorList masks) {
  const int64_t T = static_cast<int64_t>(masks.size());
  at::Tensor out = at::zeros({T, T}, at::TensorOptions().dtype(at::kLong));
  if (T == 0) return out;
  const int64_t nwords = masks[0].numel();
  std::vector<const uint32_t*> p32(T);
  std::vector<at::Tensor> words(T);
  for (int64_t i = 0; i < T; ++i) {
    words[i] = masks[i].contiguous().view(-1);
    check_words(words[i], "overlap_counts: masks[i]");
    TORCH_CHECK(words[i].numel() == nwords, "overlap_counts: mask ", i, " has ", words[i].numel(),
                " words, mask 0 has ", nwords, " (masks must share one layout)");
    p32[i] = reinterpret_cast<const uint32_t*>(words[i].data_ptr<int32_t>());
  }
  const int64_t n64 = nwords / 2;
  std::vector<int64_t> total(T * T, 0);
  std::mutex lock;
  at::parallel_for(0, (n64 + kTile - 1) / kTile, 1024,  // grain: 512 KiB of every mask
                   [&](int64_t tb, int64_t te) {
    std::vector<int64_t> acc(T * T, 0);
    overlap_range(p32, tb * kTile, std::min(n64, te * kTile), acc.data());
    std::lock_guard<std::mutex> guard(lock);
    for (int64_t k = 0; k < T * T; ++k) total[k] += acc[k];
  });
  if (nwords % 2) {  // odd word count: the last 32-bit word
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = i; j < T; ++j) total[i * T + j] += __builtin_popcount(p32[i][nwords - 1] & p32[j][nwords - 1]);
  }
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = i; j < T; ++j) o[i * T + j] = o[j * T + i] = total[i * T + j];
  return out;
}

}  // namespace cpift::CPIFT_CAP

// Schemas live in cpift_fast/ops/ (Python). The DEFAULT compile registers the CPU kernels, each calling
// the copy of the capability in use (dispatch.h).
#ifdef CPIFT_REGISTERS
CPIFT_DECLARE_CAPS(overlap_counts)
TORCH_LIBRARY_IMPL(cpift, CPU, m) {
  m.impl("overlap_counts", CPIFT_KERNEL(overlap_counts));
}
#endif
