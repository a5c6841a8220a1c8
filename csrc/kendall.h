// What the CPU and CUDA kernels of the Kendall rank loss share: the math they evaluate, the two choices every kernel
// is instantiated for, and the loss's normalization.
//
// One row of C logits (student s, teacher t), steepness k, c = 2 / (C (C - 1)):
//   L        = 1 - c * sum_{i<j} tanh(k (s_i - s_j)) * g(t_i - t_j)
//   dL/ds_i  = -c k sum_{j != i} sech^2(k (s_i - s_j)) g(t_i - t_j)
//   dL/dt_i  = -c k sum_{j != i} tanh(k (s_i - s_j)) sech^2(k (t_i - t_j))     (g = tanh(k .) only)
// with g(x) = tanh(k x) (teacher_mode "tanh") or sign(x) ("sign"). Every kernel evaluates each unordered pair once and
// feeds both ends.
#pragma once

namespace rankkd {

// The op's teacher_mode and precision arguments, parsed once (kendall_checks.h).
enum class TeacherMode : int { kTanh, kSign };
// kFast lets a kernel use the hardware tanh (CUDA: tanh.approx.f32); kExact asks for full float32 math. The CPU kernel
// and float64 inputs are always exact.
enum class Precision : int { kFast, kExact };

// 2 / (C (C - 1)): the number of unordered pairs, inverted.
inline double pair_scale(long long num_classes) {
  return 2.0 / (static_cast<double>(num_classes) * static_cast<double>(num_classes - 1));
}

}  // namespace rankkd
