"""Find, build and load the C++ extension that registers the ``torch.ops.cpift`` kernels.

Loading the shared library is all it takes: its static initialisers register the CPU (and, where
built, CUDA) kernels with the dispatcher. The library comes from one of two places, tried in order:

1. **prebuilt** — ``cpift_fast/_C*.so``, compiled by setup.py when torch was importable at install
   time (``pip install --no-build-isolation``, ``make install``, a wheel made with
   ``pip wheel --no-build-isolation``). A record ``_C.build.json`` beside it says how.
2. **jit** — compiled on first use with ``torch.utils.cpp_extension.load`` from the sources
   installed with the package (``cpift_fast/csrc``; ``csrc/`` of a source checkout), into
   ``cache_dir()/<key>/``. The key names torch, Python and CUDA and hashes the flags, the source
   text and (for ``-march=native``) the CPU, so a new torch, new sources or another CPU model
   compile anew and never load a stale library. One process compiles; others wait on an ``flock``
   of the build directory (released by the kernel if the compiling process dies).

A prebuilt library that does not load (built against another torch) falls through to the JIT
build, with one line on stderr saying so.

Compile flags live here and only here; setup.py loads this file by path (in pip's isolated build
environment there is no torch), so nothing at module level may import torch or cpift_fast.

Environment: ``CPIFT_SKIP_EXT=1`` (no extension: pure-PyTorch/Triton paths), ``CPIFT_PORTABLE=1``
(no ``-march=native``), ``CPIFT_CACHE_DIR`` (JIT cache), ``FORCE_CUDA=1`` (CUDA kernels without a
visible GPU), ``TORCH_CUDA_ARCH_LIST`` (GPU archs), ``MAX_JOBS`` (parallel compile jobs).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# flags: the one source for setup.py, the JIT build and `make cuda-check`
# --------------------------------------------------------------------------------------------

#: -ffp-contract=off: no fused multiply-add contraction, so float results are bit-exact across
#: compilers and flags (the same rule as nvcc's --fmad=false below).
CXX_FLAGS = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=off"]
NATIVE_FLAG = "-march=native"
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DCPIFT_WITH_CUDA", "--fmad=false"]
LINK_FLAGS = ["-fopenmp"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"
JIT_NAME = "cpift_fast_C"
BUILD_RECORD = "_C.build.json"


def portable(wheel: bool = False) -> bool:
    """True when the build must run on any CPU of its architecture: CPIFT_PORTABLE=1, or a wheel
    (a wheel moves between machines, so it never carries -march=native)."""
    return wheel or os.environ.get("CPIFT_PORTABLE") == "1"


def cxx_flags(*, portable: bool, cuda: bool) -> list[str]:
    return CXX_FLAGS + ([] if portable else [NATIVE_FLAG]) + (["-DCPIFT_WITH_CUDA"] if cuda else [])


def source_root() -> Path | None:
    """The csrc directory: installed as package data, else the one of a source checkout."""
    here = Path(__file__).resolve().parent
    for root in (here / "csrc", here.parent / "csrc"):
        if any(root.glob("*.cpp")):
            return root
    return None


def sources(root: Path | str, *, cuda: bool) -> list[str]:
    """Every translation unit of the extension: csrc/*.cpp, plus csrc/cuda/*.cu for a CUDA build."""
    root = str(root)
    found = sorted(glob.glob(os.path.join(root, "*.cpp")))
    if cuda:
        found += sorted(glob.glob(os.path.join(root, "cuda", "*.cu")))
    return found


def headers(root: Path | str) -> list[str]:
    root = str(root)
    return sorted(p for pattern in ("*.h", "*.cuh", "cuda/*.h", "cuda/*.cuh")
                  for p in glob.glob(os.path.join(root, pattern)))


def find_nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def want_cuda() -> tuple[bool, str]:
    """(build the CUDA kernels?, why). FORCE_CUDA=1, or a CUDA torch with nvcc found."""
    import torch

    if os.environ.get("FORCE_CUDA") == "1":
        return True, "FORCE_CUDA=1"
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} has no CUDA"
    if find_nvcc() is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc is found"


def cuda_archs() -> str:
    """TORCH_CUDA_ARCH_LIST if set, else the compute capabilities of the local GPUs, else 8.0;9.0."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_CUDA_ARCHS


def cpu_model() -> str:
    """Model name and ISA flags of this CPU (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = {key.strip(): value for key, value in
                      (line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)}
        return f"{fields.get('model name', '').strip()} | {fields.get('flags', fields.get('Features', '')).strip()}"
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cache_dir() -> Path:
    """$CPIFT_CACHE_DIR, else $XDG_CACHE_HOME/cpift_fast, else ~/.cache/cpift_fast."""
    if os.environ.get("CPIFT_CACHE_DIR"):
        return Path(os.environ["CPIFT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cpift_fast"


def build_record(*, how: str, portable_build: bool, cuda: bool, archs: str | None, path: str | None,
                 cache: str | None = None) -> dict[str, Any]:
    """How a library was (or will be) built: what `cpift info` shows and setup.py writes down."""
    import torch

    return {
        "how": how,
        "path": path,
        "built_against_torch": torch.__version__,
        "cxx_flags": cxx_flags(portable=portable_build, cuda=cuda),
        "cpu_target": "portable (the compiler's default ISA)" if portable_build
        else f"native ({cpu_model().split(' | ')[0] or platform.machine()})",
        "cuda": cuda,
        "cuda_archs": archs if cuda else None,
        "nvcc_flags": NVCC_FLAGS if cuda else None,
        "cache_dir": cache,
    }


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_INFO: dict[str, Any] = {"how": None}


def _say(message: str) -> None:
    print(f"cpift_fast: {message}", file=sys.stderr, flush=True)


def _load_prebuilt() -> tuple[bool, str | None]:
    """(True, None) loaded; (False, None) none installed; (False, reason) one that does not load."""
    try:
        spec = importlib.util.find_spec("cpift_fast._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return False, None
    try:
        importlib.import_module("cpift_fast._C")
    except (ImportError, OSError) as exc:
        return False, f"{spec.origin} does not load ({exc})"
    record_path = Path(spec.origin).with_name(BUILD_RECORD)
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {"cxx_flags": None, "cpu_target": None, "cuda": None, "cuda_archs": None,
                  "note": f"no readable build record {record_path}"}
    _INFO.update(record, how="prebuilt", path=spec.origin)
    return True, None


def _ensure_ninja_on_path() -> None:
    """torch's JIT build runs `ninja` from PATH; a venv's bin/ or the ninja wheel has it too."""
    if shutil.which("ninja"):
        return
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI wheel ships the binary

        candidates.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for directory in candidates:
        if os.path.exists(os.path.join(directory, "ninja")):
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return


def _jit_plan() -> dict[str, Any]:
    import torch

    root = source_root()
    if root is None:
        raise FileNotFoundError("the C++ sources (csrc/*.cpp) are not installed with cpift_fast; reinstall it")
    cuda, _ = want_cuda()
    archs = cuda_archs() if cuda else None
    is_portable = portable()
    srcs = sources(root, cuda=cuda)
    digest = hashlib.sha256()
    digest.update(json.dumps([cxx_flags(portable=is_portable, cuda=cuda), NVCC_FLAGS if cuda else None, archs,
                              LINK_FLAGS, torch.__version__, torch.version.git_version, sys.version,
                              None if is_portable else cpu_model()]).encode())
    for path in srcs + headers(root):
        digest.update(os.path.relpath(path, root).encode() + b"\0" + Path(path).read_bytes() + b"\0")
    tag = f"cu{torch.version.cuda.replace('.', '')}" if cuda else "cpu"
    key = f"torch{torch.__version__.replace('+', '-')}-py{sys.version_info[0]}{sys.version_info[1]}-{tag}-" \
          f"{digest.hexdigest()[:16]}"
    return {"root": root, "sources": srcs, "cuda": cuda, "archs": archs, "portable": is_portable,
            "build_dir": cache_dir() / key}


def _load_jit() -> tuple[bool, str | None]:
    import fcntl

    from torch.utils import cpp_extension

    try:
        plan = _jit_plan()
        build_dir: Path = plan["build_dir"]
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return False, f"cannot prepare the JIT build ({exc}); set CPIFT_CACHE_DIR to a writable directory"
    except FileNotFoundError as exc:
        return False, str(exc)
    _ensure_ninja_on_path()
    library = build_dir / f"{JIT_NAME}.so"
    record = build_record(how="jit", portable_build=plan["portable"], cuda=plan["cuda"], archs=plan["archs"],
                          path=str(library), cache=str(cache_dir()))
    try:
        lock = open(build_dir / "cpift.lock", "a")
    except OSError as exc:  # a read-only cache (built once by someone else): load what is there
        if not library.exists():
            return False, f"cannot write the JIT cache {build_dir} ({exc}); set CPIFT_CACHE_DIR to a writable directory"
        import torch

        torch.ops.load_library(str(library))  # the key hashes flags and sources: this is the right build
        _INFO.update(record)
        return True, None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process that is compiling the C++ extension in {build_dir}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        # Holding the flock, no other cpift process is inside torch's build: a baton file torch
        # left behind is from a killed process and would make its FileBaton wait forever.
        (build_dir / "lock").unlink(missing_ok=True)
        if not library.exists():
            archs = f", CUDA archs {plan['archs']}" if plan["cuda"] else ", CPU only"
            _say(f"compiling the C++ extension for torch {record['built_against_torch']} "
                 f"({len(plan['sources'])} sources, {' '.join(record['cxx_flags'])}{archs}) into {build_dir}; "
                 "once per torch/flags/sources, a few minutes")
        saved_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if plan["cuda"]:
            os.environ["TORCH_CUDA_ARCH_LIST"] = plan["archs"]
        try:
            cpp_extension.load(
                name=JIT_NAME, sources=plan["sources"], build_directory=str(build_dir),
                extra_cflags=record["cxx_flags"], extra_cuda_cflags=NVCC_FLAGS if plan["cuda"] else None,
                extra_ldflags=LINK_FLAGS, with_cuda=plan["cuda"], is_python_module=False, verbose=False)
        except Exception as exc:  # compiler missing, compile error, ninja missing: say which, keep going
            text = str(exc).strip()
            return False, (f"the JIT build of the C++ extension failed in {build_dir}: "
                           f"{text[-1500:] if len(text) > 1500 else text}")
        finally:
            if saved_archs is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved_archs
    _INFO.update(record)
    return True, None


@functools.cache
def _load() -> tuple[bool, str | None]:
    if os.environ.get("CPIFT_SKIP_EXT") == "1":
        return False, "CPIFT_SKIP_EXT=1 at import"
    ok, problem = _load_prebuilt()
    if ok:
        return True, None
    if problem is not None:
        _say(f"the prebuilt extension cannot be used: {problem}; building it for this torch instead")
    ok, reason = _load_jit()
    if not ok:
        _say(f"C++ kernels unavailable, ops run on the pure-PyTorch path: {reason}")
        if problem is not None:
            reason = f"{problem}; then {reason}"
    return ok, reason


def load() -> tuple[bool, str | None]:
    """Register the C++ ops: (True, None), or (False, the reason they are not available).

    Decided once per process (cached), at the first call: CPIFT_SKIP_EXT=1 then gives
    (False, "CPIFT_SKIP_EXT=1 at import") and loads nothing."""
    with _LOCK:
        ok, reason = _load()
    if not ok:
        _INFO.update(how=None, error=reason)
    return ok, reason


def build_info() -> dict[str, Any]:
    """How the loaded extension was built: how ("prebuilt", "jit" or None), path,
    built_against_torch, cxx_flags, cpu_target, cuda, cuda_archs, nvcc_flags, cache_dir (the JIT cache
    that is or would be used), error (why it is not loaded, after load()), cpu_capability_here (the
    vector ISA torch detects on this machine)."""
    import torch

    info = dict(_INFO)
    if info.get("cache_dir") is None:
        info["cache_dir"] = str(cache_dir())
    info["cpu_capability_here"] = torch.backends.cpu.get_cpu_capability()  # what torch finds on this CPU
    return info
