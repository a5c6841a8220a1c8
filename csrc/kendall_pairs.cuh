// The pair kernel of the CUDA Kendall rank loss: every unordered pair (i, j) of a row is evaluated once and feeds both
// ends, with deterministic reductions and O(rows * C) memory.
//
// Work. A row's C classes are cut into nt tiles of kTile (the last one padded with zeros). The unordered tile pairs
// are enumerated in strips: strip I holds (I, (I + d) mod nt) for d in [0, strip_length(I)), the circulant split of the
// complete graph, so each unordered tile pair appears exactly once and every strip has nt/2 or nt/2 + 1 tile pairs.
// Each row gets `parts` CTAs; CTA p takes a contiguous range of the row's tile pairs in strip order, so the split is
// balanced to one tile pair whatever nt and parts are.
//
// A CTA (4 warps) works on one tile pair at a time. Lane = ty + 8 tx (ty in [0, 8), tx in [0, 4)) of warp w owns
//   row slots a in [0, 8):    i = I * kTile + ty + 8 a       (in registers for the whole strip)
//   column slots b in [0, 4): j = J * kTile + 16 g + 4 tx + b   (column group g = w, rotated on the diagonal)
// and evaluates those 8 x 4 pairs: every (i, j) of the tile pair once. What a pair adds to i is summed in registers
// over the strip; what it adds to j is reduced over the 8 lanes sharing tx (shuffles) after each tile pair. The
// diagonal tile pair (d = 0, I == J) covers only i < j: the warp holding group g stops after row slot 2g + 1 (every
// later i is past its columns j) and zeroes the pairs with i >= j in its last two row slots, so each unordered pair is
// evaluated once.
//
// Padding. A padded channel has value 0 and mask 0. The differences are formed as x_i * m_j - x_j, exactly 0 when j is
// padding, which makes every term of the pair 0; the terms a padded i adds to j's and to the loss are multiplied by
// m_i inside FFMAs that are needed anyway. A padded i's own sums are never written. So padding costs no instructions.
//
// Determinism. Each CTA (one part of a row) accumulates into its own slice of a (rows * parts, C) buffer with plain
// loads and stores in a fixed order (one lane owns each element within a tile pair; __syncthreads orders the rest). A
// second kernel sums the slices in part order. No atomics anywhere.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kendall.h"
#include "kendall_tanh.cuh"

namespace rankkd {
namespace cuda {

constexpr int kTile = 64;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowSlots = 8;   // rows (i) per lane
constexpr int kColSlots = 4;   // columns (j) per lane
constexpr int kRowLanes = 8;   // lanes of a warp that share their columns and own different rows
constexpr int kColLanes = 4;   // lanes of a warp that share their rows and own different columns
constexpr int kWarpColumns = kColLanes * kColSlots;  // the columns of a tile that one warp owns
static_assert(kRowLanes * kColLanes == 32, "a warp is kRowLanes x kColLanes lanes");
static_assert(kRowLanes * kRowSlots == kTile, "the row slots of 8 lanes cover a tile");
static_assert(kWarps * kWarpColumns == kTile, "the column slots of a CTA cover a tile");
static_assert(kWarpColumns % kRowLanes == 0, "a warp's diagonal block ends on a row slot boundary");

// Precision::kFast prepares the logits as k (x - m), m a per-row reference (kendall_rows.cuh): one multiply less per
// difference, and a rounding of ulp(k spread), far below tanh.approx's error at any common offset of the row. kExact
// forms differences from the raw logits and then scales them: k (s_i - s_j) keeps every bit of a small difference.
// Two exceptions on the fast path, both decided by prepare: the sign teacher's logits are never scaled or shifted
// (sign(t_i - t_j) needs no k), and a row where some |k (x - m)| would pass half the largest float is stored unscaled
// and flagged kRowUnscaled (unscaled_row below).
template <Precision P>
constexpr bool kPrescaledLogits = P == Precision::kFast;

// Row flags, written by prepare (kendall_rows.cuh).
constexpr int32_t kRowNonfinite = 1;  // the row holds a non-finite logit: finalize writes NaN over it
constexpr int32_t kRowUnscaled = 2;   // kFast only: k x would overflow for some logit, the row is stored unscaled

// ---- tile pair enumeration ------------------------------------------------------------------------------------------

__host__ __device__ inline int64_t tile_pairs(int64_t nt) { return nt * (nt + 1) / 2; }

struct Strip {
  int64_t first;  // linear index of the strip's first tile pair
  int64_t tile;   // I
  int64_t length; // tile pairs in the strip
};

// The strip that holds linear tile pair index idx. With h = nt / 2: for odd nt every strip has h + 1 tile pairs; for
// even nt strips I < h have h + 1 and strips I >= h have h (the tile pair at distance h is taken by the lower strip).
__host__ __device__ inline Strip strip_containing(int64_t idx, int64_t nt) {
  const int64_t h = nt / 2;
  const int64_t long_length = h + 1;
  const int64_t long_pairs = nt % 2 == 1 ? nt * long_length : h * long_length;
  if (idx < long_pairs) {
    const int64_t tile = idx / long_length;
    return {tile * long_length, tile, long_length};
  }
  const int64_t tile = h + (idx - long_pairs) / h;
  return {long_pairs + (tile - h) * h, tile, h};
}

// ---- per-pair math --------------------------------------------------------------------------------------------------

template <typename T>
struct PairArgs {
  const T* student;          // (rows, padded): prepared logits, zero padded, k (x - m) when kPrescaledLogits<P>
  const T* teacher;          // likewise, times k only with the tanh teacher
  const int32_t* nonfinite;  // (rows,): row flags, kRowNonfinite | kRowUnscaled
  T* grad_s;                 // (rows * parts, C): each CTA's sums of sech^2_s g per channel
  T* grad_t;                 // likewise, sums of tanh_s sech^2_t; nullptr without teacher gradient
  double* loss_part;         // (rows * parts,): each CTA's sum of tanh_s g over its unordered pairs
  int num_classes;           // C (< 2^31: in-row indices are 32-bit, row offsets 64-bit)
  int padded;                // nt * kTile
  int tiles;                 // nt
  int64_t parts;             // CTAs per row
  T k;
};

// sign(d) with sign(0) = 0 (padding and ties must add nothing): LOP3, FSETP, FSEL.
template <typename T>
__device__ __forceinline__ T sign_or_zero(T d) {
  return d == T(0) ? T(0) : copysign(T(1), d);
}

// k (x_i - x_j), or exactly 0 when j is padding (m_j = 0 and x_j = 0).
template <bool kPrescaled, typename T>
__device__ __forceinline__ T scaled_difference(T xi, T xj, T mj, T k) {
  const T d = fma(xi, mj, -xj);
  return kPrescaled ? d : k * d;
}

// The tanh of a difference: MUFU.TANH for kFast (kPin: see tanh_approx), the accurate one for kExact and float64.
template <Precision P, bool kPin>
__device__ __forceinline__ float pair_tanh(float x) {
  if constexpr (P == Precision::kExact) {
    return tanh_exact(x);
  } else {
    return tanh_approx<kPin>(x);
  }
}
template <Precision P, bool kPin>
__device__ __forceinline__ double pair_tanh(double x) {
  static_assert(P == Precision::kExact, "float64 has only the exact path");
  return tanh_exact(x);
}

// The lane's kRowSlots x kColSlots pairs of one tile pair. Adds to row (per i), col (per j, already negated: what a
// pair adds to i it takes from j) and the tile's loss sum. g is tanh(k dt) or sign(dt); sech^2 = 1 - tanh^2 is taken
// as b - a (a b) and a - b (a b), one FFMA each from the product that the loss needs anyway. kDiagonal: I == J, only
// the pairs with i < j count (see the top of this file); zeroing both tanh of a pair zeroes everything it adds.
template <typename T, Precision P, TeacherMode M, bool kGradT, bool kDiagonal>
__device__ __forceinline__ void tile_pair(const T (&xi)[kRowSlots], const T (&yi)[kRowSlots],
                                          const T (&mi)[kRowSlots], const T (&xj)[kColSlots],
                                          const T (&yj)[kColSlots], const T (&mj)[kColSlots], T k,
                                          T (&row_s)[kRowSlots], T (&row_t)[kRowSlots], T (&col_s)[kColSlots],
                                          T (&col_t)[kColSlots], T& loss, int group) {
  const int lane = threadIdx.x & 31;
  const int i_offset = lane % kRowLanes;                                        // i - I * kTile - kRowLanes * a
  const int j_offset = group * kWarpColumns + (lane / kRowLanes) * kColSlots;  // j - J * kTile - b
#pragma unroll
  for (int a = 0; a < kRowSlots; ++a) {
    if (kDiagonal && a * kRowLanes >= (group + 1) * kWarpColumns) break;  // every later i is past this warp's j
    T p[kColSlots], gs[kColSlots], gt[kColSlots];
#pragma unroll
    for (int b = 0; b < kColSlots; ++b) {
      // The student sums (sech^2_s) are always formed; sech^2_t only with the teacher gradient.
      T ta = pair_tanh<P, true>(scaled_difference<kPrescaledLogits<P>>(xi[a], xj[b], mj[b], k));
      T tb;
      if constexpr (M == TeacherMode::kSign) {
        tb = sign_or_zero(fma(yi[a], mj[b], -yj[b]));
      } else {
        tb = pair_tanh<P, kGradT>(scaled_difference<kPrescaledLogits<P>>(yi[a], yj[b], mj[b], k));
      }
      if constexpr (kDiagonal) {
        const bool counted = i_offset + kRowLanes * a < j_offset + b;
        ta = counted ? ta : T(0);
        tb = counted ? tb : T(0);
      }
      p[b] = ta * tb;
      gs[b] = fma(-ta, p[b], tb);
      col_s[b] = fma(-gs[b], mi[a], col_s[b]);
      if constexpr (kGradT) {
        gt[b] = fma(-tb, p[b], ta);
        col_t[b] = fma(-gt[b], mi[a], col_t[b]);
      }
    }
    // Pairwise sums: as many adds as one by one, and a quarter of the rounding steps on the long-lived accumulators.
    row_s[a] += (gs[0] + gs[1]) + (gs[2] + gs[3]);
    if constexpr (kGradT) row_t[a] += (gt[0] + gt[1]) + (gt[2] + gt[3]);
    loss = fma((p[0] + p[1]) + (p[2] + p[3]), mi[a], loss);
  }
  static_assert(kColSlots == 4, "the pairwise sums above are written out for 4 column slots");
}

// ---- reductions -----------------------------------------------------------------------------------------------------

__device__ __forceinline__ float shuffle_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
__device__ __forceinline__ double shuffle_xor(double v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

// Adds the lane's 4 column sums, reduced over the 8 lanes that share tx, to part[j0 + b]. Reduce-scatter over the ty
// bits (xor 4, 2, 1): afterwards lane ty holds the full sum of column slot b = 2 (ty>>2 & 1) + (ty>>1 & 1), and the
// lanes with even ty write it (the odd ones hold the same value). Each element has one writer.
template <typename T>
__device__ __forceinline__ void flush_columns(const T (&col)[kColSlots], T* part, int j0, int ty, int num_classes) {
  const bool upper = ty & 4;
  T keep0 = upper ? col[2] : col[0];
  T keep1 = upper ? col[3] : col[1];
  const T send0 = upper ? col[0] : col[2];
  const T send1 = upper ? col[1] : col[3];
  keep0 += shuffle_xor(send0, 4);
  keep1 += shuffle_xor(send1, 4);
  const bool odd = ty & 2;
  T sum = odd ? keep1 : keep0;
  sum += shuffle_xor(odd ? keep0 : keep1, 2);
  sum += shuffle_xor(sum, 1);
  const int j = j0 + (upper ? 2 : 0) + (odd ? 1 : 0);
  if ((ty & 1) == 0 && j < num_classes) part[j] += sum;
}

// Adds the row sums of a strip, reduced over the 4 lanes sharing ty (xor 8, 16) and then over the 4 warps in warp
// order through shared memory, to part[I * kTile + t]. Called by the whole CTA; leaves shared memory free again.
template <typename T>
__device__ __forceinline__ void flush_rows(T (&row)[kRowSlots], T* part, int tile, int num_classes,
                                           T (&scratch)[kWarps][kTile]) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int ty = lane % kRowLanes;
#pragma unroll
  for (int a = 0; a < kRowSlots; ++a) {
    row[a] += shuffle_xor(row[a], 8);
    row[a] += shuffle_xor(row[a], 16);
  }
  if (lane < kRowLanes) {
#pragma unroll
    for (int a = 0; a < kRowSlots; ++a) scratch[warp][ty + kRowLanes * a] = row[a];
  }
  __syncthreads();
  if (threadIdx.x < kTile) {
    const int t = threadIdx.x;
    const T sum = ((scratch[0][t] + scratch[1][t]) + scratch[2][t]) + scratch[3][t];
    const int i = tile * kTile + t;
    if (i < num_classes) part[i] += sum;
  }
  __syncthreads();
  static_assert(kWarps == 4, "the warp sum above is written out for 4 warps");
}

template <typename T>
__device__ __forceinline__ void load4(const T* p, T (&v)[4]) {
  if constexpr (std::is_same<T, float>::value) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    const double2 q0 = reinterpret_cast<const double2*>(p)[0];
    const double2 q1 = reinterpret_cast<const double2*>(p)[1];
    v[0] = q0.x, v[1] = q0.y, v[2] = q1.x, v[3] = q1.y;
  }
}

template <typename T>
struct PairShared {
  T rows_s[kWarps][kTile];
  T rows_t[kWarps][kTile];
  double loss[kWarps];
};

// Tile pair (tile, other) of a strip: loads the lane's columns, evaluates its pairs, flushes the column sums.
template <typename T, Precision P, TeacherMode M, bool kGradT, bool kDiagonal>
__device__ __forceinline__ void run_tile_pair(const PairArgs<T>& args, const T* s_row, const T* t_row, T* part_s,
                                              T* part_t, int other, const T (&xi)[kRowSlots], const T (&yi)[kRowSlots],
                                              const T (&mi)[kRowSlots], T (&row_s)[kRowSlots],
                                              T (&row_t)[kRowSlots], double& loss, int group) {
  const int lane = threadIdx.x & 31;
  const int j0 = other * kTile + group * kWarpColumns + (lane / kRowLanes) * kColSlots;
  T xj[kColSlots], yj[kColSlots], mj[kColSlots], col_s[kColSlots], col_t[kColSlots];
  load4(s_row + j0, xj);
  load4(t_row + j0, yj);
#pragma unroll
  for (int b = 0; b < kColSlots; ++b) {
    mj[b] = j0 + b < args.num_classes ? T(1) : T(0);
    col_s[b] = T(0);
    col_t[b] = T(0);
  }
  T tile_loss = T(0);
  tile_pair<T, P, M, kGradT, kDiagonal>(xi, yi, mi, xj, yj, mj, args.k, row_s, row_t, col_s, col_t, tile_loss, group);
  loss += static_cast<double>(tile_loss);
  flush_columns(col_s, part_s, j0, lane % kRowLanes, args.num_classes);
  if constexpr (kGradT) flush_columns(col_t, part_t, j0, lane % kRowLanes, args.num_classes);
}

// Tile pairs [d0, d1) of strip `tile`: row slots stay in registers throughout, column sums are flushed per tile pair.
template <typename T, Precision P, TeacherMode M, bool kGradT>
__device__ __forceinline__ void run_strip(const PairArgs<T>& args, const T* s_row, const T* t_row, T* part_s,
                                          T* part_t, int tile, int d0, int d1, double& loss, PairShared<T>& shared) {
  const int ty = (threadIdx.x & 31) % kRowLanes;
  T xi[kRowSlots], yi[kRowSlots], mi[kRowSlots], row_s[kRowSlots], row_t[kRowSlots];
#pragma unroll
  for (int a = 0; a < kRowSlots; ++a) {
    const int i = tile * kTile + ty + kRowLanes * a;
    xi[a] = s_row[i];
    yi[a] = t_row[i];
    mi[a] = i < args.num_classes ? T(1) : T(0);
    row_s[a] = T(0);
    row_t[a] = T(0);
  }
  const int warp = threadIdx.x >> 5;
  if (d0 == 0) {
    // On the diagonal, column group g costs 2g + 2 of the 8 row slots. Warp w of every CTA shares scheduler w of its
    // SM, so the groups rotate over warps with the CTA and strip: each scheduler gets every group equally often.
    const int group = (warp + static_cast<int>(blockIdx.x) + tile) % kWarps;
    run_tile_pair<T, P, M, kGradT, true>(args, s_row, t_row, part_s, part_t, tile, xi, yi, mi, row_s, row_t, loss,
                                         group);
  }
  for (int d = d0 == 0 ? 1 : d0; d < d1; ++d) {
    const int other = tile + d < args.tiles ? tile + d : tile + d - args.tiles;
    run_tile_pair<T, P, M, kGradT, false>(args, s_row, t_row, part_s, part_t, other, xi, yi, mi, row_s, row_t,
                                              loss, warp);
  }
  // Every warp's column writes of this strip come before the row writes below (flush_rows starts with a barrier).
  flush_rows(row_s, part_s, tile, args.num_classes, shared.rows_s);
  if constexpr (kGradT) flush_rows(row_t, part_t, tile, args.num_classes, shared.rows_t);
}

// A kRowUnscaled row (kFast, some |k (x - m)| beyond half the largest float: absurd logits or k), done by the row's
// part 0 alone, its other parts leaving their zeroed slices: thread t owns channels i = t + kThreads n, the same
// channels it zeroed, and sums over every j != i with the exact tanh of k (x_i - x_j), so each slice element has one
// writer and a fixed order. Returns the thread's share of the loss sum (pairs i < j). Twice the pairs of the tiled
// path, on one CTA, and the accurate tanh: slow, but only such rows pay it, and it keeps the op's contract for any k in
// range.
template <typename T, TeacherMode M, bool kGradT>
__device__ __forceinline__ double unscaled_row(const PairArgs<T>& args, const T* s_row, const T* t_row, T* part_s,
                                            T* part_t) {
  double loss = 0.0;
  const T k = args.k;
  for (int i = threadIdx.x; i < args.num_classes; i += kThreads) {
    T sum_s = T(0), sum_t = T(0);
    double conc = 0.0;
    for (int j = 0; j < args.num_classes; ++j) {
      const T ta = tanh_exact(k * (s_row[i] - s_row[j]));  // tanh(k * inf) = +-1: no NaN from finite logits
      T tb;
      if constexpr (M == TeacherMode::kSign) {
        tb = sign_or_zero(t_row[i] - t_row[j]);
      } else {
        tb = tanh_exact(k * (t_row[i] - t_row[j]));
      }
      // j == i: ta = tb = 0 adds nothing. 1 - tanh^2 as in the fast path; tanhf is exactly +-1 in saturation.
      sum_s += (T(1) - ta * ta) * tb;
      if constexpr (kGradT) sum_t += ta * (T(1) - tb * tb);
      if (j > i) conc += static_cast<double>(ta * tb);
    }
    part_s[i] = sum_s;
    if constexpr (kGradT) part_t[i] = sum_t;
    loss += conc;
  }
  return loss;
}

// One CTA: zero its slice, run its range of tile pairs strip by strip, write its loss sum.
template <typename T, Precision P, TeacherMode M, bool kGradT>
__global__ void __launch_bounds__(kThreads) kendall_pairs_kernel(const PairArgs<T> args) {
  __shared__ PairShared<T> shared;
  const int64_t cta = blockIdx.x;
  const int64_t row = cta / args.parts;
  const int64_t part = cta - row * args.parts;
  const int32_t flags = args.nonfinite[row];
  if (flags & kRowNonfinite) return;  // the finalize kernel writes NaN over the whole row

  const int num_classes = args.num_classes;
  T* part_s = args.grad_s + cta * num_classes;
  T* part_t = kGradT ? args.grad_t + cta * num_classes : nullptr;
  for (int c = threadIdx.x; c < num_classes; c += kThreads) {
    part_s[c] = T(0);
    if constexpr (kGradT) part_t[c] = T(0);
  }
  __syncthreads();

  const T* s_row = args.student + row * args.padded;
  const T* t_row = args.teacher + row * args.padded;
  const int64_t pairs = tile_pairs(args.tiles);
  const int64_t end = (part + 1) * pairs / args.parts;
  double loss = 0.0;
  if (P == Precision::kFast && (flags & kRowUnscaled)) {
    if (part == 0) loss = unscaled_row<T, M, kGradT>(args, s_row, t_row, part_s, part_t);
  } else {
    for (int64_t idx = part * pairs / args.parts; idx < end;) {
      const Strip strip = strip_containing(idx, args.tiles);
      const int d0 = static_cast<int>(idx - strip.first);
      const int d1 = static_cast<int>(d0 + (end - idx) < strip.length ? d0 + (end - idx) : strip.length);
      run_strip<T, P, M, kGradT>(args, s_row, t_row, part_s, part_t, static_cast<int>(strip.tile), d0, d1, loss,
                                 shared);
      idx = strip.first + d1;
    }
  }

  for (int mask = 16; mask > 0; mask >>= 1) loss += shuffle_xor(loss, mask);
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) shared.loss[warp] = loss;
  __syncthreads();
  if (threadIdx.x == 0) args.loss_part[cta] = ((shared.loss[0] + shared.loss[1]) + shared.loss[2]) + shared.loss[3];
}

}  // namespace cuda
}  // namespace rankkd
