// Importance EMA (EPI): the CPU kernel of cpift::importance_ema_. The math, the state formats and the
// random stream are the op's (cpift_fast/ops/importance.py), operation for operation, so this kernel,
// the reference and the Triton kernel store the same bits:
//   g = fp32(grad) [/ grad_scale];  s = |g·θ| | g·g | |g|;  x = fp32(β)·I + fp32(1 − β)·s  (no FMA)
//   fp32 state: x;  bf16 state: (bits(x) + r16) with the low 16 bits dropped (stochastic rounding);
//   uint8 state: per block of 256, step = max(x) / 255, q = min(floor(x / step + u), 255).
// Work is split over (tensor, 256-element block) pairs of all tensors at once: many small tensors
// use every core as well as one large tensor does.
#include "common.h"

#include <algorithm>
#include <climits>
#include <type_traits>
#include <cmath>
#include <vector>

namespace cpift {
namespace {

constexpr int64_t kQBlock = 256;  // elements per scale of the 8-bit state (ops/importance.py QBLOCK)

inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x1B873593u;
  return x ^ (x >> 16);
}

inline uint32_t tensor_seed(uint32_t seed, int64_t i) { return hash32(seed ^ hash32(static_cast<uint32_t>(i + 1))); }

// hash32(lo32(j) ^ stream ^ hash32(hi32(j))): `key` = stream ^ hash32(hi32(j)) is the same for all
// elements of a 256-block (2^32 is a multiple of 256), so a block computes it once.
inline uint32_t block_key(uint32_t stream, int64_t j) {
  return stream ^ hash32(static_cast<uint32_t>(static_cast<uint64_t>(j) >> 32));
}

inline uint32_t random_bits(uint32_t key, int64_t j) { return hash32(static_cast<uint32_t>(j) ^ key); }

struct EmaConsts {
  float beta, rest, grad_scale;
  bool has_scale;
  int64_t signal;
};

inline float signal_of(float g, float p, int64_t signal) {
  if (signal == 0) return std::fabs(g * p);
  if (signal == 1) return g * g;
  return std::fabs(g);
}

template <typename P>
inline float ema_value(const P* g, const P* p, int64_t j, float old, const EmaConsts& c) {
  float gj = widen<P>(g[j]);
  if (c.has_scale) gj = gj / c.grad_scale;
  const float s = signal_of(gj, widen<P>(p[j]), c.signal);
  const float a = old * c.beta;
  const float b = s * c.rest;
  return a + b;
}

// Elements [begin, end) of one tensor with float32 or bfloat16 state; [begin, end) lies in one 256-block.
template <typename P, typename S>
void ema_float_block(S* state, const P* g, const P* p, int64_t begin, int64_t end, uint32_t stream,
                     const EmaConsts& c) {
  const uint32_t key = block_key(stream, begin);
  for (int64_t j = begin; j < end; ++j) {
    const float x = ema_value<P>(g, p, j, widen<S>(state[j]), c);
    if constexpr (std::is_same_v<S, float>) {
      state[j] = x;
    } else {
      const uint32_t rounded = ((f32_bits(x) + (random_bits(key, j) >> 16)) & 0xFFFF0000u) >> 16;
      const uint16_t bits = std::isnan(x) ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
      state[j] = c10::BFloat16(bits, c10::BFloat16::from_bits());
    }
  }
}

// Block b of one tensor with 8-bit state: codes and its step.
template <typename P>
void ema_uint8_block(uint8_t* q, float* scales, const P* g, const P* p, int64_t b, int64_t n, uint32_t stream,
                     const EmaConsts& c) {
  const int64_t begin = b * kQBlock, end = std::min(n, begin + kQBlock);
  float x[kQBlock];
  const float old_step = scales[b];
  // Importance is >= 0 and never -0.0 (a sum of non-negative products; NaN is outside the
  // contract), so the order of the values is the integer order of their bits: an integer max,
  // which vectorizes (a float max reduction does not, without -ffast-math).
  int32_t top_bits = end - begin < kQBlock ? 0 : INT32_MIN;  // a short block's padding holds zeros
  for (int64_t j = begin; j < end; ++j) {
    const float v = ema_value<P>(g, p, j, static_cast<float>(q[j]) * old_step, c);
    x[j - begin] = v;
    top_bits = std::max(top_bits, static_cast<int32_t>(f32_bits(v)));
  }
  const float step = f32_from_bits(static_cast<uint32_t>(top_bits)) / 255.0f;
  scales[b] = step;
  if (!(step > 0.0f)) {  // an all-zero block: every code 0
    std::fill(q + begin, q + end, uint8_t{0});
    return;
  }
  const uint32_t key = block_key(stream, begin);
  const int len = static_cast<int>(end - begin);
  uint8_t* qb = q + begin;
  for (int k = 0; k < len; ++k) {
    const int32_t r = static_cast<int32_t>(random_bits(key, begin + k) >> 8);  // < 2^24: exact in float
    const float y = std::floor(x[k] / step + static_cast<float>(r) * 0x1p-24f);
    qb[k] = static_cast<uint8_t>(static_cast<int32_t>(std::min(std::max(y, 0.0f), 255.0f)));
  }
}

template <typename P>
void ema_tensor_range(const at::Tensor& state, float* scales, const P* g, const P* p, int64_t n, int64_t b0,
                      int64_t b1, uint32_t stream, const EmaConsts& c) {
  if (state.scalar_type() == at::kByte) {
    uint8_t* q = state.data_ptr<uint8_t>();
    for (int64_t b = b0; b < b1; ++b) ema_uint8_block<P>(q, scales, g, p, b, n, stream, c);
    return;
  }
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * kQBlock, end = std::min(n, begin + kQBlock);
    if (state.scalar_type() == at::kFloat)
      ema_float_block<P, float>(state.data_ptr<float>(), g, p, begin, end, stream, c);
    else
      ema_float_block<P, c10::BFloat16>(state.data_ptr<c10::BFloat16>(), g, p, begin, end, stream, c);
  }
}

void importance_ema_(at::TensorList state, at::TensorList scales, at::TensorList grads, at::TensorList params,
                     double beta, int64_t signal, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;  // GradScaler's skipped step
  EmaConsts c{static_cast<float>(beta), static_cast<float>(1.0 - beta), 1.0f, grad_scale.has_value(), signal};
  if (c.has_scale) c.grad_scale = grad_scale->to(at::kFloat).item<float>();
  const int64_t T = static_cast<int64_t>(params.size());
  std::vector<at::Tensor> g(T);
  std::vector<float*> sc(T, nullptr);
  std::vector<int64_t> first(T + 1, 0);  // first[i]: index of tensor i's first block in the work list
  int64_t k = 0;
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK(params[i].device().is_cpu() && state[i].device().is_cpu(),
                "importance_ema_: the C++ kernel runs CPU tensors");
    g[i] = grads[i].contiguous();
    if (state[i].scalar_type() == at::kByte) sc[i] = scales[k++].data_ptr<float>();
    first[i + 1] = first[i] + (params[i].numel() + kQBlock - 1) / kQBlock;
  }
  const std::vector<at::Tensor> p(params.begin(), params.end());
  std::vector<at::Tensor> pc(T);
  for (int64_t i = 0; i < T; ++i) pc[i] = p[i].contiguous();
  at::parallel_for(0, first[T], 64, [&](int64_t w0, int64_t w1) {
    int64_t i = std::upper_bound(first.begin(), first.end(), w0) - first.begin() - 1;
    for (int64_t w = w0; w < w1; ++i) {
      const int64_t stop = std::min(w1, first[i + 1]);
      if (stop > w) {
        const int64_t n = pc[i].numel(), b0 = w - first[i], b1 = stop - first[i];
        const uint32_t stream = tensor_seed(static_cast<uint32_t>(seed), i);
        switch (pc[i].scalar_type()) {
          case at::kFloat:
            ema_tensor_range<float>(state[i], sc[i], g[i].data_ptr<float>(), pc[i].data_ptr<float>(), n, b0, b1,
                                    stream, c);
            break;
          case at::kBFloat16:
            ema_tensor_range<c10::BFloat16>(state[i], sc[i], g[i].data_ptr<c10::BFloat16>(),
                                            pc[i].data_ptr<c10::BFloat16>(), n, b0, b1, stream, c);
            break;
          default:
            ema_tensor_range<c10::Half>(state[i], sc[i], g[i].data_ptr<c10::Half>(), pc[i].data_ptr<c10::Half>(), n,
                                        b0, b1, stream, c);
        }
      }
      w = std::max(w, stop);
    }
  });
}

}  // namespace
}  // namespace cpift

// Schema in cpift_fast/ops/importance.py (Python); this file registers only the CPU kernel.
TORCH_LIBRARY_IMPL(cpift, CPU, m) { m.impl("importance_ema_", &cpift::importance_ema_); }
