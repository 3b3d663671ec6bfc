// Masked AdamW: one fused pass over param, grad, exp_avg, exp_avg_sq (and max_exp_avg_sq) per
// tensor, with a 1-bit-per-element frozen mask (bit i of tensor t = bit i % 32 of frozen[t][i / 32]).
//
// Trainable elements follow torch.optim.AdamW (decoupled decay first, bias correction, eps after
// sqrt), computed in fp32 whatever the storage dtype (bf16/fp16 widened, rounded once on store).
// Frozen elements are never modified: a word of 32 frozen elements is skipped entirely (no loads,
// no stores); in a mixed word only the trainable lanes are stored (AVX-512: the frozen bits are the
// inverted store mask).

// GCC 12 flags its own _mm512_undefined_ps() (self-initialised) when AVX-512 intrinsics inline.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "common.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstring>

namespace cpift {
namespace {

struct AdamWConsts {
  float decay;      // 1 - lr * weight_decay
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float step_size;  // lr / (1 - beta1^step)
  float bc2_sqrt;   // sqrt(1 - beta2^step)
  float eps;
  float grad_mul;   // (maximize ? -1 : 1) / grad_scale
};

// Update elements [0, len) of a chunk; LEN > 0 fixes the length at compile time (full words),
// MASKED keeps the original value of every element whose bit in `frozen_bits` is set.
// Portable path (no AVX-512): plain loops the compiler vectorizes; no-math-errno lets it use
// vector sqrt (errno is never read here).
template <typename P, typename S, bool AMSGRAD, bool MASKED, int LEN>
__attribute__((optimize("no-math-errno"))) inline void update_chunk(
    P* __restrict p, const P* __restrict g, S* __restrict m, S* __restrict v, S* __restrict vmax,
    uint32_t frozen_bits, int len, const AdamWConsts& c) {
  constexpr int kMax = 32;
  const int n = LEN > 0 ? LEN : len;
  P p_new[kMax];
  S m_new[kMax], v_new[kMax], vmax_new[kMax];
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    const float gj = static_cast<float>(g[j]) * c.grad_mul;
    float pj = static_cast<float>(p[j]);
    float mj = static_cast<float>(m[j]);
    float vj = static_cast<float>(v[j]);
    pj = pj * c.decay;
    mj = mj + c.one_minus_beta1 * (gj - mj);
    vj = vj * c.beta2 + c.one_minus_beta2 * gj * gj;
    float vm = vj;
    if constexpr (AMSGRAD) {
      vm = std::max(static_cast<float>(vmax[j]), vj);
      vmax_new[j] = static_cast<S>(vm);
    }
    const float denom = std::sqrt(vm) / c.bc2_sqrt + c.eps;
    pj = pj - c.step_size * mj / denom;
    p_new[j] = static_cast<P>(pj);
    m_new[j] = static_cast<S>(mj);
    v_new[j] = static_cast<S>(vj);
  }
  if constexpr (!MASKED) {
    std::memcpy(p, p_new, n * sizeof(P));
    std::memcpy(m, m_new, n * sizeof(S));
    std::memcpy(v, v_new, n * sizeof(S));
    if constexpr (AMSGRAD) std::memcpy(vmax, vmax_new, n * sizeof(S));
  } else {
    // select on the stored representation so a frozen element keeps its exact bits (NaN included)
    for (int j = 0; j < n; ++j) {
      if (!((frozen_bits >> j) & 1u)) {
        p[j] = p_new[j];
        m[j] = m_new[j];
        v[j] = v_new[j];
        if constexpr (AMSGRAD) vmax[j] = vmax_new[j];
      }
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(CPIFT_ADAMW_NO_AVX512)
#define CPIFT_ADAMW_AVX512 1
#include <immintrin.h>

// 16 lanes of T widened to fp32: masked load (lanes outside `k` read as 0, never touched in memory)
// and masked store (only lanes in `k` are written; the others keep their bits).
template <typename T> struct Lanes;

template <> struct Lanes<float> {
  static __m512 load(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
  static void store(float* p, __mmask16 k, __m512 x) { _mm512_mask_storeu_ps(p, k, x); }
};

template <> struct Lanes<c10::BFloat16> {
  static __m512 load(const c10::BFloat16* p, __mmask16 k) {
    const __m256i raw = _mm256_maskz_loadu_epi16(k, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static void store(c10::BFloat16* p, __mmask16 k, __m512 x) {
#ifdef __AVX512BF16__
    // one instruction: round to nearest even (a NaN stays a quiet NaN of the same sign)
    _mm256_mask_storeu_epi16(p, k, (__m256i)_mm512_cvtneps_pbh(x));
    return;
#endif
    // round to nearest even, NaN -> quiet NaN (as c10::BFloat16)
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    rounded = _mm512_srli_epi32(rounded, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(rounded));
  }
};

template <> struct Lanes<c10::Half> {
  static __m512 load(const c10::Half* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }
  static void store(c10::Half* p, __mmask16 k, __m512 x) {
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

// 16 elements: `valid` lanes exist, `write` lanes (valid and trainable) are updated.
template <typename P, typename S, bool AMSGRAD>
inline void update16(P* p, const P* g, S* m, S* v, S* vmax, __mmask16 valid, __mmask16 write,
                     const AdamWConsts& c) {
  const __m512 gj = _mm512_mul_ps(Lanes<P>::load(g, valid), _mm512_set1_ps(c.grad_mul));
  __m512 pj = _mm512_mul_ps(Lanes<P>::load(p, valid), _mm512_set1_ps(c.decay));
  __m512 mj = Lanes<S>::load(m, valid);
  __m512 vj = Lanes<S>::load(v, valid);
  mj = _mm512_add_ps(mj, _mm512_mul_ps(_mm512_set1_ps(c.one_minus_beta1), _mm512_sub_ps(gj, mj)));
  vj = _mm512_add_ps(_mm512_mul_ps(vj, _mm512_set1_ps(c.beta2)),
                     _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(c.one_minus_beta2), gj), gj));
  __m512 vm = vj;
  if constexpr (AMSGRAD) {
    vm = _mm512_max_ps(Lanes<S>::load(vmax, valid), vj);
    Lanes<S>::store(vmax, write, vm);
  }
  const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vm), _mm512_set1_ps(c.bc2_sqrt)),
                                     _mm512_set1_ps(c.eps));
  pj = _mm512_sub_ps(pj, _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(c.step_size), mj), denom));
  Lanes<P>::store(p, write, pj);
  Lanes<S>::store(m, write, mj);
  Lanes<S>::store(v, write, vj);
}
#endif

template <typename P, typename S, bool AMSGRAD>
void step_tensor(P* p, const P* g, S* m, S* v, S* vmax, const int32_t* frozen, int64_t n,
                 const AdamWConsts& c) {
  const int64_t nwords = (n + 31) / 32;
  at::parallel_for(0, nwords, kGrain / 32, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const uint32_t bits = frozen ? as_u32(frozen[w]) : 0u;
      if (bits == 0xFFFFFFFFu) continue;
      const int64_t i = w * 32;
      const int len = static_cast<int>(std::min<int64_t>(32, n - i));
      S* vmax_i = AMSGRAD ? vmax + i : nullptr;
#ifdef CPIFT_ADAMW_AVX512
      const uint32_t valid = len == 32 ? 0xFFFFFFFFu : ((1u << len) - 1u);
      const uint32_t write = valid & ~bits;
      update16<P, S, AMSGRAD>(p + i, g + i, m + i, v + i, vmax_i, static_cast<__mmask16>(valid),
                              static_cast<__mmask16>(write), c);
      if (len > 16)
        update16<P, S, AMSGRAD>(p + i + 16, g + i + 16, m + i + 16, v + i + 16, AMSGRAD ? vmax_i + 16 : nullptr,
                                static_cast<__mmask16>(valid >> 16), static_cast<__mmask16>(write >> 16), c);
#else
      if (len == 32) {
        if (bits == 0u)
          update_chunk<P, S, AMSGRAD, false, 32>(p + i, g + i, m + i, v + i, vmax_i, 0u, 32, c);
        else
          update_chunk<P, S, AMSGRAD, true, 32>(p + i, g + i, m + i, v + i, vmax_i, bits, 32, c);
      } else {
        update_chunk<P, S, AMSGRAD, true, 0>(p + i, g + i, m + i, v + i, vmax_i, bits, len, c);
      }
#endif
    }
  });
}

template <typename P, typename S>
void dispatch_amsgrad(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                      const at::Tensor* vmax, const int32_t* frozen, const AdamWConsts& c) {
  S* vmax_ptr = vmax ? vmax->data_ptr<S>() : nullptr;
  if (vmax)
    step_tensor<P, S, true>(p.data_ptr<P>(), g.data_ptr<P>(), m.data_ptr<S>(), v.data_ptr<S>(), vmax_ptr,
                            frozen, p.numel(), c);
  else
    step_tensor<P, S, false>(p.data_ptr<P>(), g.data_ptr<P>(), m.data_ptr<S>(), v.data_ptr<S>(), nullptr,
                             frozen, p.numel(), c);
}

template <typename P>
void dispatch_state(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                    const at::Tensor* vmax, const int32_t* frozen, const AdamWConsts& c) {
  if (m.scalar_type() == at::kFloat)
    dispatch_amsgrad<P, float>(p, g, m, v, vmax, frozen, c);
  else
    dispatch_amsgrad<P, P>(p, g, m, v, vmax, frozen, c);
}

void check_same(const at::Tensor& t, const at::Tensor& p, const char* what, int64_t i) {
  TORCH_CHECK(t.device().is_cpu(), "masked_adamw_: ", what, "[", i, "] must be a CPU tensor");
  TORCH_CHECK(t.numel() == p.numel(), "masked_adamw_: ", what, "[", i, "] has ", t.numel(),
              " elements, params[", i, "] has ", p.numel());
  TORCH_CHECK(t.is_contiguous(), "masked_adamw_: ", what, "[", i, "] must be contiguous");
}

}  // namespace

void masked_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList frozen,
                   at::ArrayRef<double> steps, double lr, double beta1, double beta2, double weight_decay,
                   double eps, bool amsgrad, bool maximize, const std::optional<at::Tensor>& grad_scale) {
  const int64_t T = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == T && static_cast<int64_t>(exp_avgs.size()) == T &&
                  static_cast<int64_t>(exp_avg_sqs.size()) == T && static_cast<int64_t>(steps.size()) == T,
              "masked_adamw_: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length (",
              T, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size(), ")");
  TORCH_CHECK(!amsgrad || static_cast<int64_t>(max_exp_avg_sqs.size()) == T,
              "masked_adamw_: amsgrad needs one max_exp_avg_sq per param, got ", max_exp_avg_sqs.size());
  TORCH_CHECK(frozen.empty() || static_cast<int64_t>(frozen.size()) == T,
              "masked_adamw_: frozen must be empty (nothing frozen) or hold one word tensor per param, got ",
              frozen.size(), " for ", T, " params");
  float grad_mul = maximize ? -1.0f : 1.0f;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == 1, "masked_adamw_: grad_scale must hold one value");
    grad_mul *= 1.0f / grad_scale->to(at::kCPU).item<float>();
  }
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    const auto dtype = p.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "masked_adamw_: params[", i, "] must be float32, bfloat16 or float16, got ", p.dtype());
    check_same(p, p, "params", i);
    TORCH_CHECK(grads[i].scalar_type() == dtype, "masked_adamw_: grads[", i, "] is ", grads[i].dtype(),
                ", params[", i, "] is ", p.dtype());
    const at::Tensor g = grads[i].contiguous();
    check_same(g, p, "grads", i);
    check_same(exp_avgs[i], p, "exp_avgs", i);
    check_same(exp_avg_sqs[i], p, "exp_avg_sqs", i);
    const auto sdtype = exp_avgs[i].scalar_type();
    TORCH_CHECK(sdtype == dtype || sdtype == at::kFloat, "masked_adamw_: exp_avgs[", i, "] is ",
                exp_avgs[i].dtype(), "; state must be float32 or the param dtype ", p.dtype());
    TORCH_CHECK(exp_avg_sqs[i].scalar_type() == sdtype, "masked_adamw_: exp_avg_sqs[", i, "] is ",
                exp_avg_sqs[i].dtype(), ", exp_avgs[", i, "] is ", exp_avgs[i].dtype());
    const at::Tensor* vmax = nullptr;
    if (amsgrad) {
      check_same(max_exp_avg_sqs[i], p, "max_exp_avg_sqs", i);
      TORCH_CHECK(max_exp_avg_sqs[i].scalar_type() == sdtype, "masked_adamw_: max_exp_avg_sqs[", i,
                  "] is ", max_exp_avg_sqs[i].dtype(), ", exp_avgs[", i, "] is ", exp_avgs[i].dtype());
      vmax = &max_exp_avg_sqs[i];
    }
    const int32_t* words = nullptr;
    if (!frozen.empty()) {
      check_words(frozen[i], "masked_adamw_: frozen[i]");
      TORCH_CHECK(frozen[i].numel() * 32 >= p.numel(), "masked_adamw_: frozen[", i, "] has ",
                  frozen[i].numel(), " words, params[", i, "] needs ", (p.numel() + 31) / 32);
      words = frozen[i].data_ptr<int32_t>();
    }
    const double step = steps[i];
    TORCH_CHECK(step >= 1, "masked_adamw_: steps[", i, "] must be >= 1 (the step being taken), got ", step);
    const double bc1 = 1.0 - std::pow(beta1, step);
    const double bc2 = 1.0 - std::pow(beta2, step);
    const AdamWConsts c{static_cast<float>(1.0 - lr * weight_decay),
                        static_cast<float>(1.0 - beta1),
                        static_cast<float>(beta2),
                        static_cast<float>(1.0 - beta2),
                        static_cast<float>(lr / bc1),
                        static_cast<float>(std::sqrt(bc2)),
                        static_cast<float>(eps),
                        grad_mul};
    if (dtype == at::kFloat)
      dispatch_state<float>(p, g, exp_avgs[i], exp_avg_sqs[i], vmax, words, c);
    else if (dtype == at::kBFloat16)
      dispatch_state<c10::BFloat16>(p, g, exp_avgs[i], exp_avg_sqs[i], vmax, words, c);
    else
      dispatch_state<c10::Half>(p, g, exp_avgs[i], exp_avg_sqs[i], vmax, words, c);
  }
}

namespace {

template <typename T>
double masked_sq_sum(const T* g, const int32_t* frozen, int64_t n) {
  const int64_t nwords = (n + 31) / 32;
  return at::parallel_reduce(
      0, nwords, kGrain / 32, 0.0,
      [&](int64_t begin, int64_t end, double acc) {
        for (int64_t w = begin; w < end; ++w) {
          const uint32_t bits = frozen ? as_u32(frozen[w]) : 0u;
          if (bits == 0xFFFFFFFFu) continue;
          const int64_t i = w * 32;
          const int len = static_cast<int>(std::min<int64_t>(32, n - i));
          float local = 0.0f;
#pragma omp simd reduction(+ : local)
          for (int j = 0; j < len; ++j) {
            const float x = static_cast<float>(g[i + j]);
            local += ((bits >> j) & 1u) ? 0.0f : x * x;
          }
          acc += local;
        }
        return acc;
      },
      std::plus<double>());
}

}  // namespace

at::Tensor masked_grad_sq_norm(at::TensorList grads, at::TensorList frozen) {
  const int64_t T = static_cast<int64_t>(grads.size());
  TORCH_CHECK(frozen.empty() || static_cast<int64_t>(frozen.size()) == T,
              "masked_grad_sq_norm: frozen must be empty or hold one word tensor per grad, got ",
              frozen.size(), " for ", T, " grads");
  at::Tensor out = at::zeros({T}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK(grads[i].device().is_cpu(), "masked_grad_sq_norm: grads[", i, "] must be a CPU tensor");
    const at::Tensor g = grads[i].contiguous();
    const int64_t n = g.numel();
    if (n == 0) continue;
    const int32_t* words = nullptr;
    if (!frozen.empty()) {
      check_words(frozen[i], "masked_grad_sq_norm: frozen[i]");
      TORCH_CHECK(frozen[i].numel() * 32 >= n, "masked_grad_sq_norm: frozen[", i, "] has ",
                  frozen[i].numel(), " words, grads[", i, "] needs ", (n + 31) / 32);
      words = frozen[i].data_ptr<int32_t>();
    }
    double s;
    switch (g.scalar_type()) {
      case at::kFloat: s = masked_sq_sum(g.data_ptr<float>(), words, n); break;
      case at::kBFloat16: s = masked_sq_sum(g.data_ptr<c10::BFloat16>(), words, n); break;
      case at::kHalf: s = masked_sq_sum(g.data_ptr<c10::Half>(), words, n); break;
      default: TORCH_CHECK(false, "masked_grad_sq_norm: grads[", i, "] must be float32, bfloat16 or float16, got ",
                           g.dtype());
    }
    o[i] = static_cast<float>(s);
  }
  return out;
}

}  // namespace cpift

TORCH_LIBRARY_FRAGMENT(cpift, m) {
  m.def(
      "masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor[] frozen, float[] steps, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool amsgrad, bool maximize, Tensor? grad_scale) -> ()");
  m.def("masked_grad_sq_norm(Tensor[] grads, Tensor[] frozen) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpift, CPU, m) {
  m.impl("masked_adamw_", &cpift::masked_adamw_);
  m.impl("masked_grad_sq_norm", &cpift::masked_grad_sq_norm);
}
