// Core selection: radix select over the bit patterns of |base - tuned| (computed in fp32).
//
// key(i) = bits(fp32(base[i]) - fp32(tuned[i])) & 0x7fffffff. Non-negative floats order like their
// uint32 bits, so ranking |diff| is ranking keys; key 0 is a zero diff (never counted, never
// selected); key >= 0x7f800000 is Inf/NaN (it lands in histogram bins >= 0x7f80, which the caller
// checks).
//
// select_histogram(base[], tuned[], level, prefix) -> (int64 hist, int64 top[T]), over all pairs:
//   level 0: hist[32768], bin = key >> 16, over every nonzero key;
//   level 1: hist[65536], bin = key & 0xffff, over nonzero keys with key >> 16 == prefix;
//   top[t]: the highest nonempty bin of pair t alone (-1: none).
// select_mask(base[], tuned[], threshold, tie_budget) -> (int32 words, int64 n_eq[T]):
//   words: each pair's ceil(n / 32) mask words, concatenated in list order; bit i of a pair set iff
//   key > threshold, or key == threshold and the element is among the first tie_budget such
//   elements in (pair, flat index) order; n_eq[t] = elements of pair t with key == threshold.
#include "common.h"

#include <bit>
#include <mutex>
#include <string>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cpift::CPIFT_CAP {
namespace {

constexpr int64_t kKeyBlock = 512;            // keys computed into a stack buffer at a time
constexpr int64_t kChunk = 1 << 16;           // elements per work chunk (multiple of 32)
// Elements per thread task of a pass: below this a call runs on one thread. Every parallel region
// costs a thread wake-up (on an oversubscribed machine a descheduled thread stalls the region), so
// the ops take lists of pairs and open one region per call, whatever the tensor sizes.
constexpr int64_t kListGrain = 1 << 18;
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

inline uint32_t max_key(const uint32_t* keys, int64_t n) {
  uint32_t high = 0;
#pragma omp simd reduction(max : high)
  for (int64_t i = 0; i < n; ++i) high = std::max(high, keys[i]);
  return high;
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

// index >= 0: the pair is element `index` of the op's lists (named base[index] / tuned[index]).
void check_pair(const at::Tensor& base, const at::Tensor& tuned, const char* op, int64_t index = -1) {
  const std::string at = index < 0 ? "" : "[" + std::to_string(index) + "]";
  TORCH_CHECK(base.device().is_cpu() && tuned.device().is_cpu(), op, ": base", at, " and tuned", at,
              " must be CPU tensors");
  TORCH_CHECK(base.scalar_type() == tuned.scalar_type(), op, ": base", at, " is ", base.scalar_type(), " but tuned",
              at, " is ", tuned.scalar_type());
  TORCH_CHECK(base.numel() == tuned.numel(), op, ": base", at, " has ", base.numel(), " elements, tuned", at, " ",
              tuned.numel());
  const auto t = base.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": base", at,
              " must be float32, float16 or bfloat16, got ", t);
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

std::tuple<at::Tensor, at::Tensor> select_histogram(at::TensorList base, at::TensorList tuned, int64_t level,
                                                    int64_t prefix) {
  TORCH_CHECK(base.size() == tuned.size(), "select_histogram: ", base.size(), " base tensors but ", tuned.size(),
              " tuned");
  TORCH_CHECK(level == 0 || level == 1, "select_histogram: level must be 0 or 1, got ", level);
  TORCH_CHECK(prefix >= 0 && prefix < kBins0, "select_histogram: prefix must be in [0, 32768), got ", prefix);
  const int64_t T = static_cast<int64_t>(base.size());
  const int64_t nbins = level == 0 ? kBins0 : kBins1;
  const auto opts = at::TensorOptions().dtype(at::kLong);
  // zeroed here, not with at::zeros: a 64k-element fill would open a parallel region of its own
  at::Tensor hist = at::empty({nbins}, opts);
  at::Tensor top = at::empty({T}, opts);
  int64_t* out = hist.data_ptr<int64_t>();
  std::fill(out, out + nbins, int64_t(0));
  std::fill(top.data_ptr<int64_t>(), top.data_ptr<int64_t>() + T, int64_t(-1));

  // The work list: every tensor cut into chunks of kChunk elements, one flat list over all tensors,
  // so small tensors share the threads instead of running one at a time on one of them.
  std::vector<at::Tensor> a(T), b(T);
  std::vector<int64_t> chunk_tensor, chunk_begin;
  for (int64_t t = 0; t < T; ++t) {
    check_pair(base[t], tuned[t], "select_histogram", t);
    a[t] = base[t].contiguous();
    b[t] = tuned[t].contiguous();
    for (int64_t s = 0; s < a[t].numel(); s += kChunk) {
      chunk_tensor.push_back(t);
      chunk_begin.push_back(s);
    }
  }
  const int64_t nchunks = static_cast<int64_t>(chunk_tensor.size());
  if (nchunks == 0) return {hist, top};
  // highest nonzero key of each chunk (0: none): each tensor's top bin is read off these after the pass
  std::vector<uint32_t> chunk_max(nchunks, 0);
  std::mutex merge;
  const uint32_t pfx = static_cast<uint32_t>(prefix);
  // Counts go to kCopies interleaved sub-histograms: runs of equal keys (ties are common in bf16
  // diffs) would otherwise serialise on one counter's store-to-load latency.
  constexpr int kCopies = 4;
  at::parallel_for(0, nchunks, std::max<int64_t>(1, kListGrain / kChunk), [&](int64_t c0, int64_t c1) {
    std::vector<uint32_t> local(nbins * kCopies, 0);
    int64_t zeros = 0, since_flush = 0;
    uint32_t keys[kKeyBlock];
    uint32_t* h = local.data();
    auto flush = [&]() {
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t c = 0; c < kCopies; ++c)
        for (int64_t i = 0; i < nbins; ++i) out[i] += local[c * nbins + i];
      // zero keys fell into bin 0 (level 0, or level 1 under prefix 0): take them out again
      if (level == 0 || pfx == 0) out[0] -= zeros;
      std::fill(local.begin(), local.end(), 0u);
      zeros = 0;
    };
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t = chunk_tensor[c];
      const int64_t begin = chunk_begin[c], end = std::min(a[t].numel(), begin + kChunk);
      uint32_t high = 0;
      dispatch_dtype(a[t].scalar_type(), [&](auto tag) {
        using S = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        const S* pa = a[t].data_ptr<S>();
        const S* pb = b[t].data_ptr<S>();
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
            high = std::max(high, max_key(keys, m));
          } else {
            if (pfx == 0) zeros += z;
            // branch-free compaction of the keys inside the bucket, then count only those
            int64_t n_in = 0;
            for (int64_t i = 0; i < m; ++i) {
              keys[n_in] = keys[i];
              n_in += (keys[i] >> 16) == pfx;
            }
            int64_t i = 0;
            for (; i + kCopies <= n_in; i += kCopies) {
              ++h[keys[i] & 0xffffu];
              ++h[kBins1 + (keys[i + 1] & 0xffffu)];
              ++h[2 * kBins1 + (keys[i + 2] & 0xffffu)];
              ++h[3 * kBins1 + (keys[i + 3] & 0xffffu)];
            }
            for (; i < n_in; ++i) ++h[keys[i] & 0xffffu];
            high = std::max(high, max_key(keys, n_in));
          }
        }
      });
      chunk_max[c] = high;
      since_flush += end - begin;
      if (since_flush >= kFlush) {
        flush();
        since_flush = 0;
      }
    }
    flush();
  });
  int64_t* tops = top.data_ptr<int64_t>();
  for (int64_t c = 0; c < nchunks; ++c) {
    if (chunk_max[c] == 0) continue;
    const int64_t bin = level == 0 ? chunk_max[c] >> 16 : chunk_max[c] & 0xffffu;
    tops[chunk_tensor[c]] = std::max(tops[chunk_tensor[c]], bin);
  }
  return {hist, top};
}

std::tuple<at::Tensor, at::Tensor> select_mask(at::TensorList base, at::TensorList tuned, int64_t threshold,
                                               int64_t tie_budget) {
  TORCH_CHECK(base.size() == tuned.size(), "select_mask: ", base.size(), " base tensors but ", tuned.size(), " tuned");
  TORCH_CHECK(threshold >= 1 && threshold <= 0x7fffffffLL, "select_mask: threshold must be a positive key, got ",
              threshold);
  TORCH_CHECK(tie_budget >= 0, "select_mask: tie_budget must be >= 0, got ", tie_budget);
  const int64_t T = static_cast<int64_t>(base.size());
  // The work list: chunks of kChunk elements (a multiple of 32, so a chunk owns whole words) over
  // every pair; pair t's words start at word_offset[t] of the one output.
  std::vector<at::Tensor> a(T), b(T);
  std::vector<int64_t> word_offset(T + 1, 0), chunk_tensor, chunk_begin;
  for (int64_t t = 0; t < T; ++t) {
    check_pair(base[t], tuned[t], "select_mask", t);
    a[t] = base[t].contiguous();
    b[t] = tuned[t].contiguous();
    word_offset[t + 1] = word_offset[t] + (a[t].numel() + 31) / 32;
    for (int64_t s = 0; s < a[t].numel(); s += kChunk) {
      chunk_tensor.push_back(t);
      chunk_begin.push_back(s);
    }
  }
  const auto opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor words = at::empty({word_offset[T]}, opts.dtype(at::kInt));
  at::Tensor n_eq = at::zeros({T}, opts);
  const int64_t nchunks = static_cast<int64_t>(chunk_tensor.size());
  if (nchunks == 0) return {words, n_eq};
  const uint32_t thr = static_cast<uint32_t>(threshold);
  std::vector<int64_t> eq_per_chunk(nchunks, 0);
  int32_t* out = words.data_ptr<int32_t>();

  // first_pass: write gt | eq bits and count the ties; else drop the ties of rank >= keep (0-based,
  // flat order within the chunk).
  auto process = [&](int64_t c, bool first_pass, int64_t keep) {
    const int64_t t = chunk_tensor[c];
    const int64_t n = a[t].numel();
    const int64_t s0 = chunk_begin[c], s1 = std::min(n, s0 + kChunk);
    int32_t* w = out + word_offset[t];
    dispatch_dtype(a[t].scalar_type(), [&](auto tag) {
      using S = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      const S* pa = a[t].data_ptr<S>();
      const S* pb = b[t].data_ptr<S>();
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
    });
  };
  const int64_t grain = std::max<int64_t>(1, kListGrain / kChunk);
  at::parallel_for(0, nchunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) process(c, true, 0);
  });
  // Hand out the tie budget in (pair, flat index) order; chunks past it drop (some of) their ties.
  std::vector<int64_t> keep(nchunks, -1);  // -1: leave the chunk as written
  int64_t left = tie_budget, total = 0;
  int64_t* eq_out = n_eq.data_ptr<int64_t>();
  for (int64_t c = 0; c < nchunks; ++c) {
    eq_out[chunk_tensor[c]] += eq_per_chunk[c];
    total += eq_per_chunk[c];
    if (eq_per_chunk[c] > left) keep[c] = left;
    left -= std::min(left, eq_per_chunk[c]);
  }
  if (total > tie_budget) {
    at::parallel_for(0, nchunks, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        if (keep[c] >= 0) process(c, false, keep[c]);
    });
  }
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
