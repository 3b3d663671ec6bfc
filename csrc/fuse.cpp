// Fused SLERP for one tensor, in two passes.
//   slerp_stats: one reduction pass -> (Σ u·v, Σ u², Σ v²), u = a − base, v = b − base (or a, b);
//                u, v in fp32, products and sums in fp64 (a product of two fp32 values is exact there:
//                the angle of nearly anti-parallel tensors is ill-conditioned, fp32 sums are not enough).
//   slerp_apply: one elementwise pass -> c0·a + c1·b + c2·base in a's dtype, with core transplant:
//                element i takes values[k][i] where bit i of words[k] is set (rule: last / first /
//                mean of the cores holding i).
// Inputs of any float dtype are widened chunk by chunk into fp32 scratch that stays in L1, so
// each input element is read from memory once. Rounding back: round-to-nearest-even, as torch.
// GCC 12 flags the `undefined` registers inside its own AVX-512 intrinsic headers (false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "common.h"

#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cpift::CPIFT_CAP {
namespace {

constexpr int64_t kChunk = 2048;  // elements per scratch chunk: a multiple of 32 (word-aligned)

// bf16/fp16 <-> fp32: the common.h helpers (bf16_bits_to_f32, f32_to_bf16_bits, narrow<c10::Half>).

void check_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor for the C++ kernel, got ", t.device());
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, what,
              " must be float32, float16 or bfloat16, got ", s);
}

// dst[0:n] = float(src[start:start+n]) for a contiguous flat tensor of float/half/bf16.
void load_f32(const at::Tensor& t, int64_t start, int64_t n, float* dst) {
  switch (t.scalar_type()) {
    case at::kFloat:
      std::memcpy(dst, t.const_data_ptr<float>() + start, n * sizeof(float));
      break;
    case at::kBFloat16: {
      const uint16_t* s = reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()) + start;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_f32(s[i]);
      break;
    }
    default: {
      const at::Half* s = t.const_data_ptr<at::Half>() + start;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#endif
      for (; i < n; ++i) dst[i] = static_cast<float>(s[i]);
    }
  }
}

// out[start:start+n] = cast(src[0:n]) to out's dtype (round to nearest even).
void store_cast(const float* src, int64_t start, int64_t n, at::Tensor& out) {
  switch (out.scalar_type()) {
    case at::kFloat:
      std::memcpy(out.data_ptr<float>() + start, src, n * sizeof(float));
      break;
    case at::kBFloat16: {
      uint16_t* d = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + start;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16_bits(src[i]);
      break;
    }
    default: {
      at::Half* d = out.data_ptr<at::Half>() + start;
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

at::Tensor flat_contiguous(const at::Tensor& t) { return t.contiguous().view(-1); }

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

}  // namespace

at::Tensor slerp_stats(const at::Tensor& a_, const at::Tensor& b_, const std::optional<at::Tensor>& base_) {
  check_float(a_, "slerp_stats: a");
  check_float(b_, "slerp_stats: b");
  TORCH_CHECK(a_.numel() == b_.numel(), "slerp_stats: a has ", a_.numel(), " elements (shape ", a_.sizes(),
              "), b has ", b_.numel(), " (shape ", b_.sizes(), ")");
  const bool has_base = base_.has_value();
  if (has_base) {
    check_float(*base_, "slerp_stats: base");
    TORCH_CHECK(base_->numel() == a_.numel(), "slerp_stats: base has ", base_->numel(), " elements, a has ",
                a_.numel());
  }
  const at::Tensor a = flat_contiguous(a_), b = flat_contiguous(b_);
  const at::Tensor base = has_base ? flat_contiguous(*base_) : at::Tensor();
  const int64_t n = a.numel();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const int nthreads = at::get_num_threads();
  const bool all_f32 = a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                       (!has_base || base.scalar_type() == at::kFloat);
  std::vector<double> partial(3 * static_cast<size_t>(nthreads) * 8, 0.0);  // padded: one cache line each
  at::parallel_for(0, nchunks, std::max<int64_t>(1, kGrain / kChunk), [&](int64_t cb, int64_t ce) {
    alignas(64) float u[kChunk], v[kChunk], w[kChunk];
    double suv = 0, suu = 0, svv = 0;
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t start = c * kChunk, len = std::min(kChunk, n - start);
      if (all_f32) {
        double acc[3] = {0, 0, 0};
        dot3_f32(a.const_data_ptr<float>() + start, b.const_data_ptr<float>() + start,
                 has_base ? base.const_data_ptr<float>() + start : nullptr, len, acc);
        suv += acc[0];
        suu += acc[1];
        svv += acc[2];
        continue;
      }
      load_f32(a, start, len, u);
      load_f32(b, start, len, v);
      if (has_base) {
        load_f32(base, start, len, w);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          u[i] -= w[i];
          v[i] -= w[i];
        }
      }
      double fuv = 0, fuu = 0, fvv = 0;  // fp32 x fp32 is exact in fp64
#pragma omp simd reduction(+ : fuv, fuu, fvv)
      for (int64_t i = 0; i < len; ++i) {
        const double x = u[i], y = v[i];
        fuv += x * y;
        fuu += x * x;
        fvv += y * y;
      }
      suv += fuv;
      suu += fuu;
      svv += fvv;
    }
    double* p = partial.data() + 24 * at::get_thread_num();
    p[0] += suv;
    p[1] += suu;
    p[2] += svv;
  });
  at::Tensor out = at::zeros({3}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int t = 0; t < nthreads; ++t)
    for (int k = 0; k < 3; ++k) o[k] += partial[24 * t + k];
  return out;
}

// rule: 0 = last core holding an element wins, 1 = first wins, 2 = fp32 mean of the cores holding it.
at::Tensor slerp_apply(const at::Tensor& a_, const at::Tensor& b_, const std::optional<at::Tensor>& base_,
                       double c0, double c1, double c2, const at::TensorList values_,
                       const at::TensorList words_, int64_t rule) {
  check_float(a_, "slerp_apply: a");
  check_float(b_, "slerp_apply: b");
  TORCH_CHECK(a_.numel() == b_.numel(), "slerp_apply: a has ", a_.numel(), " elements (shape ", a_.sizes(),
              "), b has ", b_.numel(), " (shape ", b_.sizes(), ")");
  TORCH_CHECK(rule >= 0 && rule <= 2, "slerp_apply: rule must be 0 (last), 1 (first) or 2 (mean); got ", rule);
  TORCH_CHECK(values_.size() == words_.size(), "slerp_apply: ", values_.size(), " value tensors but ",
              words_.size(), " word buffers");
  const bool has_base = base_.has_value();
  if (has_base) {
    check_float(*base_, "slerp_apply: base");
    TORCH_CHECK(base_->numel() == a_.numel(), "slerp_apply: base has ", base_->numel(), " elements, a has ",
                a_.numel());
  }
  const int64_t n = a_.numel();
  const int64_t K = static_cast<int64_t>(values_.size());
  std::vector<at::Tensor> values, words;
  std::vector<const uint32_t*> wp;
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(values_[k].scalar_type() == a_.scalar_type(), "slerp_apply: values[", k, "] has dtype ",
                values_[k].scalar_type(), ", a has ", a_.scalar_type(), " (a transplant copies bits: cast first)");
    TORCH_CHECK(values_[k].numel() == n, "slerp_apply: values[", k, "] has ", values_[k].numel(),
                " elements, a has ", n);
    words.push_back(flat_contiguous(words_[k]));
    check_words(words.back(), "slerp_apply: words[k]");
    TORCH_CHECK(words.back().numel() == (n + 31) / 32, "slerp_apply: words[", k, "] has ", words.back().numel(),
                " words, a tensor of ", n, " elements needs ", (n + 31) / 32);
    values.push_back(flat_contiguous(values_[k]));
    wp.push_back(reinterpret_cast<const uint32_t*>(words.back().data_ptr<int32_t>()));
  }
  const at::Tensor a = flat_contiguous(a_), b = flat_contiguous(b_);
  const at::Tensor base = has_base ? flat_contiguous(*base_) : at::Tensor();
  at::Tensor out = at::empty({n}, a.options());
  const float f0 = static_cast<float>(c0), f1 = static_cast<float>(c1), f2 = static_cast<float>(c2);
  const int64_t esize = a.element_size();
  char* outb = static_cast<char*>(out.data_ptr());
  std::vector<const char*> vb;
  for (const auto& v : values) vb.push_back(static_cast<const char*>(v.const_data_ptr()));
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const bool all_f32 = a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                       (!has_base || base.scalar_type() == at::kFloat);
  at::parallel_for(0, nchunks, std::max<int64_t>(1, kGrain / kChunk), [&](int64_t cb, int64_t ce) {
    alignas(64) float x[kChunk], y[kChunk], z[kChunk];
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t start = c * kChunk, len = std::min(kChunk, n - start);
      if (all_f32) {
        blend_f32(out.data_ptr<float>() + start, a.const_data_ptr<float>() + start, b.const_data_ptr<float>() + start,
                  has_base ? base.const_data_ptr<float>() + start : nullptr, len, f0, f1, f2);
      } else {
        load_f32(a, start, len, x);
        load_f32(b, start, len, y);
        if (has_base) load_f32(base, start, len, z);
        blend(x, y, has_base ? z : nullptr, len, f0, f1, f2);
        store_cast(x, start, len, out);
      }
      if (K == 0) continue;
      const int64_t w0 = start / 32, w1 = (start + len + 31) / 32;
      // bits of word w that name elements (padding bits past n in the last word are ignored)
      const auto live = [n](int64_t w) { return n - w * 32 >= 32 ? ~0u : (1u << (n - w * 32)) - 1u; };
      if (rule != 2) {
        for (int64_t kk = 0; kk < K; ++kk) {
          const int64_t k = rule == 0 ? kk : K - 1 - kk;  // later writes win
          for (int64_t w = w0; w < w1; ++w) {
            uint32_t bits = wp[k][w] & live(w);
            while (bits) {
              const int64_t i = w * 32 + __builtin_ctz(bits);
              bits &= bits - 1;
              std::memcpy(outb + i * esize, vb[k] + i * esize, esize);
            }
          }
        }
      } else {
        for (int64_t w = w0; w < w1; ++w) {
          uint32_t any = 0;
          for (int64_t k = 0; k < K; ++k) any |= wp[k][w];
          any &= live(w);
          while (any) {
            const int bit = __builtin_ctz(any);
            any &= any - 1;
            const int64_t i = w * 32 + bit;
            float sum = 0;
            int cnt = 0;
            for (int64_t k = 0; k < K; ++k)
              if ((wp[k][w] >> bit) & 1u) {
                float val;
                load_f32(values[k], i, 1, &val);
                sum += val;
                ++cnt;
              }
            const float mean = sum / static_cast<float>(cnt);
            store_cast(&mean, i, 1, out);
          }
        }
      }
    }
  });
  return out.view(a_.sizes());
}

}  // namespace cpift::CPIFT_CAP

// Schemas live in cpift_fast/ops/ (Python). The DEFAULT compile registers the CPU kernels, each calling
// the copy of the capability in use (dispatch.h).
#ifdef CPIFT_REGISTERS
CPIFT_DECLARE_CAPS(slerp_stats)
CPIFT_DECLARE_CAPS(slerp_apply)
TORCH_LIBRARY_IMPL(cpift, CPU, m) {
  m.impl("slerp_stats", CPIFT_KERNEL(slerp_stats));
  m.impl("slerp_apply", CPIFT_KERNEL(slerp_apply));
}
#endif
