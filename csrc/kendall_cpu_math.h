// The float32 math of the CPU kernel (kendall_cpu.cpp): tanh and sech^2 written so that its pair loops vectorize.
#pragma once

// always_inline: the pair loops only vectorize once these are inlined, and GCC's heuristics do not always do it.
#define RANKKD_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define RANKKD_ASSOC_BARRIER(x) __builtin_assoc_barrier(x)
#else
#define RANKKD_ASSOC_BARRIER(x) (x)
#endif

namespace rankkd {

// tanh(x) and sech^2(x) = 1 - tanh^2(x) in float from multiply-adds, one division and exponent-bit arithmetic, with
// no branch, so that compilers vectorize them at any SIMD level (no libm call in a pair loop):
//  - tanh = x P(x^2) / Q(x^2) for |x| <= 9, a [9/8] rational minimax fit made for this project (max relative error
//    3.5e-7 in float32; all coefficients are positive, so Q >= 1: no pole); beyond 9 tanh rounds to +-1 in float32,
//    so clamping the argument there is exact.
//  - sech^2 = 4 e / (1 + e)^2 with e = exp(-2|x|): full relative accuracy everywhere, also for saturated pairs, where
//    1 - tanh^2 would be all rounding error.
// Together they need one reciprocal, 1 / (Q (1 + e)^2) (at most ~1.7e3: no overflow). Measured over [-30, 30]: tanh
// within 3.5e-7 relative, sech^2 within 3.5e-7 relative. tanh and sech^2 are separate functions returning scalars
// because GCC's `omp simd` does not vectorize through aggregate or address-taken locals; once both are inlined the
// compiler computes their shared terms once.

// exp(y) for y <= 0: y = n ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (truncation < 1e-8),
// 2^n written straight into the exponent bits. Clamped at -87 (e ~ 1.6e-38) to stay clear of denormals.
RANKKD_ALWAYS_INLINE float exp_nonpositive(float y) {
  y = y < -87.0f ? -87.0f : y;
  const float n = static_cast<float>(static_cast<int>(y * 1.44269504f - 0.5f));  // round to nearest for y <= 0
  // ln2 in two parts, n * ln2_hi exact; the barrier keeps -fassociative-math from merging them back.
  const float r = RANKKD_ASSOC_BARRIER(y - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int exponent_bits = (static_cast<int>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, exponent_bits);  // not a union or memcpy: those stop vectorization
}

RANKKD_ALWAYS_INLINE float clamp_tanh_argument(float x) { return x < -9.0f ? -9.0f : (x > 9.0f ? 9.0f : x); }

RANKKD_ALWAYS_INLINE float tanh_rational_numerator(float x) {
  x = clamp_tanh_argument(x);
  const float z = x * x;
  return x * ((((1.3754580e-08f * z + 2.0902280e-05f) * z + 3.5136070e-03f) * z + 1.3396265e-01f) * z + 1.0f);
}

RANKKD_ALWAYS_INLINE float tanh_rational_denominator(float x) {
  x = clamp_tanh_argument(x);
  const float z = x * x;
  return (((7.9415872e-07f * z + 3.3149603e-04f) * z + 2.5945744e-02f) * z + 4.6729589e-01f) * z + 1.0f;
}

// tanh alone, when no sech^2 is needed.
RANKKD_ALWAYS_INLINE float rational_tanh(float x) { return tanh_rational_numerator(x) / tanh_rational_denominator(x); }

RANKKD_ALWAYS_INLINE float sech2_exp_term(float x) { return exp_nonpositive(-2.0f * (x < 0.0f ? -x : x)); }

RANKKD_ALWAYS_INLINE float tanh_sech2_reciprocal(float x) {
  const float one_plus_e = 1.0f + sech2_exp_term(x);
  return 1.0f / (tanh_rational_denominator(x) * one_plus_e * one_plus_e);
}

// tanh(x) sharing its reciprocal with accurate_sech2(x).
RANKKD_ALWAYS_INLINE float accurate_tanh(float x) {
  const float one_plus_e = 1.0f + sech2_exp_term(x);
  return tanh_rational_numerator(x) * one_plus_e * one_plus_e * tanh_sech2_reciprocal(x);
}

RANKKD_ALWAYS_INLINE float accurate_sech2(float x) {
  return 4.0f * sech2_exp_term(x) * tanh_rational_denominator(x) * tanh_sech2_reciprocal(x);
}

template <typename T>
RANKKD_ALWAYS_INLINE T sign_of(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

}  // namespace rankkd
