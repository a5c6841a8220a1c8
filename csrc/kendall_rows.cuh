// The per-row passes around the pair kernel (kendall_pairs.cuh): prepare before it, finalize after it.
#pragma once

#include <cstdint>
#include <limits>

#include "kendall_pairs.cuh"

namespace rankkd {
namespace cuda {

// ---- prepare --------------------------------------------------------------------------------------------------------

// Prescaled logits are clamped to half the largest finite value, so that k s never overflows and any difference of
// two of them stays finite (inf - inf would be NaN). tanh saturates long before, so only absurd logits are affected.
template <typename T>
__device__ __forceinline__ T prescale(T v, T k) {
  constexpr T kLimit = std::numeric_limits<T>::max() / 2;
  const T x = k * v;
  return x < -kLimit ? -kLimit : (x > kLimit ? kLimit : x);
}

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads)
    kendall_prepare_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
                           int64_t num_classes, int64_t padded, T k, bool prescaled, T* __restrict__ prepared_s,
                           T* __restrict__ prepared_t, int32_t* __restrict__ nonfinite) {
  const int64_t row = blockIdx.x;
  bool finite = true;
  for (int64_t c = threadIdx.x; c < padded; c += kThreads) {
    T s = T(0), t = T(0);
    if (c < num_classes) {
      s = static_cast<T>(student[row * num_classes + c]);
      t = static_cast<T>(teacher[row * num_classes + c]);
      finite = finite && isfinite(s) && isfinite(t);
    }
    prepared_s[row * padded + c] = prescaled ? prescale(s, k) : s;
    prepared_t[row * padded + c] = prescaled ? prescale(t, k) : t;
  }
  const int any_nonfinite = __syncthreads_or(!finite);
  if (threadIdx.x == 0) nonfinite[row] = any_nonfinite;
}

// ---- finalize -------------------------------------------------------------------------------------------------------

template <typename T>
struct FinalizeArgs {
  const T* part_s;  // (rows * parts, C); may be out_s itself when parts == 1
  const T* part_t;  // likewise, or nullptr
  const double* loss_part;
  const int32_t* nonfinite;
  T* out_s;  // (rows, C) or nullptr when the student gradient is not wanted
  T* out_t;  // likewise
  T* loss;   // (rows,)
  int64_t rows;
  int64_t num_classes;
  int64_t parts;
  T grad_scale;       // -k * 2 / (C (C - 1))
  double pair_scale;  // 2 / (C (C - 1))
};

template <typename T>
__device__ __forceinline__ T sum_parts(const T* part, int64_t row, int64_t c, int64_t parts, int64_t num_classes) {
  T sum = part[row * parts * num_classes + c];
  for (int64_t p = 1; p < parts; ++p) sum += part[(row * parts + p) * num_classes + c];
  return sum;
}

template <typename T>
__global__ void __launch_bounds__(256) kendall_finalize_kernel(const FinalizeArgs<T> args) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const int64_t total = args.rows * args.num_classes;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / args.num_classes;
    const int64_t c = e - row * args.num_classes;
    const bool bad = args.nonfinite[row];
    if (args.out_s) {
      args.out_s[e] = bad ? nan : args.grad_scale * sum_parts(args.part_s, row, c, args.parts, args.num_classes);
    }
    if (args.out_t) {
      args.out_t[e] = bad ? nan : args.grad_scale * sum_parts(args.part_t, row, c, args.parts, args.num_classes);
    }
    if (c == 0) {
      double concordance = 0.0;
      for (int64_t p = 0; p < args.parts && !bad; ++p) concordance += args.loss_part[row * args.parts + p];
      args.loss[row] = bad ? nan : static_cast<T>(1.0 - args.pair_scale * concordance);
    }
  }
}

}  // namespace cuda
}  // namespace rankkd
