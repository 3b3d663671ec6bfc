// Shared helpers for the cpift CPU kernels (compiled into each capability's namespace: dispatch.h).
#pragma once
#include "dispatch.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace cpift::CPIFT_CAP {

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
// converters and the Triton kernels' helper (cpift_fast/kernels/_common.py). NaN becomes a canonical quiet NaN:
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

// ---- kLanes values of a storage type <-> one Vectorized<float> (this capability's width) ----------
// Lanes<T>::load widens kLanes values. Lanes<T>::store2 narrows two vectors (2 * kLanes values, so a
// narrowing store packs both halves at once) and writes them, except the values whose bit in `keep`
// is set (bit j: value j): those keep their bits in memory (AVX-512: a masked store; elsewhere the old
// values are blended back in, at the storage width, so even a NaN payload survives). Both are
// bit-identical to widen / narrow above.
using Vec = at::vec::Vectorized<float>;
constexpr int kLanes = Vec::size();

template <typename T> struct Lanes;

#if defined(CPU_CAPABILITY_AVX512)
inline __m512 bf16x16_to_f32(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

inline __m256i f32x16_to_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

inline __m256i f32x16_to_f16(__m512 x) {
  // the hardware converter rounds to nearest even; NaN lanes made canonical (sign | 0x7E00)
  const __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m256i canon = _mm256_or_si256(_mm256_and_si256(h, _mm256_set1_epi16(static_cast<short>(0x8000))),
                                        _mm256_set1_epi16(0x7e00));
  return _mm256_mask_mov_epi16(h, nan, canon);
}

// 32 16-bit values, all but those whose bit in `keep` is set.
inline void store16x32(void* p, __m256i lo, __m256i hi, uint32_t keep) {
  _mm512_mask_storeu_epi16(p, static_cast<__mmask32>(~keep), _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
}

template <> struct Lanes<float> {
  static Vec load(const float* p) { return Vec::loadu(p); }
  static void store2(float* p, const Vec& x0, const Vec& x1, uint32_t keep) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>(~keep), x0);
    _mm512_mask_storeu_ps(p + 16, static_cast<__mmask16>(~keep >> 16), x1);
  }
};

template <> struct Lanes<c10::BFloat16> {
  static Vec load(const c10::BFloat16* p) { return bf16x16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store2(c10::BFloat16* p, const Vec& x0, const Vec& x1, uint32_t keep) {
    store16x32(p, f32x16_to_bf16(x0), f32x16_to_bf16(x1), keep);
  }
};

template <> struct Lanes<c10::Half> {
  static Vec load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store2(c10::Half* p, const Vec& x0, const Vec& x1, uint32_t keep) {
    store16x32(p, f32x16_to_f16(x0), f32x16_to_f16(x1), keep);
  }
};

#elif defined(CPU_CAPABILITY_AVX2)
// bf16 bits of 8 floats, rounded to nearest even, in the low half of each 32-bit lane.
inline __m256i f32x8_to_bf16_in_32(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}

// 16 floats to bf16: packus works per 128-bit half, the permute puts the halves in order.
inline __m256i f32x16_to_bf16(__m256 lo, __m256 hi) {
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(f32x8_to_bf16_in_32(lo), f32x8_to_bf16_in_32(hi)), 0xD8);
}

inline __m128i f32x8_to_f16(__m256 x) {
  const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i nan32 = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  const __m128i nan = _mm_packs_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
  const __m128i canon = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0x8000))), _mm_set1_epi16(0x7e00));
  return _mm_blendv_epi8(h, canon, nan);
}

// All-ones 32-bit lanes where bit j of `bits` is set (j < 8).
inline __m256 keep32(uint32_t bits) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), sel), sel));
}

// All-ones 16-bit lanes where bit j of `bits` is set (j < 16).
inline __m256i keep16(uint32_t bits) {
  const __m256i sel = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                        static_cast<short>(0x8000));
  return _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16(static_cast<short>(bits)), sel), sel);
}

inline void store16x16(void* p, __m256i h, uint32_t keep) {
  __m256i* q = static_cast<__m256i*>(p);
  _mm256_storeu_si256(q, keep ? _mm256_blendv_epi8(h, _mm256_loadu_si256(q), keep16(keep)) : h);
}

template <> struct Lanes<float> {
  static Vec load(const float* p) { return Vec::loadu(p); }
  static void store2(float* p, const Vec& x0, const Vec& x1, uint32_t keep) {
    _mm256_storeu_ps(p, keep & 0xFFu ? _mm256_blendv_ps(x0, _mm256_loadu_ps(p), keep32(keep)) : __m256(x0));
    _mm256_storeu_ps(p + 8, keep >> 8 ? _mm256_blendv_ps(x1, _mm256_loadu_ps(p + 8), keep32(keep >> 8)) : __m256(x1));
  }
};

template <> struct Lanes<c10::BFloat16> {
  static Vec load(const c10::BFloat16* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  static void store2(c10::BFloat16* p, const Vec& x0, const Vec& x1, uint32_t keep) {
    store16x16(p, f32x16_to_bf16(x0, x1), keep);
  }
};

template <> struct Lanes<c10::Half> {
  static Vec load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store2(c10::Half* p, const Vec& x0, const Vec& x1, uint32_t keep) {
    store16x16(p, _mm256_set_m128i(f32x8_to_f16(x1), f32x8_to_f16(x0)), keep);
  }
};

#else  // DEFAULT: lane by lane
template <typename T> struct Lanes {
  static Vec load(const T* p) {
    float x[kLanes];
    for (int j = 0; j < kLanes; ++j) x[j] = widen<T>(p[j]);
    return Vec::loadu(x);
  }
  // Branch-free, as the AVX2 blend: a kept value is written back with its own bits (a branch per
  // value mispredicts on a random mask).
  static void store2(T* p, const Vec& v0, const Vec& v1, uint32_t keep) {
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
    float x[2 * kLanes];
    v0.store(x);
    v1.store(x + kLanes);
    for (int j = 0; j < 2 * kLanes; ++j) {
      const T fresh = narrow<T>(x[j]);
      Bits old_bits, new_bits;
      std::memcpy(&old_bits, p + j, sizeof(Bits));
      std::memcpy(&new_bits, &fresh, sizeof(Bits));
      const Bits kept = static_cast<Bits>(0u - ((keep >> j) & 1u));
      const Bits out = static_cast<Bits>((old_bits & kept) | (new_bits & ~kept));
      std::memcpy(p + j, &out, sizeof(Bits));
    }
  }
};
#endif

#if !defined(__FMA__) && !defined(__ARM_FEATURE_FMA)
// fma(a, b, c) rounded once without an FMA instruction (baseline x86-64; libm's fmaf is a call per
// element): a * b is exact in double; a * b + c rounded to odd in double, then to float, is the
// correctly rounded result (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums: proved
// algorithms using rounding to odd", IEEE Trans. Computers 57(4), 2008). Round to odd from round to
// nearest: s = RN(x), e = x - s exactly (TwoSum); if e != 0 and s is even, step s one ulp toward x.
inline float fma_by_rounding_to_odd(float a, float b, float c) {
  const double p = static_cast<double>(a) * static_cast<double>(b), cd = c;
  const double s = p + cd;
  const double t = s - p;
  const double e = (p - (s - t)) + (cd - t);
  uint64_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  const bool inexact = e != 0.0 && (bits & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;  // not inf/NaN
  const uint64_t away = (e > 0.0) == (s > 0.0) ? 1u : ~uint64_t{0};  // +1 ulp in magnitude, or -1
  bits += (inexact && !(bits & 1u)) ? away : 0u;
  double odd;
  std::memcpy(&odd, &bits, sizeof odd);
  return static_cast<float>(odd);
}
#endif

// fma(a, b, c) rounded once, on every lane. ATen's generic (DEFAULT) fmadd is a * b + c, rounded twice.
inline Vec fused_multiply_add(const Vec& a, const Vec& b, const Vec& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::fmadd(a, b, c);
#else
  float x[kLanes], y[kLanes], z[kLanes];
  a.store(x);
  b.store(y);
  c.store(z);
  for (int j = 0; j < kLanes; ++j) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
    x[j] = std::fma(x[j], y[j], z[j]);
#else
    x[j] = fma_by_rounding_to_odd(x[j], y[j], z[j]);
#endif
  }
  return Vec::loadu(x);
#endif
}

}  // namespace cpift::CPIFT_CAP
