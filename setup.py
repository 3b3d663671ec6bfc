"""Build cpift_fast and its extension `cpift_fast._C`.

- CPU: a CppExtension from csrc/*.cpp (OpenMP, -O3; -march=native unless CPIFT_PORTABLE=1).
- CUDA: a CUDAExtension that adds csrc/cuda/*.cu when torch was built with CUDA and nvcc is
  found, or when FORCE_CUDA=1 (TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured by torch).
- CPIFT_SKIP_EXT=1: pure Python; every op then runs on the Triton or the pure-PyTorch path.

Install with `pip install --no-build-isolation -e .` so the extension compiles against the torch
already installed.
"""

import glob
import os
import shutil

from setuptools import setup

PACKAGES = ["cpift_fast", "cpift_fast.pipeline", "cpift_fast.kernels"]
PACKAGE_DIR = {"cpift_fast.kernels": "kernels"}


def _want_cuda(torch_module) -> bool:
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    from torch.utils.cpp_extension import CUDA_HOME

    has_nvcc = shutil.which("nvcc") is not None or (
        CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    return bool(torch_module.version.cuda) and has_nvcc


def _extensions():
    if os.environ.get("CPIFT_SKIP_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-fopenmp", "-std=c++20", "-fdiagnostics-color=always"]
    if os.environ.get("CPIFT_PORTABLE") != "1":
        cxx.append("-march=native")
    sources = sorted(glob.glob("csrc/*.cpp"))
    if _want_cuda(torch):
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "cpift_fast._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DCPIFT_WITH_CUDA"], "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DCPIFT_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("cpift_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
