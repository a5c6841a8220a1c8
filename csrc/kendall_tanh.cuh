// The two tanh of the CUDA pair kernel, one per precision (kendall.h). Per pair the kernel needs two tanh (student and
// teacher difference); on an H100 the special-function unit (MUFU) does 16 of them per clock per SM against 128
// FMA-pipe operations, so which unit a tanh uses decides the kernel's speed.
//
//   precision  function     instructions                         max error (float32)
//   exact      tanh_exact   12 FMA-pipe/ALU, MUFU.EX2, MUFU.RCP  2 ulp (CUDA's tanhf without fast-math);
//                                                                double: libdevice
//   fast       tanh_approx  1 MUFU.TANH                          2^-10.99 relative by the PTX spec; about 1.1e-5
//                                                                (16.5 bits) as measured on NVIDIA's developer forum
#pragma once

namespace rankkd {
namespace cuda {

// CUDA's tanhf is both more accurate and cheaper here than the CPU kernel's rational_tanh (kendall_cpu_math.h), whose
// IEEE division costs about 10 more instructions per call (the CPU kernel needs the rational form to vectorize; a GPU
// has the MUFU for exp).
__device__ __forceinline__ float tanh_exact(float x) { return ::tanhf(x); }

// Float64 is the checking path: an out-of-line call keeps each kernel from inlining 64 copies of libdevice's tanh,
// which would only add compile time.
__device__ __noinline__ inline double tanh_exact(double x) { return ::tanh(x); }

// One MUFU.TANH. Written as PTX so that it does not depend on --use_fast_math, which this project does not pass.
// kPin: beyond |x| = 9.02, where tanhf itself rounds to +-1, the result is pinned to exactly +-1, for the tanh values
// whose sech^2 = 1 - tanh^2 is taken: the PTX spec does not promise the hardware saturates exactly, and sech^2 would
// otherwise pick up a bias from each of the many saturated pairs of a widely spread row. A tanh that only enters
// products is off by its relative error either way and goes unpinned (two ALU instructions fewer).
template <bool kPin>
__device__ __forceinline__ float tanh_approx(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  if constexpr (kPin) return fabsf(x) >= 9.02f ? copysignf(1.0f, x) : y;
  return y;
#else
  return ::tanhf(x);
#endif
}

}  // namespace cuda
}  // namespace rankkd
