"""Builds rankkd._C: the C++ CPU kernels always; the CUDA kernels when a CUDA build of torch and nvcc are present,
or when FORCE_CUDA=1 (compile without a GPU, as CI does). TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured."""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

# setuptools >= 80 runs `setup.py develop` as `pip install -e .`: with build isolation that would compile against a
# second, freshly installed torch (or fail offline) instead of the torch this environment runs.
os.environ.setdefault("PIP_NO_BUILD_ISOLATION", "0")

ROOT = os.path.dirname(os.path.abspath(__file__))
# SASS for A100/A30 (sm_80, also run by sm_86/87 GPUs), L4/L40S/RTX 4090 (sm_89), H100/H200 (sm_90), B200/GB200
# (sm_100) and RTX 5090 / RTX PRO 6000 (sm_120, also run by sm_121), and PTX of the newest for GPUs after it. CI builds
# the same list, so CUDA code that does not compile for one of them fails there.
DEFAULT_ARCHS = "8.0;8.9;9.0;10.0;12.0+PTX"


def want_cuda():
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    cuda_sources = glob.glob(os.path.join(ROOT, "csrc", "*.cu"))
    if not cuda_sources:
        return False
    import torch

    have_toolkit = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime.h"))
    if force and not (torch.version.cuda and have_toolkit):
        raise RuntimeError(
            "FORCE_CUDA=1 needs a CUDA build of torch and the CUDA toolkit: set CUDA_HOME to the toolkit root that "
            f"holds bin/nvcc and include/cuda_runtime.h (found CUDA_HOME={cpp_extension.CUDA_HOME}, "
            f"torch.version.cuda={torch.version.cuda})")
    return force or bool(torch.version.cuda and have_toolkit)


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # -fopenmp: at::parallel_for is inlined here. -fno-trapping-math -fassociative-math -fno-signed-zeros: lets GCC
    # vectorize the branch-free pair loops and split their float sums into SIMD lanes (csrc/kendall_cpu.cpp);
    # finite-math assumptions stay off, so non-finite checks still work.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "rankkd._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return cpp_extension.CUDAExtension(
        "rankkd._C", sources + sorted(glob.glob(os.path.join("csrc", "*.cu"))),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"])


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
