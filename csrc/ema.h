// The importance EMA's per-block math (EPI), shared by the standalone op (csrc/importance.cpp) and
// the fused AdamW + EMA step (csrc/adamw.cpp). The math, the state formats and the random stream are
// the op's (cpift_fast/ops/importance.py), operation for operation, so every backend stores the
// same bits:
//   g = fp32(grad) [/ grad_scale];  s = |g·θ| | g·g | |g|;  x = fp32(β)·I + fp32(1 − β)·s  (no FMA)
//   fp32 state: x;  bf16 state: (bits(x) + r16) with the low 16 bits dropped (stochastic rounding);
//   uint8 state: per block of 256, step = max(x) / 255, q = min(floor(x / step + u), 255).
// Random bits of element j of a tensor whose stream is `stream`: hash32(lo32(j) ^ stream ^ hash32(hi32(j))),
// stream = tensor_seed(seed, id) with id the tensor's id in the call (its position, or ids[i]).
#pragma once
#include "common.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

namespace cpift::CPIFT_CAP::ema {

constexpr int64_t kQBlock = 256;  // elements per scale of the 8-bit state (ops/importance.py QBLOCK)

inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x1B873593u;
  return x ^ (x >> 16);
}

inline uint32_t tensor_seed(uint32_t seed, int64_t id) { return hash32(seed ^ hash32(static_cast<uint32_t>(id + 1))); }

// stream ^ hash32(hi32(j)) is the same for every element of a 256-block (2^32 is a multiple of 256):
// a block computes it once.
inline uint32_t block_key(uint32_t stream, int64_t j) {
  return stream ^ hash32(static_cast<uint32_t>(static_cast<uint64_t>(j) >> 32));
}

inline uint32_t random_bits(uint32_t key, int64_t j) { return hash32(static_cast<uint32_t>(j) ^ key); }

struct Consts {
  float beta, rest, grad_scale;  // rest = fp32(1 − β); grad_scale: GradScaler's scale (1 without one)
  bool has_scale;
  int64_t signal;  // 0 |g·θ|, 1 g², 2 |g|
};

// One tensor's EMA state: float32, bfloat16 or uint8 codes (+ one float32 step per 256-block).
struct Target {
  void* state = nullptr;
  float* scales = nullptr;
  at::ScalarType dtype = at::kFloat;
  uint32_t stream = 0;
};

inline Target target(const at::Tensor& state, float* scales, uint32_t stream) {
  return Target{state.data_ptr(), scales, state.scalar_type(), stream};
}

inline float signal_of(float g, float p, int64_t signal) {
  if (signal == 0) return std::fabs(g * p);
  if (signal == 1) return g * g;
  return std::fabs(g);
}

template <typename P>
inline float value(const P* g, const P* p, int64_t j, float old, const Consts& c) {
  float gj = widen<P>(g[j]);
  if (c.has_scale) gj = gj / c.grad_scale;
  const float s = signal_of(gj, widen<P>(p[j]), c.signal);
  const float a = old * c.beta;
  const float b = s * c.rest;
  return a + b;
}

// Elements [begin, end) of one tensor with float32 or bfloat16 state; [begin, end) lies in one 256-block.
template <typename P, typename S>
void float_block(S* state, const P* g, const P* p, int64_t begin, int64_t end, uint32_t stream, const Consts& c) {
  const uint32_t key = block_key(stream, begin);
  for (int64_t j = begin; j < end; ++j) {
    const float x = value<P>(g, p, j, widen<S>(state[j]), c);
    if constexpr (std::is_same_v<S, float>) {
      state[j] = x;
    } else {
      const uint32_t rounded = ((f32_bits(x) + (random_bits(key, j) >> 16)) & 0xFFFF0000u) >> 16;
      const uint16_t bits = std::isnan(x) ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
      state[j] = c10::BFloat16(bits, c10::BFloat16::from_bits());
    }
  }
}

// Codes of one block: q = min(max(floor(y), 0), 255), y = x / step + u, u = random_bits(key, begin + k)
// / 2^32 in 24 bits. Written as trunc(min(y, 255)) then max(·, 0) — equal for every non-NaN y
// (trunc = floor for y >= 0; both give 0 below 0) — which GCC vectorizes (std::floor blocks the
// vectorizer unless trapping math is off).
inline void quantize(const float* __restrict x, uint8_t* __restrict qb, int len, float step, uint32_t key,
                     int64_t begin) {
  for (int k = 0; k < len; ++k) {
    const int32_t r = static_cast<int32_t>(random_bits(key, begin + k) >> 8);  // < 2^24: exact in float
    const float y = x[k] / step + static_cast<float>(r) * 0x1p-24f;
    qb[k] = static_cast<uint8_t>(std::max(static_cast<int32_t>(std::min(y, 255.0f)), 0));
  }
}

// Block b of one tensor with 8-bit state: codes and its step.
template <typename P>
void uint8_block(uint8_t* q, float* scales, const P* g, const P* p, int64_t b, int64_t n, uint32_t stream,
                 const Consts& c) {
  const int64_t begin = b * kQBlock, end = std::min(n, begin + kQBlock);
  float x[kQBlock];
  const float old_step = scales[b];
  // Importance is >= 0 and never -0.0 (a sum of non-negative products; NaN is outside the
  // contract), so the order of the values is the integer order of their bits: an integer max,
  // which vectorizes (a float max reduction does not, without -ffast-math).
  int32_t top_bits = end - begin < kQBlock ? 0 : INT32_MIN;  // a short block's padding holds zeros
  for (int64_t j = begin; j < end; ++j) {
    const float v = value<P>(g, p, j, static_cast<float>(q[j]) * old_step, c);
    x[j - begin] = v;
    top_bits = std::max(top_bits, static_cast<int32_t>(f32_bits(v)));
  }
  const float step = f32_from_bits(static_cast<uint32_t>(top_bits)) / 255.0f;
  scales[b] = step;
  if (!(step > 0.0f)) {  // an all-zero block: every code 0
    std::fill(q + begin, q + end, uint8_t{0});
    return;
  }
  quantize(x, q + begin, static_cast<int>(end - begin), step, block_key(stream, begin), begin);
}

// 256-blocks [b0, b1) of one tensor of n elements (params and grads of type P).
template <typename P>
void blocks(const Target& t, const P* g, const P* p, int64_t n, int64_t b0, int64_t b1, const Consts& c) {
  if (t.dtype == at::kByte) {
    for (int64_t b = b0; b < b1; ++b) uint8_block<P>(static_cast<uint8_t*>(t.state), t.scales, g, p, b, n, t.stream, c);
    return;
  }
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * kQBlock, end = std::min(n, begin + kQBlock);
    if (t.dtype == at::kFloat)
      float_block<P, float>(static_cast<float*>(t.state), g, p, begin, end, t.stream, c);
    else
      float_block<P, c10::BFloat16>(static_cast<c10::BFloat16*>(t.state), g, p, begin, end, t.stream, c);
  }
}

// The call's constants: beta, signal and GradScaler's scale.
inline Consts consts(double beta, int64_t signal, const std::optional<at::Tensor>& grad_scale) {
  Consts c{static_cast<float>(beta), static_cast<float>(1.0 - beta), 1.0f, grad_scale.has_value(), signal};
  if (c.has_scale) c.grad_scale = grad_scale->to(at::kCPU, at::kFloat).item<float>();
  return c;
}

// Tensor i's stream: its id (ids[i], or i when ids is empty) hashed with the call's seed.
inline uint32_t stream_of(int64_t seed, at::IntArrayRef ids, int64_t i) {
  return tensor_seed(static_cast<uint32_t>(seed), ids.empty() ? i : ids[i]);
}

}  // namespace cpift::CPIFT_CAP::ema
