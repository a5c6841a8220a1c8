// Shared math of the Kendall rank loss kernels (CPU and CUDA).
//
// One row of n logits (student s, teacher t), steepness k, c = 2 / (n (n - 1)):
//   L        = 1 - c * sum_{i<j} tanh(k (s_i - s_j)) * g(t_i - t_j)
//   dL/ds_i  = -c k sum_{j != i} sech^2(k (s_i - s_j)) g(t_i - t_j)
//   dL/dt_i  = -c k sum_{j != i} tanh(k (s_i - s_j)) sech^2(k (t_i - t_j))     (g = tanh(k .) only)
// with g(x) = tanh(k x) or sign(x). Every kernel evaluates each unordered pair once and feeds both ends.
#pragma once

#if defined(__CUDACC__)
#define RANKKD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RANKKD_HOST_DEVICE inline
#endif

namespace rankkd {

// tanh(x) for float as x * P(x^2) / Q(x^2), a [9/8] rational minimax fit on [0, 9] made for this project
// (max relative error 3.5e-7, under 6 ulp, in float32 Horner evaluation). All coefficients are positive, so Q >= 1:
// no pole, and only multiply-adds plus one division, which vectorizes on any SIMD level. Beyond |x| = 9, tanh
// rounds to +-1 in float32, so clamping the argument there is exact.
RANKKD_HOST_DEVICE float rational_tanh(float x) {
  constexpr float kClamp = 9.0f;
  x = x < -kClamp ? -kClamp : (x > kClamp ? kClamp : x);
  const float z = x * x;
  const float p = (((1.3754580e-08f * z + 2.0902280e-05f) * z + 3.5136070e-03f) * z + 1.3396265e-01f) * z + 1.0f;
  const float q = (((7.9415872e-07f * z + 3.3149603e-04f) * z + 2.5945744e-02f) * z + 4.6729589e-01f) * z + 1.0f;
  return x * p / q;
}

template <typename T>
RANKKD_HOST_DEVICE T sign_of(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

// 2 / (n (n - 1)): the number of unordered pairs, inverted.
RANKKD_HOST_DEVICE double pair_scale(long long n) {
  return 2.0 / (static_cast<double>(n) * static_cast<double>(n - 1));
}

}  // namespace rankkd
