// Fused SLERP, in two passes, for one tensor or a list of them.
//   slerp_stats: one reduction pass -> (Σ u·v, Σ u², Σ v²), u = a − base, v = b − base (or a, b);
//                u, v in fp32, products and sums in fp64 (a product of two fp32 values is exact there:
//                the angle of nearly anti-parallel tensors is ill-conditioned, fp32 sums are not enough).
//   slerp_apply: one elementwise pass -> c0·a + c1·b + c2·base in a's dtype, with core transplant:
//                element i takes values[k][i] where bit i of words[k] is set (rule: last / first /
//                mean of the cores holding i).
//   slerp_stats_list / slerp_apply_list: the same for T tensors in one call. The single ops are the
//                list ops of one tensor (the same code, the same bits).
// Work list: every tensor cut into kChunk-element chunks, one flat list over all tensors, split over
// the threads by one at::parallel_for, so hundreds of small tensors share the threads.
// Reduction order (fixed, so the stats are the same bits whatever the thread count and whether a
// tensor comes alone or in a list): each chunk's sums are formed alone (a vectorized reduction over
// its elements), then a tensor's chunk sums are added one after another in chunk order, from 0.
// Inputs of any float dtype are widened chunk by chunk into fp32 scratch that stays in L1, so
// each input element is read from memory once. Rounding back: round-to-nearest-even, as torch.
// GCC 12 flags the `undefined` registers inside its own AVX-512 intrinsic headers (false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "common.h"

#include <cstring>
#include <string>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cpift::CPIFT_CAP {
namespace {

constexpr int64_t kChunk = 2048;  // elements per work-list chunk and scratch buffer: a multiple of 32 (word-aligned)
// Elements per thread task: below this a call runs on one thread. Every parallel region costs a
// thread wake-up (on an oversubscribed machine a descheduled thread stalls the region), so one
// call opens one region for all its tensors, whatever their sizes (as csrc/select.cpp).
constexpr int64_t kListGrain = 1 << 18;

// bf16/fp16 <-> fp32: the common.h helpers (bf16_bits_to_f32, f32_to_bf16_bits, narrow<c10::Half>).

// `op: <name><ix>` names a tensor in messages; ix is "" in the single ops, "[t]" in the list ops.
void check_float(const at::Tensor& t, const char* op, const char* name, const std::string& ix) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, ix, " must be a CPU tensor for the C++ kernel, got ", t.device());
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name, ix,
              " must be float32, float16 or bfloat16, got ", s);
}

// A tensor's elements as one flat contiguous buffer of float/half/bf16: the tensor's own memory when
// it is contiguous, else a contiguous copy held in `keep` (no view is made: a small tensor's call
// costs little more than its elements).
struct Flat {
  const void* p = nullptr;
  at::ScalarType s = at::kFloat;
  at::Tensor keep;
  Flat() = default;
  explicit Flat(const at::Tensor& t) : s(t.scalar_type()) {
    if (!t.is_contiguous()) keep = t.contiguous();
    p = (keep.defined() ? keep : t).const_data_ptr();
  }
  template <typename T>
  const T* as() const { return static_cast<const T*>(p); }
};

// dst[0:n] = float(src[start:start+n]).
void load_f32(const Flat& t, int64_t start, int64_t n, float* dst) {
  switch (t.s) {
    case at::kFloat:
      std::memcpy(dst, t.as<float>() + start, n * sizeof(float));
      break;
    case at::kBFloat16: {
      const uint16_t* s = t.as<uint16_t>() + start;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_f32(s[i]);
      break;
    }
    default: {
      const at::Half* s = t.as<at::Half>() + start;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#endif
      for (; i < n; ++i) dst[i] = static_cast<float>(s[i]);
    }
  }
}

// out[start:start+n] = cast(src[0:n]) to the dtype s of the contiguous buffer out (round to nearest even).
void store_cast(const float* src, int64_t start, int64_t n, void* out, at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      std::memcpy(static_cast<float*>(out) + start, src, n * sizeof(float));
      break;
    case at::kBFloat16: {
      uint16_t* d = static_cast<uint16_t*>(out) + start;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16_bits(src[i]);
      break;
    }
    default: {
      at::Half* d = static_cast<at::Half*>(out) + start;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                            _mm512_maskz_cvtps_ph(0xffff, _mm512_loadu_ps(src + i),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
      for (; i < n; ++i) d[i] = narrow<c10::Half>(src[i]);
    }
  }
}

// x = c0·x + c1·y (+ c2·z), each product rounded to fp32 before the sums (no FMA contraction), so
// the result is bit-identical to the reference's `c0 * a + c1 * b + c2 * base`.
__attribute__((optimize("fp-contract=off"))) void blend(float* x, const float* y, const float* z, int64_t n,
                                                        float c0, float c1, float c2) {
  if (z != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = c0 * x[i] + c1 * y[i] + c2 * z[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = c0 * x[i] + c1 * y[i];
  }
}

// out = c0·a + c1·b (+ c2·z) straight from fp32 inputs to an fp32 output (no scratch copies),
// with the same rounding as blend().
__attribute__((optimize("fp-contract=off"))) void blend_f32(float* out, const float* a, const float* b,
                                                            const float* z, int64_t n, float c0, float c1,
                                                            float c2) {
  if (z != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = c0 * a[i] + c1 * b[i] + c2 * z[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = c0 * a[i] + c1 * b[i];
  }
}

// (Σ u·v, Σ u², Σ v²) added to acc, u = a − z, v = b − z (z null: u = a, v = b), straight from
// fp32 inputs (no scratch copies); the differences are rounded to fp32 exactly as in the chunked path.
void dot3_f32(const float* a, const float* b, const float* z, int64_t n, double acc[3]) {
  double fuv = 0, fuu = 0, fvv = 0;
  if (z != nullptr) {
#pragma omp simd reduction(+ : fuv, fuu, fvv)
    for (int64_t i = 0; i < n; ++i) {
      const float uf = a[i] - z[i], vf = b[i] - z[i];
      const double x = uf, y = vf;
      fuv += x * y;
      fuu += x * x;
      fvv += y * y;
    }
  } else {
#pragma omp simd reduction(+ : fuv, fuu, fvv)
    for (int64_t i = 0; i < n; ++i) {
      const double x = a[i], y = b[i];
      fuv += x * y;
      fuu += x * x;
      fvv += y * y;
    }
  }
  acc[0] += fuv;
  acc[1] += fuu;
  acc[2] += fvv;
}


// One (a, b, base) triple of a call.
struct Triple {
  Flat a, b, base;
  int64_t n = 0;
  bool has_base = false, all_f32 = false;
};

Triple make_triple(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& base, const char* op,
                   const std::string& ix) {
  check_float(a, op, "a", ix);
  check_float(b, op, "b", ix);
  TORCH_CHECK(a.numel() == b.numel(), op, ": a", ix, " has ", a.numel(), " elements (shape ", a.sizes(), "), b", ix,
              " has ", b.numel(), " (shape ", b.sizes(), ")");
  Triple p;
  if (base.has_value()) {
    check_float(*base, op, "base", ix);
    TORCH_CHECK(base->numel() == a.numel(), op, ": base", ix, " has ", base->numel(), " elements (shape ",
                base->sizes(), "), a", ix, " has ", a.numel(), " (shape ", a.sizes(), ")");
    p.base = Flat(*base);
    p.has_base = true;
  }
  p.a = Flat(a);
  p.b = Flat(b);
  p.n = a.numel();
  p.all_f32 = p.a.s == at::kFloat && p.b.s == at::kFloat && (!p.has_base || p.base.s == at::kFloat);
  return p;
}

std::string list_index(int64_t t) { return "[" + std::to_string(t) + "]"; }

// The work list: chunk c covers elements [begin[c], begin[c] + kChunk) of tensor tensor[c], in
// (tensor, element) order.
struct WorkList {
  std::vector<int64_t> tensor, begin;
  explicit WorkList(const std::vector<int64_t>& sizes) {
    for (int64_t t = 0; t < static_cast<int64_t>(sizes.size()); ++t)
      for (int64_t s = 0; s < sizes[t]; s += kChunk) {
        tensor.push_back(t);
        begin.push_back(s);
      }
  }
  int64_t size() const { return static_cast<int64_t>(tensor.size()); }
  template <typename F>  // f(chunk, tensor, start, len)
  void run(const std::vector<int64_t>& sizes, const F& f) const {
    at::parallel_for(0, size(), std::max<int64_t>(1, kListGrain / kChunk), [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) f(c, tensor[c], begin[c], std::min(kChunk, sizes[tensor[c]] - begin[c]));
    });
  }
};

// (Σ u·v, Σ u², Σ v²) of elements [start, start + len) of p, len <= kChunk, into out[0:3].
void stats_chunk(const Triple& p, int64_t start, int64_t len, float* u, float* v, float* w, double* out) {
  const bool has_base = p.has_base;
  if (p.all_f32) {
    out[0] = out[1] = out[2] = 0;
    dot3_f32(p.a.as<float>() + start, p.b.as<float>() + start, has_base ? p.base.as<float>() + start : nullptr, len,
             out);
    return;
  }
  load_f32(p.a, start, len, u);
  load_f32(p.b, start, len, v);
  if (has_base) {
    load_f32(p.base, start, len, w);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      u[i] -= w[i];
      v[i] -= w[i];
    }
  }
  out[0] = out[1] = out[2] = 0;
  dot3_f32(u, v, nullptr, len, out);
}

// float64 [T, 3]: row t = (Σ u·v, Σ u², Σ v²) of p[t]; chunk sums combined in chunk order (see top).
at::Tensor stats_of(const std::vector<Triple>& p) {
  const int64_t T = static_cast<int64_t>(p.size());
  std::vector<int64_t> sizes(T);
  for (int64_t t = 0; t < T; ++t) sizes[t] = p[t].n;
  const WorkList work(sizes);
  std::vector<double> partial(3 * static_cast<size_t>(work.size()));
  work.run(sizes, [&](int64_t c, int64_t t, int64_t start, int64_t len) {
    alignas(64) float u[kChunk], v[kChunk], w[kChunk];
    stats_chunk(p[t], start, len, u, v, w, partial.data() + 3 * c);
  });
  // zeroed here, not with at::zeros: a fill would open a parallel region of its own
  at::Tensor out = at::empty({T, 3}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  std::fill(o, o + 3 * T, 0.0);
  for (int64_t c = 0; c < work.size(); ++c)
    for (int k = 0; k < 3; ++k) o[3 * work.tensor[c] + k] += partial[3 * c + k];
  return out;
}

// One tensor of an apply call: its triple, coefficients, cores and output.
struct ApplyJob {
  Triple p;
  float f0 = 0, f1 = 0, f2 = 0;
  std::vector<Flat> values, words;
  std::vector<const uint32_t*> wp;
  std::vector<const char*> vb;
  at::Tensor out;  // contiguous, a's shape and dtype
};

// values / words: the K cores of the tensor, named values[first + k] / words[first + k] in messages
// (with " (a core of a<ix>)" in the list op, where first is the offset into the call's flat core lists).
ApplyJob make_job(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& base, double c0,
                  double c1, double c2, at::TensorList values, at::TensorList words, int64_t first, const char* op,
                  const std::string& ix) {
  ApplyJob j;
  j.p = make_triple(a, b, base, op, ix);
  j.f0 = static_cast<float>(c0);
  j.f1 = static_cast<float>(c1);
  j.f2 = static_cast<float>(c2);
  const int64_t n = j.p.n;
  // the messages' parts, built only when a check fails (TORCH_CHECK evaluates them then)
  const char* of = ix.empty() ? "" : " (a core of a";
  const char* close = ix.empty() ? "" : ")";
  for (int64_t k = 0; k < static_cast<int64_t>(values.size()); ++k) {
    const int64_t i = first + k;
    TORCH_CHECK(values[k].scalar_type() == a.scalar_type(), op, ": values[", i, "]", of, ix, close, " has dtype ",
                values[k].scalar_type(), ", a", ix, " has ", a.scalar_type(), " (a transplant copies bits: cast first)");
    TORCH_CHECK(values[k].numel() == n, op, ": values[", i, "]", of, ix, close, " has ", values[k].numel(),
                " elements, a", ix, " has ", n);
    TORCH_CHECK(values[k].device().is_cpu(), op, ": values[", i, "]", of, ix, close,
                " must be a CPU tensor for the C++ kernel");
    TORCH_CHECK(words[k].scalar_type() == at::kInt && words[k].numel() == (n + 31) / 32, op, ": words[", i, "]", of,
                ix, close, " must be ", (n + 31) / 32, " int32 words, got ", words[k].numel(), " ",
                words[k].scalar_type(), " (a", ix, " has ", n, " elements)");
    TORCH_CHECK(words[k].device().is_cpu(), op, ": words[", i, "]", of, ix, close,
                " must be a CPU tensor for the C++ kernel");
    j.words.emplace_back(words[k]);
    j.values.emplace_back(values[k]);
    j.wp.push_back(j.words.back().as<uint32_t>());
    j.vb.push_back(j.values.back().as<char>());
  }
  j.out = at::empty(a.sizes(), a.options().memory_format(at::MemoryFormat::Contiguous));
  return j;
}

// rule: 0 = last core holding an element wins, 1 = first wins, 2 = fp32 mean of the cores holding it.
void apply_chunk(const ApplyJob& j, int64_t rule, int64_t start, int64_t len, float* x, float* y, float* z) {
  const Triple& p = j.p;
  const bool has_base = p.has_base;
  const int64_t n = p.n;
  void* out = j.out.data_ptr();
  if (p.all_f32) {
    blend_f32(static_cast<float*>(out) + start, p.a.as<float>() + start, p.b.as<float>() + start,
              has_base ? p.base.as<float>() + start : nullptr, len, j.f0, j.f1, j.f2);
  } else {
    load_f32(p.a, start, len, x);
    load_f32(p.b, start, len, y);
    if (has_base) load_f32(p.base, start, len, z);
    blend(x, y, has_base ? z : nullptr, len, j.f0, j.f1, j.f2);
    store_cast(x, start, len, out, p.a.s);
  }
  const int64_t K = static_cast<int64_t>(j.values.size());
  if (K == 0) return;
  const int64_t esize = c10::elementSize(p.a.s);
  char* outb = static_cast<char*>(out);
  const int64_t w0 = start / 32, w1 = (start + len + 31) / 32;
  // bits of word w that name elements (padding bits past n in the last word are ignored)
  const auto live = [n](int64_t w) { return n - w * 32 >= 32 ? ~0u : (1u << (n - w * 32)) - 1u; };
  if (rule != 2) {
    for (int64_t kk = 0; kk < K; ++kk) {
      const int64_t k = rule == 0 ? kk : K - 1 - kk;  // later writes win
      for (int64_t w = w0; w < w1; ++w) {
        uint32_t bits = j.wp[k][w] & live(w);
        while (bits) {
          const int64_t i = w * 32 + __builtin_ctz(bits);
          bits &= bits - 1;
          std::memcpy(outb + i * esize, j.vb[k] + i * esize, esize);
        }
      }
    }
    return;
  }
  for (int64_t w = w0; w < w1; ++w) {
    uint32_t any = 0;
    for (int64_t k = 0; k < K; ++k) any |= j.wp[k][w];
    any &= live(w);
    while (any) {
      const int bit = __builtin_ctz(any);
      any &= any - 1;
      const int64_t i = w * 32 + bit;
      float sum = 0;
      int cnt = 0;
      for (int64_t k = 0; k < K; ++k)
        if ((j.wp[k][w] >> bit) & 1u) {
          float val;
          load_f32(j.values[k], i, 1, &val);
          sum += val;
          ++cnt;
        }
      const float mean = sum / static_cast<float>(cnt);
      store_cast(&mean, i, 1, out, p.a.s);
    }
  }
}

void apply_all(const std::vector<ApplyJob>& jobs, int64_t rule) {
  std::vector<int64_t> sizes;
  for (const auto& j : jobs) sizes.push_back(j.p.n);
  const WorkList work(sizes);
  work.run(sizes, [&](int64_t, int64_t t, int64_t start, int64_t len) {
    alignas(64) float x[kChunk], y[kChunk], z[kChunk];
    apply_chunk(jobs[t], rule, start, len, x, y, z);
  });
}

void check_rule(int64_t rule, const char* op) {
  TORCH_CHECK(rule >= 0 && rule <= 2, op, ": rule must be 0 (last), 1 (first) or 2 (mean); got ", rule);
}

}  // namespace

at::Tensor slerp_stats(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& base) {
  return stats_of({make_triple(a, b, base, "slerp_stats", "")}).view({3});
}

// float64 [T, 3]; row t is slerp_stats(a[t], b[t], base[t]), bit for bit.
at::Tensor slerp_stats_list(at::TensorList a, at::TensorList b, const c10::List<std::optional<at::Tensor>>& base) {
  TORCH_CHECK(a.size() == b.size() && a.size() == base.size(), "slerp_stats_list: ", a.size(), " a tensors, ",
              b.size(), " b, ", base.size(), " base (one each per tensor; None for no base)");
  std::vector<Triple> p;
  for (int64_t t = 0; t < static_cast<int64_t>(a.size()); ++t)
    p.push_back(make_triple(a[t], b[t], base.get(t), "slerp_stats_list", list_index(t)));
  return stats_of(p);
}

at::Tensor slerp_apply(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& base, double c0,
                       double c1, double c2, const at::TensorList values, const at::TensorList words, int64_t rule) {
  check_rule(rule, "slerp_apply");
  TORCH_CHECK(values.size() == words.size(), "slerp_apply: ", values.size(), " value tensors but ", words.size(),
              " word buffers");
  std::vector<ApplyJob> jobs;
  jobs.push_back(make_job(a, b, base, c0, c1, c2, values, words, 0, "slerp_apply", ""));
  apply_all(jobs, rule);
  return jobs[0].out;
}

// out[t] is slerp_apply(a[t], b[t], base[t], coeffs[3t], coeffs[3t+1], coeffs[3t+2], the counts[t] cores
// of tensor t, rule), bit for bit; tensor t's cores are values / words [Σ counts[:t], Σ counts[:t+1]).
std::vector<at::Tensor> slerp_apply_list(at::TensorList a, at::TensorList b,
                                         const c10::List<std::optional<at::Tensor>>& base, at::ArrayRef<double> coeffs,
                                         at::TensorList values, at::TensorList words, at::IntArrayRef counts,
                                         int64_t rule) {
  const char* op = "slerp_apply_list";
  const int64_t T = static_cast<int64_t>(a.size());
  check_rule(rule, op);
  TORCH_CHECK(static_cast<int64_t>(b.size()) == T && static_cast<int64_t>(base.size()) == T, op, ": ", T,
              " a tensors, ", b.size(), " b, ", base.size(), " base (one each per tensor; None for no base)");
  TORCH_CHECK(static_cast<int64_t>(coeffs.size()) == 3 * T, op, ": coeffs has ", coeffs.size(),
              " values, ", T, " tensors need ", 3 * T, " (c0, c1, c2 per tensor)");
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == T, op, ": counts has ", counts.size(), " entries, one per tensor (",
              T, ") needed");
  TORCH_CHECK(values.size() == words.size(), op, ": ", values.size(), " value tensors but ", words.size(),
              " word buffers");
  int64_t total = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(counts[t] >= 0, op, ": counts[", t, "] is ", counts[t], " (cores of a[", t, "]: must be >= 0)");
    total += counts[t];
  }
  TORCH_CHECK(total == static_cast<int64_t>(values.size()), op, ": counts sum to ", total, " cores but ",
              values.size(), " value tensors are given");
  std::vector<ApplyJob> jobs;
  int64_t first = 0;
  for (int64_t t = 0; t < T; ++t) {
    jobs.push_back(make_job(a[t], b[t], base.get(t), coeffs[3 * t], coeffs[3 * t + 1], coeffs[3 * t + 2],
                            values.slice(first, counts[t]), words.slice(first, counts[t]), first, op, list_index(t)));
    first += counts[t];
  }
  apply_all(jobs, rule);
  std::vector<at::Tensor> out;
  for (int64_t t = 0; t < T; ++t) out.push_back(std::move(jobs[t].out));
  return out;
}

}  // namespace cpift::CPIFT_CAP

// Schemas live in cpift_fast/ops/ (Python). The DEFAULT compile registers the CPU kernels, each calling
// the copy of the capability in use (dispatch.h).
#ifdef CPIFT_REGISTERS
CPIFT_DECLARE_CAPS(slerp_stats)
CPIFT_DECLARE_CAPS(slerp_apply)
CPIFT_DECLARE_CAPS(slerp_stats_list)
CPIFT_DECLARE_CAPS(slerp_apply_list)
TORCH_LIBRARY_IMPL(cpift, CPU, m) {
  m.impl("slerp_stats", CPIFT_KERNEL(slerp_stats));
  m.impl("slerp_apply", CPIFT_KERNEL(slerp_apply));
  m.impl("slerp_stats_list", CPIFT_KERNEL(slerp_stats_list));
  m.impl("slerp_apply_list", CPIFT_KERNEL(slerp_apply_list));
}
#endif
