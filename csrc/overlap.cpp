// Pairwise overlap of T bit-packed masks in one pass: out[i][j] = popcount(m_i & m_j).
// Each word of each mask is read from memory once: the words of a tile (kTile 64-bit words of
// every mask, 4 KiB for T = 8) are combined pairwise while they sit in L1. Unions follow from
// |a ∪ b| = |a| + |b| − |a ∩ b| (the diagonal holds |a|), so only AND popcounts are needed.
// GCC 12 flags the `undefined` registers inside its own AVX-512 intrinsic headers (false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "common.h"

#include <cstring>
#include <mutex>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#include <immintrin.h>
#define CPIFT_OVERLAP_AVX512 1
#endif

namespace cpift {
namespace {

constexpr int64_t kTile = 64;  // 64-bit words per mask per tile

// acc[i * T + j] (j >= i) += popcount(p[i][begin:end] & p[j][begin:end]), for 64-bit words.
// p[i] points at mask i's int32 words, read as 64-bit words (unaligned loads via memcpy / loadu).
inline uint64_t load64(const uint32_t* p) {
  uint64_t x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

void overlap_range(const std::vector<const uint32_t*>& p, int64_t begin, int64_t end, int64_t* acc) {
  const int64_t T = static_cast<int64_t>(p.size());
#ifdef CPIFT_OVERLAP_AVX512
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
  begin = w;
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
  at::parallel_for(0, (n64 + kTile - 1) / kTile, std::max<int64_t>(1, kGrain / kTile / 2),
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

}  // namespace cpift

TORCH_LIBRARY_FRAGMENT(cpift, m) {
  m.def("overlap_counts(Tensor[] masks) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpift, CPU, m) {
  m.impl("overlap_counts", &cpift::overlap_counts);
}
