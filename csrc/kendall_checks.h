// Argument checks of rankkd::kendall_rank, shared by its CPU and CUDA kernels. The Python wrapper checks the
// user-facing arguments first (rankkd/_args.py, check_inputs); these guard direct calls of the op and state the same
// rules in the same words as rankkd/_args.py's check_fused_args, which guards the Triton op.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <limits>

#include "kendall.h"

namespace rankkd {

inline TeacherMode parse_teacher_mode(c10::string_view teacher_mode) {
  if (teacher_mode == "tanh") return TeacherMode::kTanh;
  if (teacher_mode == "sign") return TeacherMode::kSign;
  TORCH_CHECK(false, "rankkd::kendall_rank: teacher_mode must be one of ('tanh', 'sign'), got '", teacher_mode, "'");
}

inline Precision parse_precision(c10::string_view precision) {
  if (precision == "fast") return Precision::kFast;
  if (precision == "exact") return Precision::kExact;
  TORCH_CHECK(false, "rankkd::kendall_rank: precision must be one of ('fast', 'exact'), got '", precision, "'");
}

struct KendallChoices {
  TeacherMode teacher_mode;
  Precision precision;
};

// Checks the op's arguments and returns its string choices parsed, the only place they are parsed.
inline KendallChoices check_kendall_args(const at::Tensor& student, const at::Tensor& teacher, double k,
                                         c10::string_view teacher_mode_name, c10::string_view precision_name,
                                         bool grad_teacher) {
  TORCH_CHECK(student.dim() == 2, "rankkd::kendall_rank: student must be 2-D (rows, C), got shape ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "rankkd::kendall_rank: teacher shape ", teacher.sizes(),
              " must equal student shape ", student.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "rankkd::kendall_rank: student dtype ",
              student.scalar_type(), " and teacher dtype ", teacher.scalar_type(), " must match");
  const at::ScalarType dtype = student.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
              "rankkd::kendall_rank: logits must be float16, bfloat16, float32 or float64, got ",
              student.scalar_type());
  TORCH_CHECK(student.device() == teacher.device(), "rankkd::kendall_rank: student on ", student.device(),
              " and teacher on ", teacher.device(), " must be on one device");
  TORCH_CHECK(student.size(1) >= 2, "rankkd::kendall_rank: need at least 2 classes, got C = ", student.size(1));
  // False for NaN too. k reaches the float32 math of non-float64 inputs as a normal float32 number; the rule is the
  // same for float64, so that every backend accepts the same k.
  TORCH_CHECK(k >= std::numeric_limits<float>::min() && k <= std::numeric_limits<float>::max(),
              "rankkd::kendall_rank: k (the tanh steepness) must be a finite number in [2^-126, 3.4e38] (float32's "
              "normal range), got ", k);
  const KendallChoices choices{parse_teacher_mode(teacher_mode_name), parse_precision(precision_name)};
  TORCH_CHECK(!(choices.teacher_mode == TeacherMode::kSign && grad_teacher),
              "rankkd::kendall_rank: teacher_mode 'sign' has no teacher gradient; pass grad_teacher=False");
  return choices;
}

}  // namespace rankkd
