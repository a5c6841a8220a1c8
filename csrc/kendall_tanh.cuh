// The tanh flavours of the CUDA pair kernel and where each one runs. Per pair the kernel needs two tanh (student and
// teacher difference); on an H100 the special-function unit (MUFU) does 16 of them per clock per SM against 128
// FMA-pipe operations, so which unit a flavour uses decides the kernel's speed.
//
//   flavour      instructions                         max error (float32)
//   tanh_exact   12 FMA-pipe/ALU, MUFU.EX2, MUFU.RCP  2 ulp (CUDA's tanhf without fast-math); double: libdevice
//   tanh_approx  1 MUFU.TANH                          2^-10.99 relative by the PTX spec; about 1.1e-5 (16.5 bits)
//                                                     as measured and reported on NVIDIA's developer forum
//   tanh_poly    16 FMA-pipe/ALU                      5.0e-5 relative, exactly +-1 for |x| >= 5.5 (below)
#pragma once

namespace rankkd {
namespace cuda {

// CUDA's tanhf is both more accurate and cheaper here than kendall.h's rational_tanh, whose IEEE division costs about
// 10 more instructions per call (the CPU kernel needs the rational form to vectorize; a GPU has the MUFU for exp).
__device__ __forceinline__ float tanh_exact(float x) { return ::tanhf(x); }

// Float64 is the checking path: an out-of-line call keeps each kernel from inlining 64 copies of libdevice's tanh,
// which would only add compile time.
__device__ __noinline__ inline double tanh_exact(double x) { return ::tanh(x); }

// One MUFU.TANH. Written as PTX so that it does not depend on --use_fast_math, which this project does not pass.
// Beyond |x| = 9.02, where tanhf itself rounds to +-1, the result is pinned to exactly +-1: the PTX spec does not
// promise the hardware saturates exactly, and sech^2 = 1 - tanh^2 would otherwise pick up a bias from each of the
// many saturated pairs of a widely spread row (two ALU instructions, off the special-function unit).
__device__ __forceinline__ float tanh_approx(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return fabsf(x) >= 9.02f ? copysignf(1.0f, x) : y;
#else
  return ::tanhf(x);
#endif
}

// tanh(x) = sign(x) min(1, u Q(u - 2.75)), u = min(|x|, 5.5), Q of degree 11: a minimax fit of the relative error
// made for this project, with Q such that u Q reaches 1 at u = 5.5, so every |x| >= 5.5 gives exactly +-1 (max
// relative error 5.0e-5 in float32 Horner; 1 - tanh(5.5) = 3.3e-5). Exact saturation matters more than the error
// bound: sech^2 = 1 - tanh^2 is summed over every pair, and a tanh that stopped short of 1 would add a bias from
// each of the many saturated pairs of a wide row. Only FMA-pipe and ALU instructions: FMNMX, FADD, 11 FFMA, FMUL,
// FMNMX, LOP3. The mixed variant computes a share of the teacher tanh with it, taking that work off the MUFU.
__device__ __forceinline__ float tanh_poly(float x) {
  constexpr float kClamp = 5.5f;
  constexpr float kCenter = 2.75f;
  constexpr float kQ[12] = {3.60669225e-01f,  -1.25333309e-01f, 3.98048498e-02f,  -1.03583261e-02f,
                            1.76632905e-03f,  -2.41337490e-04f, -1.48816707e-06f, 1.65704914e-04f,
                            -1.02003251e-04f, 8.81966116e-06f,  6.56913289e-06f,  -1.28606541e-06f};
  const float u = fminf(fabsf(x), kClamp);
  const float v = u - kCenter;
  float q = kQ[11];
#pragma unroll
  for (int n = 10; n >= 0; --n) q = fmaf(q, v, kQ[n]);
  return copysignf(fminf(q * u, 1.0f), x);
}

}  // namespace cuda
}  // namespace rankkd
