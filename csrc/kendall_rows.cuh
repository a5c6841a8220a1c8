// The per-row passes around the pair kernel (kendall_pairs.cuh): prepare before it, finalize after it.
#pragma once

#include <cstdint>
#include <limits>

#include "kendall_pairs.cuh"

namespace rankkd {
namespace cuda {

// ---- prepare --------------------------------------------------------------------------------------------------------

// Prepared logits (Precision::kFast) are k (x - m), m the midpoint of the row's finite logits. The loss depends only on
// differences, so m changes nothing in exact arithmetic; in float32 it keeps the rounding at ulp(k spread) instead of
// ulp(k |x|): scaling k x directly and subtracting two such products later leaves an error of about ulp(k x), which
// a common offset of the row (3e4 + N(0, 1) logits) turns into a gradient error of 4e-3 at k = 10. x - m itself is
// exact whenever x and m are within a factor of two (Sterbenz) and otherwise off by at most ulp of the spread.
// Where some |k (x - m)| would exceed half the largest finite value (k up to 3.4e38 is in the op's contract), the row
// is stored unscaled and flagged kRowUnscaled: the pair kernel then evaluates it with k (x_i - x_j) as the exact path
// does (see kendall_pairs.cuh). Clamping instead would turn every pair of two clamped logits into a tie. Below the
// limit any difference of two stays finite.
template <typename T>
__device__ __forceinline__ bool prescale_fits(T v, T k) {
  constexpr T kLimit = std::numeric_limits<T>::max() / 2;
  return fabs(k * v) <= kLimit;  // false for an overflow to inf
}

// The smallest and largest of the CTA's values, in every thread. Leaves shared memory free again.
template <typename T>
__device__ __forceinline__ void block_min_max(T& lo, T& hi, T (&scratch)[2][kWarps]) {
  for (int mask = 16; mask > 0; mask >>= 1) {
    lo = fmin(lo, __shfl_xor_sync(0xffffffffu, lo, mask));
    hi = fmax(hi, __shfl_xor_sync(0xffffffffu, hi, mask));
  }
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) scratch[0][warp] = lo, scratch[1][warp] = hi;
  __syncthreads();
  lo = scratch[0][0], hi = scratch[1][0];
  for (int w = 1; w < kWarps; ++w) lo = fmin(lo, scratch[0][w]), hi = fmax(hi, scratch[1][w]);
  __syncthreads();
}

// The midpoint of [lo, hi] without overflow; 0 for a row with no finite value (it is flagged kRowNonfinite anyway).
template <typename T>
__device__ __forceinline__ T midpoint(T lo, T hi) {
  return lo <= hi ? lo / 2 + hi / 2 : T(0);
}

// prescale_s / prescale_t: store k (x - m) for the student / teacher logits (kFast; the teacher only with the tanh
// teacher: sign(t_i - t_j) needs no k, and k t_i - k t_j could round or underflow two different logits into a tie).
// Three passes over the row (its finite range, the scaled store, the rare unscaled rewrite): O(C) next to the pair
// kernel's O(C^2).
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads)
    kendall_prepare_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
                           int64_t num_classes, int64_t padded, T k, bool prescale_s, bool prescale_t,
                           T* __restrict__ prepared_s, T* __restrict__ prepared_t, int32_t* __restrict__ flags) {
  __shared__ T scratch[2][kWarps];
  const int64_t row = blockIdx.x;
  const scalar_t* s_in = student + row * num_classes;
  const scalar_t* t_in = teacher + row * num_classes;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  bool finite = true;
  T lo_s = kInf, hi_s = -kInf, lo_t = kInf, hi_t = -kInf;
  for (int64_t c = threadIdx.x; c < num_classes; c += kThreads) {
    const T s = static_cast<T>(s_in[c]);
    const T t = static_cast<T>(t_in[c]);
    finite = finite && isfinite(s) && isfinite(t);
    // Only finite logits set the reference: a non-finite one makes the row NaN whatever is stored.
    if (isfinite(s)) lo_s = fmin(lo_s, s), hi_s = fmax(hi_s, s);
    if (isfinite(t)) lo_t = fmin(lo_t, t), hi_t = fmax(hi_t, t);
  }
  const int any_nonfinite = __syncthreads_or(!finite);
  T ref_s = T(0), ref_t = T(0);
  if (prescale_s) {
    block_min_max(lo_s, hi_s, scratch);
    ref_s = midpoint(lo_s, hi_s);
  }
  if (prescale_t) {
    block_min_max(lo_t, hi_t, scratch);
    ref_t = midpoint(lo_t, hi_t);
  }
  bool fits = true;
  for (int64_t c = threadIdx.x; c < padded; c += kThreads) {
    T s = T(0), t = T(0);
    if (c < num_classes) {
      s = static_cast<T>(s_in[c]);
      t = static_cast<T>(t_in[c]);
      if (prescale_s) s -= ref_s;
      if (prescale_t) t -= ref_t;
      fits = fits && (!prescale_s || !isfinite(s) || prescale_fits(s, k)) &&
             (!prescale_t || !isfinite(t) || prescale_fits(t, k));
    }
    prepared_s[row * padded + c] = prescale_s ? k * s : s;
    prepared_t[row * padded + c] = prescale_t ? k * t : t;
  }
  const int any_overflow = __syncthreads_or(!fits);
  if (any_overflow && !any_nonfinite) {  // rare: store the row unscaled (each thread rewrites its own elements)
    for (int64_t c = threadIdx.x; c < num_classes; c += kThreads) {
      prepared_s[row * padded + c] = static_cast<T>(s_in[c]);
      prepared_t[row * padded + c] = static_cast<T>(t_in[c]);
    }
  }
  if (threadIdx.x == 0) {
    flags[row] = (any_nonfinite ? kRowNonfinite : 0) | (any_overflow && !any_nonfinite ? kRowUnscaled : 0);
  }
}

// ---- finalize -------------------------------------------------------------------------------------------------------

template <typename T>
struct FinalizeArgs {
  const T* part_s;  // (rows * parts, C); may be out_s itself when parts == 1
  const T* part_t;  // likewise, or nullptr
  const double* loss_part;
  const int32_t* nonfinite;  // row flags (kRowNonfinite)
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
    const bool bad = args.nonfinite[row] & kRowNonfinite;
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
