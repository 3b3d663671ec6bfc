"""Build cpift_fast; metadata is in pyproject.toml, compile flags in cpift_fast/_extension.py.

The C++ extension `cpift_fast._C` is compiled here only when torch is importable at build time:

- `CPIFT_BUILD_EXT` unset (auto): compile when torch imports (`pip install --no-build-isolation`,
  `make install`); under pip's default build isolation there is no torch, so the wheel is pure
  Python plus the C++ sources (package data), and cpift_fast compiles them against the user's torch
  at first use (cpift_fast/_extension.py: JIT, cached).
- `CPIFT_BUILD_EXT=1`: compile or stop with the command that works; `CPIFT_BUILD_EXT=0` or
  `CPIFT_SKIP_EXT=1`: never compile here.
- CPU: csrc/*.cpp, never `-march=native`: each kernel source is compiled once per CPU capability
  (DEFAULT with the extension; AVX2, AVX512 on x86-64 as extra objects) and the kernels choose one
  at run time, so a wheel or a shared build runs on every CPU of its architecture.
- CUDA: csrc/cuda/*.cu too when torch has CUDA and nvcc is found, or FORCE_CUDA=1; GPU archs from
  TORCH_CUDA_ARCH_LIST, default the local GPUs, else 8.0;9.0. MAX_JOBS is honoured by torch.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# cpift_fast and every subpackage under it (the Triton kernels among them: cpift_fast/kernels/); the C++
# sources live beside it in csrc/ and install as data of cpift_fast.csrc.
PACKAGES = find_packages(where=str(HERE), include=["cpift_fast", "cpift_fast.*"]) + ["cpift_fast.csrc"]
PACKAGE_DIR = {"cpift_fast.csrc": "csrc"}
# The C++ sources travel with the package: the JIT build at first import compiles them.
PACKAGE_DATA = {"cpift_fast.csrc": ["*.cpp", "*.h", "*.cuh", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h"]}


def _extension_module():
    """cpift_fast/_extension.py loaded by path: importing cpift_fast would import torch."""
    spec = importlib.util.spec_from_file_location("_cpift_extension_build", HERE / "cpift_fast" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _want_prebuild() -> bool:
    mode = os.environ.get("CPIFT_BUILD_EXT", "").strip()
    if os.environ.get("CPIFT_SKIP_EXT") == "1" or mode == "0":
        return False
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        if mode == "1":
            sys.exit(f"CPIFT_BUILD_EXT=1 needs torch in the build environment, and it does not import ({exc}).\n"
                     "Install torch first, then build without pip's isolation:\n"
                     "    CPIFT_BUILD_EXT=1 pip install --no-build-isolation cpift_fast\n"
                     "(or drop CPIFT_BUILD_EXT=1: cpift_fast then compiles its extension at first import)")
        return False
    return True


def _extensions():
    if not _want_prebuild():
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    ext = _extension_module()
    cuda, why = ext.want_cuda()
    archs = ext.cuda_archs() if cuda else None
    if cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # what torch's BuildExtension reads
    srcs = [os.path.relpath(p, HERE) for p in ext.sources(HERE / "csrc", cuda=cuda)]
    args = {"extra_compile_args": {"cxx": ext.cxx_flags(cuda=cuda)}, "extra_link_args": ext.LINK_FLAGS}
    if cuda:
        args["extra_compile_args"]["nvcc"] = ext.NVCC_FLAGS
        extension = CUDAExtension("cpift_fast._C", srcs, **args)
    else:
        extension = CppExtension("cpift_fast._C", srcs, **args)

    class BuildExt(BuildExtension):
        """torch's BuildExtension, plus the kernels of the other CPU capabilities (extra objects) and a
        build record beside the library."""

        def build_extensions(self):
            print(f"cpift_fast: building the C++ extension from {len(srcs)} sources, CPU capabilities "
                  f"{', '.join(ext.capabilities())}; CUDA: {why}" + (f", archs {archs}" if cuda else ""),
                  file=sys.stderr)
            super().build_extensions()
            self._record = ext.build_record(how="prebuilt", cuda=cuda, archs=archs, path=None)
            self._record["built_by"] = " ".join(["setup.py", *self.distribution.commands])
            self._write_records()  # beside the library in build_lib (what a wheel holds)

        def build_extension(self, extension):
            extension.extra_objects = ext.capability_objects(HERE / "csrc", Path(self.build_temp) / "capabilities",
                                                             cuda=cuda)
            super().build_extension(extension)

        def run(self):
            super().run()
            if self.inplace:  # editable install / build_ext --inplace: the library was copied to the source
                self._write_records()

        def _write_records(self):
            for e in self.extensions:
                target = Path(self.get_ext_fullpath(e.name)).with_name(ext.BUILD_RECORD)
                tmp = target.with_name(target.name + ".tmp")
                tmp.write_text(json.dumps(self._record, indent=1) + "\n")
                tmp.replace(target)

    return [extension], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA, ext_modules=ext_modules,
      cmdclass=cmdclass)
