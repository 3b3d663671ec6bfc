"""Packaging (issue 16): what a user gets from `pip install`.

- The sdist holds every source a CPU or a CUDA build compiles (the files setup.py globs, every
  header they include, transitively), every Python package, LICENSE and README, and nothing built.
- Installed into a fresh venv that holds only torch, both without build isolation (the extension is
  compiled at install: "prebuilt") and with pip's default
  isolation (no torch at build time: compiled at first import, "jit"), cpift_fast imports and one
  MaskedAdamW step on the C++ backend matches the pure-PyTorch step, and `cpift bench mask` runs
  (its records in ./cpift-bench). Two processes importing at once compile once.

Needs the `build` package (the [dev] extra) and pip access to torch (this machine has a local file
of the running torch's version) and to cpift_fast's dependencies. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# One masked AdamW step on the C++ backend, compared with the same step on the pure-PyTorch path.
STEP = r"""
import json, os, sys
import torch
import cpift_fast
from cpift_fast._extension import build_info

def step(backend):
    os.environ["CPIFT_BACKEND"] = backend
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000, generator=g))
    frozen = torch.rand(1000, generator=g) < 0.3
    opt = cpift_fast.MaskedAdamW([p], lr=0.1, frozen={p: frozen})
    for _ in range(2):
        p.grad = torch.randn(1000, generator=g)
        opt.step()
    return p.detach(), frozen

before = torch.randn(1000, generator=torch.Generator().manual_seed(0))
cpp, frozen = step("cpp")
ref, _ = step("torch")
torch.testing.assert_close(cpp, ref)
assert torch.equal(cpp[frozen], before[frozen]), "a frozen element moved"
assert not torch.equal(cpp[~frozen], before[~frozen]), "no trainable element moved"
print(json.dumps({"version": cpift_fast.__version__, "file": cpift_fast.__file__,
                  "extension": cpift_fast.backend_info()["built"]["extension"], "build": build_info()}))
"""


def _run(cmd, *, env=None, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without this checkout, this venv or any cpift setting."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CPIFT_", "PYTHON", "VIRTUAL_ENV", "TORCH_CUDA_ARCH", "FORCE_CUDA"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix))))
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


def _extension_module():
    spec = importlib.util.spec_from_file_location("_cpift_extension_test", ROOT / "cpift_fast" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup_constant(name: str):
    """A literal assignment of setup.py (PACKAGES, PACKAGE_DIR), read without running it."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no literal {name}")


def _included_headers(path: Path) -> set[Path]:
    """Project headers reached from `path` through #include "..." (resolved beside the includer)."""
    found: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', current.read_text(), flags=re.M):
            header = (current.parent / name).resolve()
            assert header.exists(), f'{current}: #include "{name}" not found beside it'
            if header not in found:
                found.add(header)
                todo.append(header)
    return found


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, ROOT])
    (tarball,) = out.glob("cpift_fast-*.tar.gz")
    return tarball


def _sdist_names(tarball: Path) -> set[str]:
    with tarfile.open(tarball) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = names[0].split("/")[0]
    assert all(n.startswith(top + "/") for n in names)
    return {n[len(top) + 1:] for n in names}


def test_sdist_holds_every_source(sdist):
    names = _sdist_names(sdist)
    ext = _extension_module()
    compiled = [Path(p) for p in ext.sources(ROOT / "csrc", cuda=True)]
    assert any(p.suffix == ".cpp" for p in compiled) and any(p.suffix == ".cu" for p in compiled)
    needed = set(compiled)
    for source in compiled:
        needed |= _included_headers(source)
    needed_names = {p.relative_to(ROOT).as_posix() for p in needed}
    assert not needed_names - names, f"the sdist lacks sources setup.py compiles: {sorted(needed_names - names)}"

    # every module of the package tree (cpift_fast/ and what PACKAGE_DIR maps into it), subpackages too
    roots = {"cpift_fast", *_setup_constant("PACKAGE_DIR").values()}
    modules = {p.relative_to(ROOT).as_posix() for root in roots for p in (ROOT / root).rglob("*.py")}
    assert "cpift_fast/_extension.py" in modules
    assert not modules - names, f"the sdist lacks Python modules: {sorted(modules - names)}"
    assert {"LICENSE", "README.md", "pyproject.toml", "setup.py", "cpift_fast/_version.py"} <= names
    built = sorted(n for n in names if n.endswith((".so", ".o", ".pyc")) or n.endswith("_C.build.json"))
    assert not built, f"the sdist holds build outputs: {built}"


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv (not --system-site-packages) holding torch, the running torch's release."""
    path = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", path], env=_clean_env())
    release = torch.__version__.split("+")[0]
    _run([path / "bin" / "python", "-m", "pip", "install", "-q", f"torch=={release}"], env=_clean_env())
    return path


def _installed_files(venv: Path) -> list[str]:
    out = _run([venv / "bin" / "python", "-m", "pip", "show", "-f", "cpift_fast"], env=_clean_env()).stdout
    return [line.strip() for line in out.split("Files:")[1].splitlines() if line.strip()]


def _step(venv: Path, cwd: Path, cache: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([str(venv / "bin" / "python"), "-c", STEP], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_clean_env(CPIFT_CACHE_DIR=str(cache), **env))


def _finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"the MaskedAdamW step failed:\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1]), err


def test_install_without_build_isolation_prebuilds(sdist, venv, tmp_path):
    """The smallest build, DEFAULT alone (CPIFT_CPU_CAPABILITIES=default: the fewest compiles in CI).
    The full set is the checkout's own build, which `make install` compiles and test_cpu_capability
    checks; the first-use test below builds a subset with a gap."""
    py = venv / "bin" / "python"
    subset = {"CPIFT_CPU_CAPABILITIES": "default"}
    _run([py, "-m", "pip", "install", "-q", "setuptools>=77", "wheel"], env=_clean_env())
    _run([py, "-m", "pip", "install", "-q", "--no-build-isolation", sdist], env=_clean_env(**subset))
    try:
        files = _installed_files(venv)
        assert any(re.fullmatch(r"cpift_fast/_C\..*\.so", f) for f in files), files
        info, err = _finish(_step(venv, tmp_path, tmp_path / "cache"))
        assert info["extension"] is True and info["build"]["how"] == "prebuilt", (info, err)
        assert str(venv) in info["file"], f"imported {info['file']}, not the installed package"
        # pip builds a wheel from the sdist: the capabilities asked for, never -march=native
        assert "-march=native" not in info["build"]["cxx_flags"] and "-ffp-contract=off" in info["build"]["cxx_flags"]
        assert info["build"]["cpu_capabilities_compiled"] == ["default"]
        assert info["build"]["cpu_capability"] == "default", info["build"]
        assert not (tmp_path / "cache").exists(), "a prebuilt install compiled again at import"
        version = _run([venv / "bin" / "cpift", "--version"], env=_clean_env(), cwd=tmp_path).stdout.split()
        assert version == ["cpift_fast", info["version"]] and info["version"] == _extension_version()
        # the benchmark suite ships in the package; outside a checkout its records go to ./cpift-bench
        _run([venv / "bin" / "cpift", "bench", "mask", "--size", "quick", "--no-progress"], env=_clean_env(),
             cwd=tmp_path)
        record = json.loads((tmp_path / "cpift-bench" / "mask.json").read_text())
        assert record["op"] == "mask" and record["meta"]["versions"]["cpift_fast"] == info["version"]
    finally:
        _run([py, "-m", "pip", "uninstall", "-y", "-q", "cpift_fast"], env=_clean_env())


def test_install_with_build_isolation_compiles_at_first_import(sdist, venv, tmp_path):
    """Also a subset build (CPIFT_CPU_CAPABILITIES) that leaves a gap: DEFAULT and AVX512 without AVX2
    on x86-64 (one compile less in CI), DEFAULT elsewhere."""
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", sdist], env=_clean_env())  # pip's defaults: isolated build, no torch
    x86 = "avx512" in _capabilities()
    subset = {"CPIFT_CPU_CAPABILITIES": "AVX512" if x86 else "default"}
    try:
        files = _installed_files(venv)
        assert not any(f.endswith(".so") for f in files), f"an isolated build has no torch to compile against: {files}"
        assert "cpift_fast/csrc/common.h" in files and "cpift_fast/csrc/cuda/mask.cu" in files, files
        cache = tmp_path / "cache"
        first, second = _step(venv, tmp_path, cache, **subset), _step(venv, tmp_path, cache, **subset)  # at once
        (info1, err1), (info2, err2) = _finish(first), _finish(second)
        for info in (info1, info2):
            assert info["extension"] is True and info["build"]["how"] == "jit", info
            assert info["build"]["path"].startswith(str(cache)) and "-ffp-contract=off" in info["build"]["cxx_flags"]
            assert info["build"]["cpu_capabilities_compiled"] == (["default", "avx512"] if x86 else ["default"])
            # torch at AVX512 runs our best supported one; torch capped at AVX2 falls to DEFAULT, never the missing AVX2
            best = info["build"]["cpu_capabilities_supported"][-1]
            assert info["build"]["cpu_capability"] == (best if info["build"]["torch_cpu_capability"] == "AVX512"
                                                       else "default"), info["build"]
        compiled = (err1 + err2).count("cpift_fast: compiling the C++ extension")
        assert compiled == 1, f"expected one compile for two processes, saw {compiled}:\n{err1}\n{err2}"
        assert len(list(cache.glob("*/*.so"))) == 1
        info3, err3 = _finish(_step(venv, tmp_path, cache, **subset))  # cached: loads, says nothing
        assert info3["build"]["how"] == "jit" and "compiling" not in err3, err3
        out = _run([venv / "bin" / "cpift", "info"], env=_clean_env(CPIFT_CACHE_DIR=str(cache), **subset),
                   cwd=tmp_path).stdout
        assert json.loads(out)["built"]["how"] == "jit"
    finally:
        _run([py, "-m", "pip", "uninstall", "-y", "-q", "cpift_fast"], env=_clean_env())


def _capabilities() -> list[str]:
    """The CPU capabilities a build on this machine compiles (cpift_fast/_extension.py)."""
    spec = importlib.util.spec_from_file_location("_ext", ROOT / "cpift_fast" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [c.lower() for c in module.capabilities()]


def _extension_version() -> str:
    namespace: dict = {}
    exec((ROOT / "cpift_fast" / "_version.py").read_text(), namespace)
    return namespace["__version__"]
