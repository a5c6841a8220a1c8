// Argument checks shared by the CPU and CUDA implementations of rankkd::kendall_rank. The Python wrapper checks the
// user-facing arguments first with friendlier messages; these guard direct calls of the op.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace rankkd {

inline void check_kendall_args(const at::Tensor& student, const at::Tensor& teacher, double k, bool sign_teacher,
                               bool grad_teacher) {
  TORCH_CHECK(student.dim() == 2, "rankkd::kendall_rank: student must be 2-D (rows, C), got shape ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "rankkd::kendall_rank: teacher shape ", teacher.sizes(),
              " must equal student shape ", student.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "rankkd::kendall_rank: student dtype ",
              student.scalar_type(), " and teacher dtype ", teacher.scalar_type(), " must match");
  TORCH_CHECK(at::isFloatingType(student.scalar_type()), "rankkd::kendall_rank: logits must be floating point, got ",
              student.scalar_type());
  TORCH_CHECK(student.device() == teacher.device(), "rankkd::kendall_rank: student on ", student.device(),
              " and teacher on ", teacher.device(), " must be on one device");
  TORCH_CHECK(student.size(1) >= 2, "rankkd::kendall_rank: need at least 2 classes, got C = ", student.size(1));
  TORCH_CHECK(k > 0 && std::isfinite(k), "rankkd::kendall_rank: k must be a finite number > 0, got ", k);
  TORCH_CHECK(student.scalar_type() == at::kDouble || k <= std::numeric_limits<float>::max(),
              "rankkd::kendall_rank: k = ", k, " overflows the float32 math of ", student.scalar_type(), " inputs");
  TORCH_CHECK(!(sign_teacher && grad_teacher),
              "rankkd::kendall_rank: teacher_mode 'sign' has no teacher gradient; pass grad_teacher=False");
}

}  // namespace rankkd
