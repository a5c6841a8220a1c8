// Fused CPU kernel: per-row loss and gradients in one pass over the unordered pairs, O(B*C) extra memory.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "kendall.h"
#include "kendall_checks.h"
#include "kendall_cpu_math.h"

namespace rankkd {
namespace {

// The vectorized pair loops are compiled for several x86 levels and the best one is picked when the library loads,
// so one build runs on any x86-64 and still uses AVX-512/AVX2/FMA where the CPU has them.
#if defined(__x86_64__) && defined(__GNUC__)
#define RANKKD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "fma", "default")))
#else
#define RANKKD_CPU_CLONES
#endif

// tanh_of<true> shares its division with sech2_of; tanh_of<false> is the cheaper one for when no sech^2 is needed.
template <bool kWithSech2>
RANKKD_ALWAYS_INLINE float tanh_of(float x) { return kWithSech2 ? accurate_tanh(x) : rational_tanh(x); }
RANKKD_ALWAYS_INLINE float sech2_of(float x) { return accurate_sech2(x); }
template <bool kWithSech2>
RANKKD_ALWAYS_INLINE double tanh_of(double x) { return std::tanh(x); }
RANKKD_ALWAYS_INLINE double sech2_of(double x) {
  const double t = std::tanh(x);
  return 1.0 - t * t;  // accurate enough in float64 even for saturated pairs
}

// Sums tanh(k(s_i - s_j)) g(t_i - t_j) over i < j and accumulates the unscaled gradients
// sum_j sech^2_s g and sum_j tanh_s sech^2_t into gs and gt (zeroed by the caller). Each (i, j) is evaluated once:
// what it adds to i it subtracts from j. The inner loop is branch-free and vectorizes (the file is compiled with
// -fassociative-math so that its reductions may be split into SIMD lanes); the split is fixed at compile time, so
// the result is deterministic.
template <typename T, TeacherMode M, bool kGradS, bool kGradT>
RANKKD_ALWAYS_INLINE double row_pairs(const T* __restrict__ s, const T* __restrict__ t, int64_t num_classes, T k,
                                      T* __restrict__ gs, T* __restrict__ gt) {
  double total = 0.0;
  for (int64_t i = 0; i + 1 < num_classes; ++i) {
    const T si = s[i];
    const T ti = t[i];
    T sum_i = 0, gs_i = 0, gt_i = 0;
    for (int64_t j = i + 1; j < num_classes; ++j) {
      const T x_s = k * (si - s[j]);
      const T x_t = k * (ti - t[j]);
      const T a = tanh_of<kGradS>(x_s);
      const T b = M == TeacherMode::kSign ? sign_of(x_t) : tanh_of<kGradT>(x_t);
      sum_i += a * b;
      if (kGradS) {
        const T d = sech2_of(x_s) * b;
        gs_i += d;
        gs[j] -= d;
      }
      if (kGradT) {
        const T d = a * sech2_of(x_t);
        gt_i += d;
        gt[j] -= d;
      }
    }
    total += static_cast<double>(sum_i);
    if (kGradS) gs[i] += gs_i;
    if (kGradT) gt[i] += gt_i;
  }
  return total;
}

template <typename T>
RANKKD_ALWAYS_INLINE double row_pairs_any(const T* s, const T* t, int64_t num_classes, T k, TeacherMode teacher_mode,
                                          T* gs, T* gt) {
  constexpr TeacherMode kTanh = TeacherMode::kTanh, kSign = TeacherMode::kSign;
  if (teacher_mode == kSign) {
    return gs ? row_pairs<T, kSign, true, false>(s, t, num_classes, k, gs, gt)
              : row_pairs<T, kSign, false, false>(s, t, num_classes, k, gs, gt);
  }
  if (gs && gt) return row_pairs<T, kTanh, true, true>(s, t, num_classes, k, gs, gt);
  if (gs) return row_pairs<T, kTanh, true, false>(s, t, num_classes, k, gs, gt);
  if (gt) return row_pairs<T, kTanh, false, true>(s, t, num_classes, k, gs, gt);
  return row_pairs<T, kTanh, false, false>(s, t, num_classes, k, gs, gt);
}

RANKKD_CPU_CLONES double pair_sum(const float* s, const float* t, int64_t num_classes, float k,
                                  TeacherMode teacher_mode, float* gs, float* gt) {
  return row_pairs_any<float>(s, t, num_classes, k, teacher_mode, gs, gt);
}

double pair_sum(const double* s, const double* t, int64_t num_classes, double k, TeacherMode teacher_mode, double* gs,
                double* gt) {
  return row_pairs_any<double>(s, t, num_classes, k, teacher_mode, gs, gt);
}

template <typename scalar_t, typename acc_t>
void kendall_rows(const scalar_t* student, const scalar_t* teacher, int64_t rows, int64_t num_classes, acc_t k,
                  TeacherMode teacher_mode, acc_t* loss, acc_t* grad_s, acc_t* grad_t) {
  const acc_t c = static_cast<acc_t>(pair_scale(num_classes));
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  // A row costs C^2/2 pair evaluations: give each thread at least ~64k of them.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / (num_classes * num_classes));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s_buf, t_buf;
    if (!std::is_same<scalar_t, acc_t>::value) {
      s_buf.resize(num_classes);
      t_buf.resize(num_classes);
    }
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* s;
      const acc_t* t;
      if constexpr (std::is_same<scalar_t, acc_t>::value) {
        s = student + r * num_classes;
        t = teacher + r * num_classes;
      } else {
        for (int64_t j = 0; j < num_classes; ++j) {
          s_buf[j] = static_cast<acc_t>(student[r * num_classes + j]);
          t_buf[j] = static_cast<acc_t>(teacher[r * num_classes + j]);
        }
        s = s_buf.data();
        t = t_buf.data();
      }
      acc_t* gs = grad_s ? grad_s + r * num_classes : nullptr;
      acc_t* gt = grad_t ? grad_t + r * num_classes : nullptr;
      bool finite = true;
      for (int64_t j = 0; j < num_classes; ++j) finite &= std::isfinite(s[j]) && std::isfinite(t[j]);
      if (!finite) {  // a non-finite logit makes the whole row NaN rather than a plausible number
        loss[r] = nan;
        if (gs) std::fill(gs, gs + num_classes, nan);
        if (gt) std::fill(gt, gt + num_classes, nan);
        continue;
      }
      if (gs) std::fill(gs, gs + num_classes, acc_t(0));
      if (gt) std::fill(gt, gt + num_classes, acc_t(0));
      const double total = pair_sum(s, t, num_classes, k, teacher_mode, gs, gt);
      loss[r] = static_cast<acc_t>(1.0 - static_cast<double>(c) * total);
      const acc_t g = -c * k;
      if (gs) for (int64_t j = 0; j < num_classes; ++j) gs[j] *= g;
      if (gt) for (int64_t j = 0; j < num_classes; ++j) gt[j] *= g;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kendall_rank_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                                double k, c10::string_view teacher_mode,
                                                                c10::string_view precision, bool grad_student,
                                                                bool grad_teacher) {
  // The CPU kernel is always exact: precision is checked, and then has nothing to choose.
  const KendallChoices choices = check_kendall_args(student, teacher, k, teacher_mode, precision, grad_teacher);
  const at::Tensor s = student.contiguous();
  const at::Tensor t = teacher.contiguous();
  const int64_t rows = s.size(0);
  const int64_t num_classes = s.size(1);
  const auto acc_dtype = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = s.options().dtype(acc_dtype);
  at::Tensor loss = at::empty({rows}, opts);
  at::Tensor gs = grad_student ? at::empty({rows, num_classes}, opts) : at::empty({0}, opts);
  at::Tensor gt = grad_teacher ? at::empty({rows, num_classes}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kendall_rank_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    kendall_rows<scalar_t, acc_t>(s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), rows, num_classes,
                                  static_cast<acc_t>(k), choices.teacher_mode, loss.mutable_data_ptr<acc_t>(),
                                  grad_student ? gs.mutable_data_ptr<acc_t>() : nullptr,
                                  grad_teacher ? gt.mutable_data_ptr<acc_t>() : nullptr);
  });
  return {loss, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(rankkd, CPU, m) { m.impl("kendall_rank", &kendall_rank_cpu); }

}  // namespace rankkd
