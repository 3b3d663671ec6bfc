// Core selection: radix select over the bit patterns of |base - tuned| (computed in fp32).
//
// key(i) = bits(fp32(base[i]) - fp32(tuned[i])) & 0x7fffffff. Non-negative floats order like their
// uint32 bits, so ranking |diff| is ranking keys; key 0 is a zero diff (never counted, never
// selected); key >= 0x7f800000 is Inf/NaN (it lands in histogram bins >= 0x7f80, which the caller
// checks).
//
// select_histogram(base, tuned, level, prefix):
//   level 0: int64[32768], bin = key >> 16, over every nonzero key;
//   level 1: int64[65536], bin = key & 0xffff, over nonzero keys with key >> 16 == prefix.
// select_mask(base, tuned, threshold, tie_budget) -> (int32 words, int64 n_eq):
//   bit i set iff key > threshold, or key == threshold and i is among the first tie_budget such
//   elements in flat order; n_eq = number of elements with key == threshold.
#include "common.h"

#include <bit>
#include <mutex>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cpift::CPIFT_CAP {
namespace {

constexpr int64_t kKeyBlock = 512;            // keys computed into a stack buffer at a time
constexpr int64_t kChunk = 1 << 16;           // elements per mask chunk (multiple of 32)
// Elements per thread task: below this a tensor runs on one thread. Large on purpose: every
// parallel region costs a thread wake-up, and on an oversubscribed machine a descheduled thread
// stalls the whole region; a model has hundreds of small tensors.
constexpr int64_t kParallelGrain = 1 << 22;
constexpr int64_t kFlush = int64_t(1) << 30;  // flush uint32 per-thread counts before they can wrap
constexpr int64_t kBins0 = 1 << 15;
constexpr int64_t kBins1 = 1 << 16;

// Writes keys of elements [0, n) into `out`; returns how many were zero.
inline int64_t keys_of(const float* a, const float* b, int64_t n, uint32_t* out) {
  int64_t zeros = 0;
#pragma omp simd reduction(+ : zeros)
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t k = std::bit_cast<uint32_t>(a[i] - b[i]) & 0x7fffffffu;
    out[i] = k;
    zeros += (k == 0);
  }
  return zeros;
}

inline int64_t keys_of(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n, uint32_t* out) {
  const uint16_t* ra = reinterpret_cast<const uint16_t*>(a);
  const uint16_t* rb = reinterpret_cast<const uint16_t*>(b);
  int64_t zeros = 0;
#pragma omp simd reduction(+ : zeros)
  for (int64_t i = 0; i < n; ++i) {
    const float fa = std::bit_cast<float>(uint32_t(ra[i]) << 16);
    const float fb = std::bit_cast<float>(uint32_t(rb[i]) << 16);
    const uint32_t k = std::bit_cast<uint32_t>(fa - fb) & 0x7fffffffu;
    out[i] = k;
    zeros += (k == 0);
  }
  return zeros;
}

inline int64_t keys_of(const c10::Half* a, const c10::Half* b, int64_t n, uint32_t* out) {
  const _Float16* ha = reinterpret_cast<const _Float16*>(a);
  const _Float16* hb = reinterpret_cast<const _Float16*>(b);
  int64_t zeros = 0;
#pragma omp simd reduction(+ : zeros)
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t k = std::bit_cast<uint32_t>(static_cast<float>(ha[i]) - static_cast<float>(hb[i])) & 0x7fffffffu;
    out[i] = k;
    zeros += (k == 0);
  }
  return zeros;
}

// Bit j of gt / eq: keys[j] > thr / keys[j] == thr, for j < lim <= 32.
inline void word_bits(const uint32_t* keys, int64_t lim, uint32_t thr, uint32_t& gt, uint32_t& eq) {
#if defined(__AVX512F__)
  if (lim == 32) {
    const __m512i t = _mm512_set1_epi32(static_cast<int>(thr));
    const __m512i k0 = _mm512_loadu_si512(keys), k1 = _mm512_loadu_si512(keys + 16);
    gt = uint32_t(_mm512_cmpgt_epu32_mask(k0, t)) | (uint32_t(_mm512_cmpgt_epu32_mask(k1, t)) << 16);
    eq = uint32_t(_mm512_cmpeq_epu32_mask(k0, t)) | (uint32_t(_mm512_cmpeq_epu32_mask(k1, t)) << 16);
    return;
  }
#endif
  gt = 0;
  eq = 0;
  for (int64_t bit = 0; bit < lim; ++bit) {
    gt |= uint32_t(keys[bit] > thr) << bit;
    eq |= uint32_t(keys[bit] == thr) << bit;
  }
}

void check_pair(const at::Tensor& base, const at::Tensor& tuned, const char* op) {
  TORCH_CHECK(base.device().is_cpu() && tuned.device().is_cpu(), op, ": base and tuned must be CPU tensors");
  TORCH_CHECK(base.scalar_type() == tuned.scalar_type(), op, ": base is ", base.scalar_type(), " but tuned is ",
              tuned.scalar_type());
  TORCH_CHECK(base.numel() == tuned.numel(), op, ": base has ", base.numel(), " elements, tuned ", tuned.numel());
  const auto t = base.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": dtype must be float32, float16 or bfloat16, got ", t);
}

template <typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(static_cast<const float*>(nullptr)); break;
    case at::kHalf: f(static_cast<const c10::Half*>(nullptr)); break;
    default: f(static_cast<const c10::BFloat16*>(nullptr)); break;
  }
}

}  // namespace

at::Tensor select_histogram(const at::Tensor& base, const at::Tensor& tuned, int64_t level, int64_t prefix) {
  check_pair(base, tuned, "select_histogram");
  TORCH_CHECK(level == 0 || level == 1, "select_histogram: level must be 0 or 1, got ", level);
  TORCH_CHECK(prefix >= 0 && prefix < kBins0, "select_histogram: prefix must be in [0, 32768), got ", prefix);
  const int64_t nbins = level == 0 ? kBins0 : kBins1;
  // zeroed here, not with at::zeros: a 64k-element fill would open a parallel region per tensor
  at::Tensor hist = at::empty({nbins}, base.options().dtype(at::kLong));
  int64_t* out = hist.data_ptr<int64_t>();
  std::fill(out, out + nbins, int64_t(0));
  const int64_t n = base.numel();
  if (n == 0) return hist;
  const at::Tensor a = base.contiguous(), b = tuned.contiguous();
  std::mutex merge;
  const uint32_t pfx = static_cast<uint32_t>(prefix);
  // Counts go to kCopies interleaved sub-histograms: runs of equal keys (ties are common in bf16
  // diffs) would otherwise serialise on one counter's store-to-load latency.
  constexpr int kCopies = 4;
  const int64_t copies = kCopies;
  dispatch_dtype(a.scalar_type(), [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const T* pa = a.data_ptr<T>();
    const T* pb = b.data_ptr<T>();
    at::parallel_for(0, n, kParallelGrain, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> local(nbins * copies, 0);
      int64_t zeros = 0;
      uint32_t keys[kKeyBlock];
      auto flush = [&]() {
        std::lock_guard<std::mutex> lock(merge);
        for (int64_t c = 0; c < copies; ++c)
          for (int64_t i = 0; i < nbins; ++i) out[i] += local[c * nbins + i];
        // zero keys fell into bin 0 (level 0, or level 1 under prefix 0): take them out again
        if (level == 0 || pfx == 0) out[0] -= zeros;
        std::fill(local.begin(), local.end(), 0u);
        zeros = 0;
      };
      int64_t since_flush = 0;
      uint32_t* h = local.data();
      for (int64_t s = begin; s < end; s += kKeyBlock) {
        const int64_t m = std::min(kKeyBlock, end - s);
        const int64_t z = keys_of(pa + s, pb + s, m, keys);
        if (level == 0) {
          zeros += z;
          int64_t i = 0;
          for (; i + kCopies <= m; i += kCopies) {
            ++h[keys[i] >> 16];
            ++h[kBins0 + (keys[i + 1] >> 16)];
            ++h[2 * kBins0 + (keys[i + 2] >> 16)];
            ++h[3 * kBins0 + (keys[i + 3] >> 16)];
          }
          for (; i < m; ++i) ++h[keys[i] >> 16];
        } else {
          if (pfx == 0) zeros += z;
          // branch-free compaction of the keys inside the bucket, then count only those
          int64_t c = 0;
          for (int64_t i = 0; i < m; ++i) {
            keys[c] = keys[i];
            c += (keys[i] >> 16) == pfx;
          }
          int64_t i = 0;
          for (; i + kCopies <= c; i += kCopies) {
            ++h[keys[i] & 0xffffu];
            ++h[kBins1 + (keys[i + 1] & 0xffffu)];
            ++h[2 * kBins1 + (keys[i + 2] & 0xffffu)];
            ++h[3 * kBins1 + (keys[i + 3] & 0xffffu)];
          }
          for (; i < c; ++i) ++h[keys[i] & 0xffffu];
        }
        since_flush += m;
        if (since_flush >= kFlush) {
          flush();
          since_flush = 0;
        }
      }
      flush();
    });
  });
  return hist;
}

std::tuple<at::Tensor, at::Tensor> select_mask(const at::Tensor& base, const at::Tensor& tuned, int64_t threshold,
                                               int64_t tie_budget) {
  check_pair(base, tuned, "select_mask");
  TORCH_CHECK(threshold >= 1 && threshold <= 0x7fffffffLL, "select_mask: threshold must be a positive key, got ",
              threshold);
  TORCH_CHECK(tie_budget >= 0, "select_mask: tie_budget must be >= 0, got ", tie_budget);
  const int64_t n = base.numel();
  at::Tensor words = at::empty({(n + 31) / 32}, base.options().dtype(at::kInt));
  at::Tensor n_eq = at::zeros({}, base.options().dtype(at::kLong));
  if (n == 0) return {words, n_eq};
  const at::Tensor a = base.contiguous(), b = tuned.contiguous();
  const uint32_t thr = static_cast<uint32_t>(threshold);
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> eq_per_chunk(nchunks, 0);
  int32_t* w = words.data_ptr<int32_t>();

  dispatch_dtype(a.scalar_type(), [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const T* pa = a.data_ptr<T>();
    const T* pb = b.data_ptr<T>();
    // keep_ties(c, keep): within chunk c, ties of rank >= keep (0-based, flat order) lose their bit.
    auto process = [&](int64_t c, bool first_pass, int64_t keep) {
      const int64_t s0 = c * kChunk, s1 = std::min(n, s0 + kChunk);
      uint32_t keys[kKeyBlock];
      int64_t eq_seen = 0;
      for (int64_t s = s0; s < s1; s += kKeyBlock) {
        const int64_t m = std::min(kKeyBlock, s1 - s);
        keys_of(pa + s, pb + s, m, keys);
        for (int64_t j = 0; j < m; j += 32) {
          const int64_t lim = std::min<int64_t>(32, m - j);
          uint32_t gt, eq;
          word_bits(keys + j, lim, thr, gt, eq);
          const int64_t word = (s + j) >> 5;
          if (first_pass) {
            w[word] = static_cast<int32_t>(gt | eq);
            eq_seen += std::popcount(eq);
          } else if (eq) {
            uint32_t drop = 0;
            for (uint32_t e = eq; e; e &= e - 1) {
              if (eq_seen >= keep) drop |= e & (~e + 1);
              ++eq_seen;
            }
            w[word] = static_cast<int32_t>(as_u32(w[word]) & ~drop);
          }
        }
      }
      if (first_pass) eq_per_chunk[c] = eq_seen;
    };
    at::parallel_for(0, nchunks, kParallelGrain / kChunk, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) process(c, true, 0);
    });
    // Hand out the tie budget in flat order; chunks past it drop (some of) their ties.
    std::vector<int64_t> keep(nchunks, -1);  // -1: leave the chunk as written
    int64_t left = tie_budget, total = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      total += eq_per_chunk[c];
      if (eq_per_chunk[c] > left) keep[c] = left;
      left -= std::min(left, eq_per_chunk[c]);
    }
    n_eq.fill_(total);
    if (total > tie_budget) {
      at::parallel_for(0, nchunks, kParallelGrain / kChunk, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c)
          if (keep[c] >= 0) process(c, false, keep[c]);
      });
    }
  });
  return {words, n_eq};
}

}  // namespace cpift::CPIFT_CAP

// Schemas live in cpift_fast/ops/ (Python). The DEFAULT compile registers the CPU kernels, each calling
// the copy of the capability in use (dispatch.h).
#ifdef CPIFT_REGISTERS
CPIFT_DECLARE_CAPS(select_histogram)
CPIFT_DECLARE_CAPS(select_mask)
TORCH_LIBRARY_IMPL(cpift, CPU, m) {
  m.impl("select_histogram", CPIFT_KERNEL(select_histogram));
  m.impl("select_mask", CPIFT_KERNEL(select_mask));
}
#endif
