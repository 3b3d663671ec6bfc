// Shared helpers for the cpift CPU kernels.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#endif

namespace cpift {

// Grain for at::parallel_for over words or elements: large enough to amortise thread wake-up.
constexpr int64_t kGrain = 1 << 15;

inline uint32_t as_u32(int32_t w) { return static_cast<uint32_t>(w); }

inline void check_words(const at::Tensor& words, const char* name) {
  TORCH_CHECK(words.dtype() == at::kInt, name, " must be int32 mask words, got ", words.dtype());
  TORCH_CHECK(words.dim() == 1, name, " must be 1-D, got shape ", words.sizes());
  TORCH_CHECK(words.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(words.device().is_cpu(), name, " must be a CPU tensor for the C++ kernel");
}

// ---- fp32 <-> bf16 / fp16, written once for every C++ kernel ------------------------------------
// Narrowing rounds to nearest, ties to even, with integer bit operations only (no FPU rounding mode,
// no compiler choice): the same bits as c10::BFloat16 / c10::Half, torch's casts, the hardware
// converters and the Triton kernels' helper (kernels/_common.py). NaN becomes a canonical quiet NaN:
// bf16 0x7FC0 (sign dropped, as c10::BFloat16), fp16 sign|0x7E00 (as c10::Half). Widening is exact.

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_bits_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                     // round to nearest even (overflow -> inf)
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_bits_to_f32(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

inline uint16_t f32_to_f16_bits(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 (or inf): inf
  if (a >= 0x38800000u) {  // normal half: rebias the exponent, round 13 mantissa bits away
    const uint32_t r = a - 0x38000000u + 0xfffu + ((a >> 13) & 1u);
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  if (a <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25: rounds to (signed) zero
  // subnormal half: the 24-bit significand shifted to units of 2^-24, rounded to nearest even
  const uint32_t shift = 126u - (a >> 23);  // 14..24
  const uint32_t sig = (a & 0x7fffffu) | 0x800000u;
  const uint32_t q = sig >> shift, rem = sig & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  return static_cast<uint16_t>(sign | (q + (rem > half || (rem == half && (q & 1u)))));
}

// Widen / narrow one value of a storage type (float, c10::BFloat16, c10::Half).
template <typename T> inline float widen(T x);
template <> inline float widen<float>(float x) { return x; }
template <> inline float widen<c10::BFloat16>(c10::BFloat16 x) { return bf16_bits_to_f32(x.x); }
template <> inline float widen<c10::Half>(c10::Half x) { return f16_bits_to_f32(x.x); }

template <typename T> inline T narrow(float x);
template <> inline float narrow<float>(float x) { return x; }
template <> inline c10::BFloat16 narrow<c10::BFloat16>(float x) {
  return c10::BFloat16(f32_to_bf16_bits(x), c10::BFloat16::from_bits());
}
template <> inline c10::Half narrow<c10::Half>(float x) { return c10::Half(f32_to_f16_bits(x), c10::Half::from_bits()); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// The same conversions on 16 lanes (bit-identical to the scalar helpers above).
inline __m512 bf16x16_to_f32(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

inline __m256i f32x16_to_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

inline __m512 f16x16_to_f32(__m256i h) { return _mm512_cvtph_ps(h); }

inline __m256i f32x16_to_f16(__m512 x) {
  // the hardware converter rounds to nearest even; NaN lanes made canonical (sign | 0x7E00)
  const __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m256i canon = _mm256_or_si256(_mm256_and_si256(h, _mm256_set1_epi16(static_cast<short>(0x8000))),
                                        _mm256_set1_epi16(0x7e00));
  return _mm256_mask_mov_epi16(h, nan, canon);
}
#endif

}  // namespace cpift
