// CUDA kernel of rankkd::kendall_rank: per-row loss and gradients from one pass over the unordered pairs.
//
// Three launches on the current stream:
//   1. prepare   one CTA per row: converts the logits to the math type (float, or double for float64), zero-pads each
//                row to whole tiles, stores k (x - m) for Precision::kFast (m: the midpoint of the row's logits, so
//                that the rounding follows the row's spread, not its offset), and flags rows that hold a non-finite
//                logit (no host sync: the flag travels on the device).
//   2. pairs     `parts` CTAs per row (kendall_pairs.cuh): each sums its share of the pairs into its own slice.
//   3. finalize  sums the slices in part order, scales, writes NaN over flagged rows.
// When a row gets one CTA and its student gradient is wanted, the slice is the output itself and finalize scales it in
// place.
//
// precision (the op's argument) for float32, bfloat16 and float16 inputs; float64 always takes the exact double path.
// bench/NOTES.md has their instruction counts and expected speed and accuracy:
//   fast   both tanh of a pair on MUFU.TANH (tanh.approx.f32): bound by the MUFU, i.e. at the 2-tanh floor in the
//          inner loop. Gradient error against float64 set by MUFU.TANH's (about 1e-5 relative per tanh as measured by
//          others; docs/design.md allows 2e-3 for this class).
//   exact  CUDA's tanhf (2 ulp): 1e-5 relative norm error or better; about 2.6x the floor.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "kendall.h"
#include "kendall_checks.h"
#include "kendall_pairs.cuh"
#include "kendall_rows.cuh"

namespace rankkd {
namespace cuda {
namespace {

int64_t multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// CTAs per row: the most that keep every SM within kMaxCtasPerSm CTAs, one where the rows give the SMs that many on
// their own. Four CTAs give each warp scheduler four warps, which bench/kernel_report.py's latency model needs to keep
// MUFU busy while warps wait on the loads at the top of a tile pair and on the column flush (one warp alone runs the
// pair loop at 1.7-3x the 2-tanh floor), and every float32 variant fits four per SM in registers (the 128-register
// ones no more), so they all start at once. More CTAs per row cost a (rows * parts, C) partial buffer and its
// reduction; a budget caps the buffer.
int64_t parts_per_row(int64_t rows, int64_t pairs_per_row, int64_t bytes_per_slice, int64_t sms) {
  constexpr int64_t kMaxCtasPerSm = 4;
  constexpr int64_t kPartialBudgetBytes = int64_t{256} << 20;
  int64_t parts = std::max<int64_t>(1, kMaxCtasPerSm * sms / rows);
  parts = std::min(parts, pairs_per_row);
  const int64_t affordable = std::max<int64_t>(1, kPartialBudgetBytes / std::max<int64_t>(1, rows * bytes_per_slice));
  parts = std::min(parts, affordable);
  const int64_t max_ctas = std::numeric_limits<int32_t>::max();
  return std::max<int64_t>(1, std::min(parts, max_ctas / rows));
}

template <typename T>
using PairKernel = void (*)(PairArgs<T>);

template <typename T, Precision P>
PairKernel<T> pick_for_teacher_mode(TeacherMode teacher_mode, bool grad_teacher) {
  if (teacher_mode == TeacherMode::kSign) return kendall_pairs_kernel<T, P, TeacherMode::kSign, false>;
  if (grad_teacher) return kendall_pairs_kernel<T, P, TeacherMode::kTanh, true>;
  return kendall_pairs_kernel<T, P, TeacherMode::kTanh, false>;
}

// The precision the math of T runs at: float64 has only the exact path.
template <typename T>
Precision math_precision(Precision requested) {
  return std::is_same<T, double>::value ? Precision::kExact : requested;
}

template <typename T>
PairKernel<T> pick_pair_kernel(Precision precision, TeacherMode teacher_mode, bool grad_teacher) {
  if constexpr (std::is_same<T, double>::value) {
    return pick_for_teacher_mode<T, Precision::kExact>(teacher_mode, grad_teacher);
  } else if (precision == Precision::kFast) {
    return pick_for_teacher_mode<T, Precision::kFast>(teacher_mode, grad_teacher);
  } else {
    return pick_for_teacher_mode<T, Precision::kExact>(teacher_mode, grad_teacher);
  }
}

template <typename scalar_t, typename T>
void launch(const at::Tensor& s, const at::Tensor& t, T k, KendallChoices choices, bool grad_student,
            bool grad_teacher, at::Tensor& loss, at::Tensor& grad_s, at::Tensor& grad_t) {
  const int64_t rows = s.size(0);
  const int64_t num_classes = s.size(1);
  const int64_t tiles = (num_classes + kTile - 1) / kTile;
  const int64_t padded = tiles * kTile;
  const auto opts = s.options().dtype(c10::CppTypeToScalarType<T>::value);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Precision precision = math_precision<T>(choices.precision);

  const bool prescaled =
      precision == Precision::kFast ? kPrescaledLogits<Precision::kFast> : kPrescaledLogits<Precision::kExact>;
  at::Tensor prepared_s = at::empty({rows, padded}, opts);
  at::Tensor prepared_t = at::empty({rows, padded}, opts);
  at::Tensor nonfinite = at::empty({rows}, opts.dtype(at::kInt));
  kendall_prepare_kernel<scalar_t, T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), num_classes, padded, k, prescaled,
      prescaled && choices.teacher_mode == TeacherMode::kTanh, prepared_s.mutable_data_ptr<T>(),
      prepared_t.mutable_data_ptr<T>(), nonfinite.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // The student sums are always formed (they cost no MUFU time); without grad_student they land in scratch.
  const int64_t sms = multiprocessor_count(s.get_device());
  const int64_t slice_bytes = num_classes * static_cast<int64_t>(sizeof(T)) * (grad_teacher ? 2 : 1);
  const int64_t parts = parts_per_row(rows, tile_pairs(tiles), slice_bytes, sms);
  const bool in_place = parts == 1;
  at::Tensor part_s = in_place && grad_student ? grad_s : at::empty({rows * parts, num_classes}, opts);
  at::Tensor part_t = !grad_teacher ? at::Tensor() : in_place ? grad_t : at::empty({rows * parts, num_classes}, opts);
  at::Tensor loss_part = at::empty({rows * parts}, opts.dtype(at::kDouble));

  PairArgs<T> pair_args{prepared_s.const_data_ptr<T>(),
                        prepared_t.const_data_ptr<T>(),
                        nonfinite.const_data_ptr<int32_t>(),
                        part_s.mutable_data_ptr<T>(),
                        grad_teacher ? part_t.mutable_data_ptr<T>() : nullptr,
                        loss_part.mutable_data_ptr<double>(),
                        static_cast<int>(num_classes),
                        static_cast<int>(padded),
                        static_cast<int>(tiles),
                        parts,
                        k};
  const PairKernel<T> pair_kernel = pick_pair_kernel<T>(precision, choices.teacher_mode, grad_teacher);
  pair_kernel<<<static_cast<unsigned>(rows * parts), kThreads, 0, stream>>>(pair_args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const double pair_scale_value = pair_scale(num_classes);
  FinalizeArgs<T> finalize_args{part_s.const_data_ptr<T>(),
                                grad_teacher ? part_t.const_data_ptr<T>() : nullptr,
                                loss_part.const_data_ptr<double>(),
                                nonfinite.const_data_ptr<int32_t>(),
                                grad_student ? grad_s.mutable_data_ptr<T>() : nullptr,
                                grad_teacher ? grad_t.mutable_data_ptr<T>() : nullptr,
                                loss.mutable_data_ptr<T>(),
                                rows,
                                num_classes,
                                parts,
                                static_cast<T>(-pair_scale_value * static_cast<double>(k)),
                                pair_scale_value};
  constexpr int kFinalizeThreads = 256;
  const int64_t blocks = std::min<int64_t>((rows * num_classes + kFinalizeThreads - 1) / kFinalizeThreads, 32 * sms);
  kendall_finalize_kernel<T><<<static_cast<unsigned>(blocks), kFinalizeThreads, 0, stream>>>(finalize_args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kendall_rank_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                                 double k, c10::string_view teacher_mode,
                                                                 c10::string_view precision, bool grad_student,
                                                                 bool grad_teacher) {
  const KendallChoices choices = check_kendall_args(student, teacher, k, teacher_mode, precision, grad_teacher);
  TORCH_CHECK(student.is_cuda(), "rankkd::kendall_rank (CUDA): logits must be CUDA tensors, got ", student.device());
  const c10::cuda::CUDAGuard device_guard(student.device());
  const at::Tensor s = student.contiguous();
  const at::Tensor t = teacher.contiguous();
  const int64_t rows = s.size(0);
  const int64_t num_classes = s.size(1);
  TORCH_CHECK(rows < std::numeric_limits<int32_t>::max(), "rankkd::kendall_rank (CUDA): at most 2^31 - 2 rows, got ",
              rows);
  TORCH_CHECK(num_classes <= std::numeric_limits<int32_t>::max() - kTile,
              "rankkd::kendall_rank (CUDA): at most 2^31 - 65 classes, got C = ", num_classes);
  const auto acc_dtype = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = s.options().dtype(acc_dtype);
  at::Tensor loss = at::empty({rows}, opts);
  at::Tensor grad_s = grad_student ? at::empty({rows, num_classes}, opts) : at::empty({0}, opts);
  at::Tensor grad_t = grad_teacher ? at::empty({rows, num_classes}, opts) : at::empty({0}, opts);
  if (rows == 0) return {loss, grad_s, grad_t};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kendall_rank_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    launch<scalar_t, acc_t>(s, t, static_cast<acc_t>(k), choices, grad_student, grad_teacher, loss, grad_s, grad_t);
  });
  return {loss, grad_s, grad_t};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(rankkd, CUDA, m) { m.impl("kendall_rank", &cuda::kendall_rank_cuda); }

}  // namespace rankkd
