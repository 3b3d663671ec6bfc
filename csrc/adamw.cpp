// Masked AdamW: one fused pass over param, grad, exp_avg, exp_avg_sq (and max_exp_avg_sq) per
// tensor, with a 1-bit-per-element frozen mask (bit i of tensor t = bit i % 32 of frozen[t][i / 32]).
// masked_adamw_ema_ adds EPI's importance EMA (csrc/ema.h) to the same pass: per 256-element block,
// the EMA first (every element, from the grads and the params before the step), then the block's
// AdamW update, so g and θ are read from memory once.
//
// Trainable elements follow torch.optim.AdamW (decoupled decay first, bias correction, eps after
// sqrt), computed in fp32 whatever the storage dtype (bf16/fp16 widened, rounded once on store).
// Frozen elements are never modified: a word of 32 frozen elements is skipped entirely (no loads,
// no stores); in a mixed word only the trainable lanes are stored (AVX-512: the frozen bits are the
// inverted store mask).

// GCC 12 flags its own _mm512_undefined_ps() (self-initialised) when AVX-512 intrinsics inline.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "common.h"
#include "ema.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstring>

namespace cpift {
namespace {

struct AdamWConsts {
  float decay;        // 1 - lr * weight_decay (double, then rounded)
  float lerp_coeff;   // m <- fma(lerp_coeff, g - m, base): 1 - beta1, or (1 - beta1) - 1 when that is >= 0.5
  bool lerp_from_m;   // base = m (|1 - beta1| < 0.5), else base = g (torch's lerp_)
  float beta2;
  float one_minus_beta2;
  float step_size;    // lr / (1 - beta1^step) (double, then rounded)
  float bc2_sqrt;     // sqrt(1 - beta2^step) (double, then rounded)
  float eps;
  float grad_scale;   // grads are divided by it (1: no scaling)
  bool has_scale;
  bool maximize;
};

// The one formula, per element, in fp32, each operation rounded once. No compiler contraction (the
// build uses -ffp-contract=off); the two fused multiply-adds are explicit, where torch's compiled
// fused CPU AdamW (ATen/native/cpu/FusedAdamKernel.cpp, ADAMW mode) has them: its lerp_ is an
// explicit fmadd, and its build contracts the exp_avg_sq line into fma((1 - beta2) g, g, v beta2)
// (measured: this order reproduces its bits, the unfused one and the other contractions do not).
//   g = grad / scale; g = -g if maximize;  p = p * decay
//   m = fma(c, g - m, base)                       (exp_avg.lerp_(g, 1 - beta1))
//   v = fma((1 - beta2) * g, g, v * beta2);       vm = amsgrad ? max(vmax, v) : v
//   p = p - (step_size * m) / (sqrt(vm) / bc2_sqrt + eps)
// The Triton kernel (kernels/adamw.py) writes the same operations in the same order.
struct Moments {
  float p, m, v, vm;
};

template <bool AMSGRAD>
inline Moments adamw_math(float p, float g, float m, float v, float vmax, const AdamWConsts& c) {
  if (c.has_scale) g = g / c.grad_scale;
  if (c.maximize) g = -g;
  p = p * c.decay;
  m = std::fma(c.lerp_coeff, g - m, c.lerp_from_m ? m : g);
  v = std::fma(c.one_minus_beta2 * g, g, v * c.beta2);
  const float vm = AMSGRAD ? std::max(vmax, v) : v;
  const float denom = std::sqrt(vm) / c.bc2_sqrt + c.eps;
  p = p - c.step_size * m / denom;
  return {p, m, v, vm};
}

// Update elements [0, len) of a chunk, keeping the bits of every element whose bit in
// `frozen_bits` is set. Portable path (no AVX-512): the math loop vectorizes (no-math-errno lets
// the compiler use vector sqrt), then only trainable lanes are stored.
template <typename P, typename S, bool AMSGRAD>
__attribute__((optimize("no-math-errno"))) inline void update_chunk(
    P* __restrict p, const P* __restrict g, S* __restrict m, S* __restrict v, S* __restrict vmax,
    uint32_t frozen_bits, int len, const AdamWConsts& c) {
  Moments r[32];
#pragma omp simd
  for (int j = 0; j < len; ++j)
    r[j] = adamw_math<AMSGRAD>(widen(p[j]), widen(g[j]), widen(m[j]), widen(v[j]),
                               AMSGRAD ? widen(vmax[j]) : 0.0f, c);
  for (int j = 0; j < len; ++j) {
    if ((frozen_bits >> j) & 1u) continue;  // frozen: never written
    p[j] = narrow<P>(r[j].p);
    m[j] = narrow<S>(r[j].m);
    v[j] = narrow<S>(r[j].v);
    if constexpr (AMSGRAD) vmax[j] = narrow<S>(r[j].vm);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(CPIFT_ADAMW_NO_AVX512)
#define CPIFT_ADAMW_AVX512 1

// 16 lanes of T widened to fp32: masked load (lanes outside `k` read as 0, never touched in memory)
// and masked store (only lanes in `k` are written; the others keep their bits). Conversions are the
// common.h helpers, bit-identical to the scalar widen / narrow.
template <typename T> struct Lanes;

template <> struct Lanes<float> {
  static __m512 load(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
  static void store(float* p, __mmask16 k, __m512 x) { _mm512_mask_storeu_ps(p, k, x); }
};

template <> struct Lanes<c10::BFloat16> {
  static __m512 load(const c10::BFloat16* p, __mmask16 k) { return bf16x16_to_f32(_mm256_maskz_loadu_epi16(k, p)); }
  static void store(c10::BFloat16* p, __mmask16 k, __m512 x) { _mm256_mask_storeu_epi16(p, k, f32x16_to_bf16(x)); }
};

template <> struct Lanes<c10::Half> {
  static __m512 load(const c10::Half* p, __mmask16 k) { return f16x16_to_f32(_mm256_maskz_loadu_epi16(k, p)); }
  static void store(c10::Half* p, __mmask16 k, __m512 x) { _mm256_mask_storeu_epi16(p, k, f32x16_to_f16(x)); }
};

// adamw_math on 16 elements: `valid` lanes exist, `write` lanes (valid and trainable) are updated.
template <typename P, typename S, bool AMSGRAD>
inline void update16(P* p, const P* g, S* m, S* v, S* vmax, __mmask16 valid, __mmask16 write,
                     const AdamWConsts& c) {
  __m512 gj = Lanes<P>::load(g, valid);
  if (c.has_scale) gj = _mm512_div_ps(gj, _mm512_set1_ps(c.grad_scale));
  if (c.maximize) gj = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(gj), _mm512_set1_epi32(INT32_MIN)));
  const __m512 pj = _mm512_mul_ps(Lanes<P>::load(p, valid), _mm512_set1_ps(c.decay));
  __m512 mj = Lanes<S>::load(m, valid);
  __m512 vj = Lanes<S>::load(v, valid);
  mj = _mm512_fmadd_ps(_mm512_set1_ps(c.lerp_coeff), _mm512_sub_ps(gj, mj), c.lerp_from_m ? mj : gj);
  vj = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(c.one_minus_beta2), gj), gj,
                       _mm512_mul_ps(vj, _mm512_set1_ps(c.beta2)));
  __m512 vm = vj;
  if constexpr (AMSGRAD) {
    vm = _mm512_max_ps(Lanes<S>::load(vmax, valid), vj);
    Lanes<S>::store(vmax, write, vm);
  }
  const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vm), _mm512_set1_ps(c.bc2_sqrt)),
                                     _mm512_set1_ps(c.eps));
  Lanes<P>::store(p, write, _mm512_sub_ps(pj, _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(c.step_size), mj), denom)));
  Lanes<S>::store(m, write, mj);
  Lanes<S>::store(v, write, vj);
}
#endif

// AdamW on mask words [w0, w1) of one tensor of n elements.
template <typename P, typename S, bool AMSGRAD>
inline void step_words(P* p, const P* g, S* m, S* v, S* vmax, const int32_t* frozen, int64_t n, int64_t w0, int64_t w1,
                       const AdamWConsts& c) {
  for (int64_t w = w0; w < w1; ++w) {
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
    update_chunk<P, S, AMSGRAD>(p + i, g + i, m + i, v + i, vmax_i, bits, len, c);
#endif
  }
}

// The EMA half of the fused step: the tensor's EMA target and the call's EMA constants.
struct EmaStep {
  ema::Target target;
  const ema::Consts* consts;
};

// One tensor's step. With `ema`, the importance EMA of each 256-element block is computed first,
// from the block's grads and (not yet updated) params, then the block's 8 mask words are stepped:
// g and θ come from memory once (the AdamW half finds them in L1), and the EMA covers every element,
// frozen ones included (their grads still measure importance).
template <typename P, typename S, bool AMSGRAD>
void step_tensor(P* p, const P* g, S* m, S* v, S* vmax, const int32_t* frozen, int64_t n, const AdamWConsts& c,
                 const EmaStep* ema) {
  const int64_t nwords = (n + 31) / 32;
  if (ema == nullptr) {
    at::parallel_for(0, nwords, kGrain / 32, [&](int64_t begin, int64_t end) {
      step_words<P, S, AMSGRAD>(p, g, m, v, vmax, frozen, n, begin, end, c);
    });
    return;
  }
  constexpr int64_t kWordsPerBlock = ema::kQBlock / 32;
  const int64_t nblocks = (n + ema::kQBlock - 1) / ema::kQBlock;
  at::parallel_for(0, nblocks, kGrain / ema::kQBlock, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      ema::blocks<P>(ema->target, g, p, n, b, b + 1, *ema->consts);
      step_words<P, S, AMSGRAD>(p, g, m, v, vmax, frozen, n, b * kWordsPerBlock,
                                std::min(nwords, (b + 1) * kWordsPerBlock), c);
    }
  });
}

// Per-tensor scalars of the step, in float64 and rounded to float once, as torch's fused AdamW:
// step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t), decay = 1 - lr * weight_decay.
// Computed with the same ATen ops (at::pow, float64) as the Triton launcher's step_scalars, so both
// backends start from the same bits.
struct StepScalars {
  at::Tensor steps_t, step_size_t, bc2_sqrt_t;
  const float* steps;
  const float* step_size;
  const float* bc2_sqrt;
  float decay;
};

StepScalars step_scalars(const at::Tensor& steps, const at::Tensor& lr, double beta1, double beta2,
                         double weight_decay) {
  StepScalars s;
  const at::Tensor t = steps.to(at::kCPU, at::kDouble);
  const at::Tensor lr64 = lr.to(at::kCPU, at::kDouble).reshape({1});
  s.steps_t = t.to(at::kFloat).contiguous();
  s.step_size_t = (lr64 / (1.0 - at::pow(beta1, t))).to(at::kFloat).contiguous();
  s.bc2_sqrt_t = at::sqrt(1.0 - at::pow(beta2, t)).to(at::kFloat).contiguous();
  s.steps = s.steps_t.data_ptr<float>();
  s.step_size = s.step_size_t.data_ptr<float>();
  s.bc2_sqrt = s.bc2_sqrt_t.data_ptr<float>();
  s.decay = (1.0 - lr64 * weight_decay).to(at::kFloat).item<float>();
  return s;
}

AdamWConsts make_consts(float step_size, float bc2_sqrt, float decay, double beta1, double beta2, double eps,
                        bool maximize, bool has_scale, float scale) {
  const float w = static_cast<float>(1.0 - beta1);
  const bool from_m = std::abs(w) < 0.5f;
  return AdamWConsts{decay,
                     from_m ? w : w - 1.0f,
                     from_m,
                     static_cast<float>(beta2),
                     static_cast<float>(1.0 - beta2),
                     step_size,
                     bc2_sqrt,
                     static_cast<float>(eps),
                     scale,
                     has_scale,
                     maximize};
}

template <typename P, typename S>
void dispatch_amsgrad(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                      const at::Tensor* vmax, const int32_t* frozen, const AdamWConsts& c, const EmaStep* ema) {
  S* vmax_ptr = vmax ? vmax->data_ptr<S>() : nullptr;
  if (vmax)
    step_tensor<P, S, true>(p.data_ptr<P>(), g.data_ptr<P>(), m.data_ptr<S>(), v.data_ptr<S>(), vmax_ptr,
                            frozen, p.numel(), c, ema);
  else
    step_tensor<P, S, false>(p.data_ptr<P>(), g.data_ptr<P>(), m.data_ptr<S>(), v.data_ptr<S>(), nullptr,
                             frozen, p.numel(), c, ema);
}

template <typename P>
void dispatch_state(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                    const at::Tensor* vmax, const int32_t* frozen, const AdamWConsts& c, const EmaStep* ema) {
  if (m.scalar_type() == at::kFloat)
    dispatch_amsgrad<P, float>(p, g, m, v, vmax, frozen, c, ema);
  else
    dispatch_amsgrad<P, P>(p, g, m, v, vmax, frozen, c, ema);
}

void check_same(const at::Tensor& t, const at::Tensor& p, const char* what, int64_t i) {
  TORCH_CHECK(t.device().is_cpu(), "masked_adamw_: ", what, "[", i, "] must be a CPU tensor");
  TORCH_CHECK(t.numel() == p.numel(), "masked_adamw_: ", what, "[", i, "] has ", t.numel(),
              " elements, params[", i, "] has ", p.numel());
  TORCH_CHECK(t.is_contiguous(), "masked_adamw_: ", what, "[", i, "] must be contiguous");
}

}  // namespace

namespace {

// The EMA arguments of the fused op (absent for masked_adamw_).
struct EmaArgs {
  at::TensorList state, scales;
  double beta;
  int64_t signal, seed;
  at::IntArrayRef ids;
};

void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList frozen, const at::Tensor& steps, const at::Tensor& lr,
                double beta1, double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                const EmaArgs* ema_args) {
  const int64_t T = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == T && static_cast<int64_t>(exp_avgs.size()) == T &&
                  static_cast<int64_t>(exp_avg_sqs.size()) == T && steps.dim() == 1 && steps.numel() == T,
              "masked_adamw_: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length (",
              T, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.sizes(), ")");
  TORCH_CHECK(lr.numel() == 1, "masked_adamw_: lr must hold one value, got shape ", lr.sizes());
  if (found_inf.has_value() && found_inf->to(at::kCPU).item<double>() != 0.0) return;  // GradScaler: skip
  TORCH_CHECK(!amsgrad || static_cast<int64_t>(max_exp_avg_sqs.size()) == T,
              "masked_adamw_: amsgrad needs one max_exp_avg_sq per param, got ", max_exp_avg_sqs.size());
  TORCH_CHECK(frozen.empty() || static_cast<int64_t>(frozen.size()) == T,
              "masked_adamw_: frozen must be empty (nothing frozen) or hold one word tensor per param, got ",
              frozen.size(), " for ", T, " params");
  float scale = 1.0f;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == 1, "masked_adamw_: grad_scale must hold one value");
    scale = grad_scale->to(at::kCPU).item<float>();
  }
  const StepScalars scalars = step_scalars(steps, lr, beta1, beta2, weight_decay);
  ema::Consts ema_consts{};
  if (ema_args) {
    TORCH_CHECK(static_cast<int64_t>(ema_args->state.size()) == T && (ema_args->ids.empty() ||
                    static_cast<int64_t>(ema_args->ids.size()) == T),
                "masked_adamw_ema_: ema_state and ema_ids must hold one entry per param (", T, "), got ",
                ema_args->state.size(), " and ", ema_args->ids.size());
    ema_consts = ema::consts(ema_args->beta, ema_args->signal, grad_scale);
  }
  int64_t next_scale = 0;  // ema_scales holds one tensor per uint8 state tensor, in order
  for (int64_t i = 0; i < T; ++i) {
    EmaStep ema_step{};
    if (ema_args) {
      const at::Tensor& s = ema_args->state[i];
      TORCH_CHECK(s.device().is_cpu() && s.is_contiguous() && s.numel() == params[i].numel(),
                  "masked_adamw_ema_: ema_state[", i, "] must be a contiguous CPU tensor of ", params[i].numel(),
                  " elements");
      float* sc = s.scalar_type() == at::kByte ? ema_args->scales[next_scale++].data_ptr<float>() : nullptr;
      ema_step = EmaStep{ema::target(s, sc, ema::stream_of(ema_args->seed, ema_args->ids, i)), &ema_consts};
    }
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
    TORCH_CHECK(scalars.steps[i] >= 1, "masked_adamw_: steps[", i, "] must be >= 1 (the step being taken), got ",
                scalars.steps[i]);
    const AdamWConsts c = make_consts(scalars.step_size[i], scalars.bc2_sqrt[i], scalars.decay, beta1, beta2, eps,
                                      maximize, grad_scale.has_value(), scale);
    const EmaStep* ema = ema_args ? &ema_step : nullptr;
    if (dtype == at::kFloat)
      dispatch_state<float>(p, g, exp_avgs[i], exp_avg_sqs[i], vmax, words, c, ema);
    else if (dtype == at::kBFloat16)
      dispatch_state<c10::BFloat16>(p, g, exp_avgs[i], exp_avg_sqs[i], vmax, words, c, ema);
    else
      dispatch_state<c10::Half>(p, g, exp_avgs[i], exp_avg_sqs[i], vmax, words, c, ema);
  }
}

}  // namespace

void masked_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList frozen,
                   const at::Tensor& steps, const at::Tensor& lr, double beta1, double beta2, double weight_decay,
                   double eps, bool amsgrad, bool maximize, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2, weight_decay, eps,
             amsgrad, maximize, grad_scale, found_inf, nullptr);
}

void masked_adamw_ema_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList frozen,
                       const at::Tensor& steps, const at::Tensor& lr, double beta1, double beta2, double weight_decay,
                       double eps, bool amsgrad, bool maximize, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, at::TensorList ema_state,
                       at::TensorList ema_scales, double ema_beta, int64_t ema_signal, int64_t ema_seed,
                       at::IntArrayRef ema_ids) {
  const EmaArgs args{ema_state, ema_scales, ema_beta, ema_signal, ema_seed, ema_ids};
  adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2, weight_decay, eps,
             amsgrad, maximize, grad_scale, found_inf, &args);
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

// Schemas live in cpift_fast/ops/ (Python); this file registers only its CPU kernels.
TORCH_LIBRARY_IMPL(cpift, CPU, m) {
  m.impl("masked_adamw_", &cpift::masked_adamw_);
  m.impl("masked_adamw_ema_", &cpift::masked_adamw_ema_);
  m.impl("masked_grad_sq_norm", &cpift::masked_grad_sq_norm);
}
