// Masked AdamW: one fused pass over param, grad, exp_avg, exp_avg_sq (and max_exp_avg_sq) per
// tensor, with a 1-bit-per-element frozen mask (bit i of tensor t = bit i % 32 of frozen[t][i / 32]).
// masked_adamw_ema_ adds EPI's importance EMA (csrc/ema.h) to the same pass: per 256-element block,
// the EMA first (every element, from the grads and the params before the step), then the block's
// AdamW update, so g and θ are read from memory once.
//
// Trainable elements follow torch.optim.AdamW (decoupled decay first, bias correction, eps after
// sqrt), computed in fp32 whatever the storage dtype (bf16/fp16 widened, rounded once on store), on
// ATen's Vectorized<float> of the capability this file is compiled for (dispatch.h). Frozen elements
// are never modified: a vector of frozen lanes is skipped entirely (no loads, no stores); in a mixed
// one only the trainable lanes are written (common.h, Lanes<T>::store2).
//
// All tensors of a call are one work list of chunks over their elements, run by one at::parallel_for:
// many small tensors keep every core busy as one large tensor does.
// GCC 12 flags its own _mm512_undefined_ps() (self-initialised) when AVX-512 intrinsics inline.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "common.h"
#include "ema.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace cpift::CPIFT_CAP {
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
// The Triton kernel (cpift_fast/kernels/adamw.py) writes the same operations in the same order.
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

// adamw_math on kLanes elements, each operation rounded once as in the scalar version.
template <bool AMSGRAD>
inline void adamw_vec(Vec& p, Vec g, Vec& m, Vec& v, Vec& vm, const AdamWConsts& c) {
  if (c.has_scale) g = g / Vec(c.grad_scale);
  if (c.maximize) g = g.neg();
  p = p * Vec(c.decay);
  m = fused_multiply_add(Vec(c.lerp_coeff), g - m, c.lerp_from_m ? m : g);
  v = fused_multiply_add(Vec(c.one_minus_beta2) * g, g, v * Vec(c.beta2));
  vm = AMSGRAD ? at::vec::maximum(vm, v) : v;
  const Vec denom = vm.sqrt() / Vec(c.bc2_sqrt) + Vec(c.eps);
  p = p - Vec(c.step_size) * m / denom;
}

// The EMA half of the fused step: the tensor's EMA target and the call's EMA constants.
struct EmaStep {
  ema::Target target;
  const ema::Consts* consts;
};

// One tensor of the call.
struct Job {
  void (*run)(const Job&, int64_t, int64_t);  // step_range<P, S, AMSGRAD>
  void *p, *m, *v, *vmax;
  const void* g;
  const int32_t* frozen;  // null: nothing frozen
  int64_t n;
  AdamWConsts c;
  EmaStep ema;  // ema.consts null: no EMA
};

// kStep = two vectors of elements, keeping those whose bit in `keep` is set (bit j: element j). Two at
// a time so that narrowing stores pack both halves into one (Lanes<T>::store2).
constexpr int kStep = 2 * kLanes;
static_assert(32 % kStep == 0, "a mask word must hold whole steps");

template <typename P, typename S, bool AMSGRAD>
inline void step_vectors(P* p, const P* g, S* m, S* v, S* vmax, uint32_t keep, const AdamWConsts& c) {
  Vec p0 = Lanes<P>::load(p), m0 = Lanes<S>::load(m), v0 = Lanes<S>::load(v);
  Vec p1 = Lanes<P>::load(p + kLanes), m1 = Lanes<S>::load(m + kLanes), v1 = Lanes<S>::load(v + kLanes);
  Vec vm0 = AMSGRAD ? Lanes<S>::load(vmax) : v0, vm1 = AMSGRAD ? Lanes<S>::load(vmax + kLanes) : v1;
  adamw_vec<AMSGRAD>(p0, Lanes<P>::load(g), m0, v0, vm0, c);
  adamw_vec<AMSGRAD>(p1, Lanes<P>::load(g + kLanes), m1, v1, vm1, c);
  Lanes<P>::store2(p, p0, p1, keep);
  Lanes<S>::store2(m, m0, m1, keep);
  Lanes<S>::store2(v, v0, v1, keep);
  if constexpr (AMSGRAD) Lanes<S>::store2(vmax, vm0, vm1, keep);
}

// Elements [i, i + len) of one tensor, len <= 32, keeping those whose bit in `frozen` is set.
template <typename P, typename S, bool AMSGRAD>
inline void step_word(P* p, const P* g, S* m, S* v, S* vmax, uint32_t frozen, int len, const AdamWConsts& c) {
  if (len == 32) {
    for (int k = 0; k < 32; k += kStep) {
      const uint32_t keep = static_cast<uint32_t>((static_cast<uint64_t>(frozen) >> k) & ((1ull << kStep) - 1));
      if (keep != (1ull << kStep) - 1)
        step_vectors<P, S, AMSGRAD>(p + k, g + k, m + k, v + k, AMSGRAD ? vmax + k : nullptr, keep, c);
    }
    return;
  }
  for (int j = 0; j < len; ++j) {  // a tensor's last, partial word
    if ((frozen >> j) & 1u) continue;
    const Moments r = adamw_math<AMSGRAD>(widen(p[j]), widen(g[j]), widen(m[j]), widen(v[j]),
                                          AMSGRAD ? widen(vmax[j]) : 0.0f, c);
    p[j] = narrow<P>(r.p);
    m[j] = narrow<S>(r.m);
    v[j] = narrow<S>(r.v);
    if constexpr (AMSGRAD) vmax[j] = narrow<S>(r.vm);
  }
}

// Elements [begin, end) of one tensor (begin a multiple of 256). With an EMA, each 256-element
// block's EMA is computed first, from its grads and (not yet updated) params, then the block is
// stepped: g and θ come from memory once (the AdamW half finds them in L1), and the EMA covers every
// element, frozen ones included (their grads still measure importance).
template <typename P, typename S, bool AMSGRAD>
void step_range(const Job& job, int64_t begin, int64_t end) {
  P* p = static_cast<P*>(job.p);
  const P* g = static_cast<const P*>(job.g);
  S* m = static_cast<S*>(job.m);
  S* v = static_cast<S*>(job.v);
  S* vmax = static_cast<S*>(job.vmax);
  const AdamWConsts c = job.c;  // a local: the compiler keeps it in registers across the stores
  for (int64_t b = begin; b < end; b += ema::kQBlock) {
    const int64_t b_end = std::min(end, b + ema::kQBlock);
    if (job.ema.consts != nullptr)
      ema::blocks<P>(job.ema.target, g, p, job.n, b / ema::kQBlock, b / ema::kQBlock + 1, *job.ema.consts);
    uint32_t any_frozen = 0;
    for (int64_t w = b / 32; job.frozen && w < (b_end + 31) / 32; ++w) any_frozen |= as_u32(job.frozen[w]);
    if (any_frozen == 0 && b_end - b == ema::kQBlock) {  // a whole block to update: no per-word tests
      for (int64_t i = b; i < b_end; i += kStep)
        step_vectors<P, S, AMSGRAD>(p + i, g + i, m + i, v + i, AMSGRAD ? vmax + i : nullptr, 0u, c);
      continue;
    }
    for (int64_t i = b; i < b_end; i += 32) {
      const uint32_t frozen = job.frozen ? as_u32(job.frozen[i / 32]) : 0u;
      if (frozen == 0xFFFFFFFFu) continue;
      step_word<P, S, AMSGRAD>(p + i, g + i, m + i, v + i, AMSGRAD ? vmax + i : nullptr, frozen,
                               static_cast<int>(std::min<int64_t>(32, job.n - i)), c);
    }
  }
}

template <typename P, typename S>
auto* step_fn(bool amsgrad) {
  return amsgrad ? &step_range<P, S, true> : &step_range<P, S, false>;
}

// Elements per work item: a multiple of the EMA block; small enough that tensors of a few chunks
// spread over the cores, large enough to amortise the dispatch.
constexpr int64_t kChunk = 1 << 15;

void run_jobs(const std::vector<Job>& jobs) {
  std::vector<int64_t> first(jobs.size() + 1, 0);  // first[t]: index of tensor t's first chunk
  for (size_t t = 0; t < jobs.size(); ++t) first[t + 1] = first[t] + (jobs[t].n + kChunk - 1) / kChunk;
  at::parallel_for(0, first.back(), 1, [&](int64_t c0, int64_t c1) {
    size_t t = std::upper_bound(first.begin(), first.end(), c0) - first.begin() - 1;
    for (int64_t c = c0; c < c1; ++c) {
      while (c >= first[t + 1]) ++t;
      const Job& job = jobs[t];
      const int64_t begin = (c - first[t]) * kChunk;
      job.run(job, begin, std::min(job.n, begin + kChunk));
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
  std::vector<Job> jobs;
  std::vector<at::Tensor> contiguous_grads;  // alive until the jobs ran
  jobs.reserve(T);
  contiguous_grads.reserve(T);
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
    const at::Tensor& g = contiguous_grads.emplace_back(grads[i].contiguous());
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
    const bool f32_state = sdtype == at::kFloat;
    auto run = dtype == at::kFloat ? step_fn<float, float>(amsgrad)
               : dtype == at::kBFloat16 ? (f32_state ? step_fn<c10::BFloat16, float>(amsgrad)
                                                     : step_fn<c10::BFloat16, c10::BFloat16>(amsgrad))
                                        : (f32_state ? step_fn<c10::Half, float>(amsgrad)
                                                     : step_fn<c10::Half, c10::Half>(amsgrad));
    jobs.push_back(Job{run, p.data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                       vmax ? vmax->data_ptr() : nullptr, g.data_ptr(), words, p.numel(), c, ema_step});
  }
  run_jobs(jobs);
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

}  // namespace cpift::CPIFT_CAP

// Schemas live in cpift_fast/ops/ (Python). The DEFAULT compile registers the CPU kernels, each calling
// the copy of the capability in use (dispatch.h).
#ifdef CPIFT_REGISTERS
CPIFT_DECLARE_CAPS(masked_adamw_)
CPIFT_DECLARE_CAPS(masked_adamw_ema_)
CPIFT_DECLARE_CAPS(masked_grad_sq_norm)
TORCH_LIBRARY_IMPL(cpift, CPU, m) {
  m.impl("masked_adamw_", CPIFT_KERNEL(masked_adamw_));
  m.impl("masked_adamw_ema_", CPIFT_KERNEL(masked_adamw_ema_));
  m.impl("masked_grad_sq_norm", CPIFT_KERNEL(masked_grad_sq_norm));
}
#endif
