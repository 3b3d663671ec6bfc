"""Find, build and load the C++ extension that registers the ``torch.ops.cpift`` kernels.

Loading the shared library is all it takes: its static initialisers register the CPU (and, where
built, CUDA) kernels with the dispatcher. The library comes from one of two places, tried in order:

1. **prebuilt** — ``cpift_fast/_C*.so``, compiled by setup.py when torch was importable at install
   time (``pip install --no-build-isolation``, ``make install``, a wheel made with
   ``pip wheel --no-build-isolation``). A record ``_C.build.json`` beside it says how.
2. **jit** — compiled on first use with ``torch.utils.cpp_extension.load`` from the sources
   installed with the package (``cpift_fast/csrc``; ``csrc/`` of a source checkout), into
   ``cache_dir()/<key>/``. The key names torch, Python and CUDA and hashes the flags and the source
   text, so a new torch or new sources compile anew and never load a stale library. One process
   compiles; others wait on an ``flock`` of the build directory (released by the kernel if the
   compiling process dies).

CPU code: no ``-march=native``. Every kernel source is compiled once per CPU capability — DEFAULT
(the architecture's baseline, with the extension itself) and, on x86-64, AVX2 and AVX512 (extra
objects, :func:`capability_objects`, flags in ``CAPABILITY_FLAGS``) — and the kernels choose among
them at run time (csrc/dispatch.h), so one build runs on every x86-64 (and aarch64) machine.

A prebuilt library that does not load (built against another torch) falls through to the JIT
build, with one line on stderr saying so.

Compile flags live here and only here; setup.py loads this file by path (in pip's isolated build
environment there is no torch), so nothing at module level may import torch or cpift_fast.

Environment: ``CPIFT_SKIP_EXT=1`` (no extension: pure-PyTorch/Triton paths), ``CPIFT_CACHE_DIR``
(JIT cache), ``FORCE_CUDA=1`` (CUDA kernels without a visible GPU), ``TORCH_CUDA_ARCH_LIST`` (GPU
archs), ``MAX_JOBS`` (parallel compile jobs), ``CXX`` (the compiler of the capability objects),
``CPIFT_CPU_CAPABILITIES`` (compile only these capabilities, e.g. ``default`` or ``default,avx2``).
At run time ``ATEN_CPU_CAPABILITY=default|avx2|avx512`` caps the capability, as for torch's own
kernels.
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
import subprocess
import sys
import sysconfig
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# flags: the one source for setup.py, the JIT build and `make cuda-check`
# --------------------------------------------------------------------------------------------

#: -ffp-contract=off: no fused multiply-add contraction, so float results are bit-exact across
#: compilers and flags (the same rule as nvcc's --fmad=false below). -fno-math-errno: sqrt vectorizes
#: (the kernels never read errno; results are unchanged). -g0: no debug info, overriding the -g in
#: Python's own CFLAGS that setuptools puts first (it doubled each file's compile time, 40 s -> 19 s
#: for csrc/select.cpp, and made the objects ~25x larger).
CXX_FLAGS = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=off", "-fno-math-errno", "-g0"]
#: x86-64 capabilities compiled beside DEFAULT: each kernel source once more per entry, with these
#: flags (what the capability's kernels may use; csrc/dispatch.cpp checks the CPU has it all).
CAPABILITY_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mpopcnt"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mpopcnt"],
}
#: Sources compiled once, with the extension (the others are kernel sources, one per op).
SHARED_SOURCES = ("module.cpp", "dispatch.cpp")
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DCPIFT_WITH_CUDA", "--fmad=false"]
LINK_FLAGS = ["-fopenmp"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"
JIT_NAME = "cpift_fast_C"
BUILD_RECORD = "_C.build.json"


def cxx_flags(*, cuda: bool) -> list[str]:
    """Flags of every C++ compile; -DCPIFT_WITH_<CAP> tells the registering compile (csrc/dispatch.h)
    which extra capabilities' kernels exist."""
    return CXX_FLAGS + [f"-DCPIFT_WITH_{cap}" for cap in capabilities()[1:]] + (["-DCPIFT_WITH_CUDA"] if cuda else [])


def capabilities(machine: str | None = None) -> list[str]:
    """The CPU capabilities compiled on `machine` (default: this one), DEFAULT first: every one the
    architecture has (x86-64: DEFAULT, AVX2, AVX512; others: DEFAULT), or the subset named in
    ``$CPIFT_CPU_CAPABILITIES`` (comma-separated, any case; DEFAULT is always compiled). A subset
    builds faster; kernels then run at the best compiled capability the CPU supports."""
    machine = (machine or platform.machine()).lower()
    available = ["DEFAULT"] + (list(CAPABILITY_FLAGS) if machine in ("x86_64", "amd64") else [])
    wanted = os.environ.get("CPIFT_CPU_CAPABILITIES", "").strip()
    if not wanted:
        return available
    names = {name.strip().upper() for name in wanted.split(",") if name.strip()}
    unknown = sorted(names - set(available))
    if unknown:
        raise ValueError(f"CPIFT_CPU_CAPABILITIES={wanted!r}: {', '.join(unknown)} cannot be compiled on "
                         f"{machine}; choose among {', '.join(available)}")
    return [cap for cap in available if cap == "DEFAULT" or cap in names]


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


def kernel_sources(root: Path | str) -> list[str]:
    """The sources compiled once per capability: csrc/*.cpp but SHARED_SOURCES."""
    return [p for p in sources(root, cuda=False) if os.path.basename(p) not in SHARED_SOURCES]


def capability_objects(root: Path | str, build_dir: Path | str, *, cuda: bool, compiler: str | None = None,
                       jobs: int | None = None) -> list[str]:
    """Compile every kernel source once per capability but DEFAULT into ``build_dir/<capability>/``
    and return the object files, to be linked after the extension's own objects (csrc/dispatch.h
    says why). An object is rebuilt when its command line, its source or a header changed.
    `compiler`: $CXX, else c++; `jobs`: $MAX_JOBS, else the CPU count."""
    import torch
    from torch.utils.cpp_extension import include_paths

    compiler = compiler or os.environ.get("CXX") or "c++"
    jobs = jobs or int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    common = [compiler, "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}", *cxx_flags(cuda=cuda)]
    newest_header = max((os.path.getmtime(h) for h in headers(root)), default=0.0)
    commands = []
    for cap in capabilities()[1:]:
        out_dir = Path(build_dir) / cap
        out_dir.mkdir(parents=True, exist_ok=True)
        for src in kernel_sources(root):
            obj = out_dir / (Path(src).stem + ".o")
            cmd = [*common, *CAPABILITY_FLAGS[cap], f"-DCPIFT_CAP={cap}", f"-DCPU_CAPABILITY={cap}",
                   f"-DCPU_CAPABILITY_{cap}", "-c", src, "-o", str(obj)]
            commands.append((obj, cmd, max(os.path.getmtime(src), newest_header)))

    def build(obj: Path, cmd: list[str], newest_input: float) -> None:
        record = obj.with_suffix(".cmd")
        line = " ".join(cmd)
        if obj.exists() and record.exists() and record.read_text() == line and obj.stat().st_mtime >= newest_input:
            return
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {obj.parent.name} kernels failed: {line}\n{done.stderr[-3000:]}")
        record.write_text(line)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(build, *c) for c in commands]:
            future.result()
    return [str(obj) for obj, _, _ in commands]


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


def cache_dir() -> Path:
    """$CPIFT_CACHE_DIR, else $XDG_CACHE_HOME/cpift_fast, else ~/.cache/cpift_fast."""
    if os.environ.get("CPIFT_CACHE_DIR"):
        return Path(os.environ["CPIFT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cpift_fast"


def build_record(*, how: str, cuda: bool, archs: str | None, path: str | None,
                 cache: str | None = None) -> dict[str, Any]:
    """How a library was (or will be) built: what `cpift info` shows and setup.py writes down."""
    import torch

    return {
        "how": how,
        "path": path,
        "built_against_torch": torch.__version__,
        "cxx_flags": cxx_flags(cuda=cuda),
        "cpu_capability_flags": {cap: CAPABILITY_FLAGS.get(cap, []) for cap in capabilities()},
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
        record = {"cxx_flags": None, "cpu_capability_flags": None, "cuda": None, "cuda_archs": None,
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
    srcs = sources(root, cuda=cuda)
    digest = hashlib.sha256()
    digest.update(json.dumps([cxx_flags(cuda=cuda), CAPABILITY_FLAGS, capabilities(), NVCC_FLAGS if cuda else None,
                              archs, LINK_FLAGS, torch.__version__, torch.version.git_version, sys.version,
                              os.environ.get("CXX")]).encode())
    for path in srcs + headers(root):
        digest.update(os.path.relpath(path, root).encode() + b"\0" + Path(path).read_bytes() + b"\0")
    tag = f"cu{torch.version.cuda.replace('.', '')}" if cuda else "cpu"
    key = f"torch{torch.__version__.replace('+', '-')}-py{sys.version_info[0]}{sys.version_info[1]}-{tag}-" \
          f"{digest.hexdigest()[:16]}"
    return {"root": root, "sources": srcs, "cuda": cuda, "archs": archs, "build_dir": cache_dir() / key}


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
    record = build_record(how="jit", cuda=plan["cuda"], archs=plan["archs"], path=str(library),
                          cache=str(cache_dir()))
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
                 f"({len(plan['sources'])} sources, {' '.join(record['cxx_flags'])}{archs}; CPU capabilities "
                 f"{', '.join(capabilities())}) into {build_dir}; once per torch/flags/sources, a few minutes")
        saved_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if plan["cuda"]:
            os.environ["TORCH_CUDA_ARCH_LIST"] = plan["archs"]
        try:
            objects = capability_objects(plan["root"], build_dir / "capabilities", cuda=plan["cuda"])
            cpp_extension.load(
                name=JIT_NAME, sources=plan["sources"], build_directory=str(build_dir),
                extra_cflags=record["cxx_flags"], extra_cuda_cflags=NVCC_FLAGS if plan["cuda"] else None,
                extra_ldflags=LINK_FLAGS + objects, with_cuda=plan["cuda"], is_python_module=False, verbose=False)
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
    built_against_torch, cxx_flags, cpu_capability_flags, cuda, cuda_archs, nvcc_flags, cache_dir (the
    JIT cache that is or would be used), error (why it is not loaded, after load()); the CPU
    capability the kernels use (cpu_capability), the ones compiled and the ones this CPU supports
    (None without the extension), and torch's (torch_cpu_capability)."""
    import torch

    info = dict(_INFO)
    if info.get("cache_dir") is None:
        info["cache_dir"] = str(cache_dir())
    loaded = info.get("how") is not None
    cpu = torch.ops.cpift_cpu if loaded else None
    info["cpu_capability"] = cpu.capability() if loaded else None
    info["cpu_capabilities_compiled"] = list(cpu.compiled_capabilities()) if loaded else None
    info["cpu_capabilities_supported"] = list(cpu.supported_capabilities()) if loaded else None
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info
