#!/usr/bin/env python3
"""AOT compile gate: every Triton kernel specialization, compiled for sm_80 and sm_90 with no GPU.

Each kernel module cpift_fast/kernels/<op>.py declares ``aot_specs()``: every specialization its launchers can
take (pointer dtypes, constexprs: block sizes, libdevice switches, dtypes). This tool compiles each
one with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` — the Triton wheel
ships ptxas, so no GPU or CUDA toolkit is needed — with the launch options every kernel uses
(``enable_fp_fusion=False``) and pointer arguments 16-byte aligned (as torch allocates them), then
records per kernel and target: registers, spill stores/loads, stack, shared memory (ptxas -v), and
PTX / TTIR properties the tests assert:

- ``div_full`` / ``div_approx``: approximate fp32 divisions (``div.full.f32``, ``div.approx``);
- ``fma``: FMA instructions in the PTX (none unless the source writes ``tl.fma``);
- ``atomics``: the distinct atomic opcodes, ``atom.`` and ``red.`` (an atomic whose result is unused);
  memory ordering is part of the opcode;
- ``ld_vector`` / ``ld_scalar``: vectorized (``.v2`` / ``.v4``) and scalar global loads;
- ``popc``: hardware popcount instructions (the libdevice switch's GPU side);
- ``i32_tensor_offsets``: tensor address offsets computed in int32 that are not a bare
  ``tl.arange`` (such an offset can wrap past 2^31 elements); must be 0.

Usage: ``python tools/triton_aot.py [--jobs N] [--json PATH] [--write-report]``. Results are cached
in build/triton-aot/ keyed by a hash of the kernel sources, the spec, the target and the Triton
version. Exit status 1 when a kernel fails to compile, spills, or has no spec.

This file is a development tool, not part of the runtime: cpift_fast never imports it. The kernels
are loaded from the source tree by path (not through ``cpift_fast``), so the C++ extension plays
no part. ``launch_key`` / ``spec_key`` give the canonical name of a specialization; tests/conftest.py
records the keys of every launch under the interpreter so that a test can check launched ⊆ declared.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "cpift_fast" / "kernels"
MODULES = ("mask", "select", "overlap", "fuse", "adamw", "importance")
TARGETS = (80, 90)
OPTIONS = {"enable_fp_fusion": False}
CACHE_DIR = ROOT / "build" / "triton-aot"
REPORT_MD = KERNEL_DIR / "COMPILE_REPORT.md"
REPORT_JSON = KERNEL_DIR / "compile_report.json"
_PACKAGE = "_cpift_aot_kernels"


# ---------------------------------------------------------------------------------------------
# canonical keys (shared with tests/conftest.py, which records launches under the interpreter)
# ---------------------------------------------------------------------------------------------

def _params(fn) -> list[tuple[str, str]]:
    """(name, kind) per parameter of a @triton.jit function's Python body: kind is "constexpr", a
    canonical Triton type from a `tl.<dtype>` annotation ("i64"), or "" (type from the argument)."""
    from triton.runtime.jit import _normalize_ty

    out = []
    for p in inspect.signature(fn).parameters.values():
        ann = p.annotation
        if ann is inspect.Parameter.empty:
            out.append((p.name, ""))
        elif "constexpr" in str(ann):
            out.append((p.name, "constexpr"))
        else:
            out.append((p.name, _normalize_ty(ann)))
    return out


def _value_str(v) -> str:
    return str(v) if not isinstance(v, str) else repr(v)


def kernel_name(fn) -> str:
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__qualname__}"


def _key(fn, types: dict, constexprs: dict, num_warps: int) -> str:
    parts = []
    for name, kind in _params(fn):
        if kind == "constexpr":
            parts.append(f"{name}={_value_str(constexprs[name])}")
        else:
            parts.append(f"{name}:{kind or types[name]}")
    return f"{kernel_name(fn)}({', '.join(parts)}) num_warps={num_warps}"


def spec_key(spec) -> str:
    """The canonical name of a declared KernelSpec."""
    return _key(spec.kernel.fn, spec.types, spec.constexprs, spec.num_warps)


def launch_key(fn, args: tuple, kwargs: dict) -> str:
    """The canonical name of a launch `kernel[grid](*args, **kwargs)` of the Python function `fn`, with
    the argument types a GPU launch would specialize on (triton's own mangling)."""
    from triton.runtime.jit import mangle_type

    names = [n for n, _ in _params(fn)]
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    types, constexprs = {}, {}
    for name, kind in _params(fn):
        v = bound.arguments[name]
        if kind == "constexpr":
            constexprs[name] = v
        elif not kind:
            types[name] = mangle_type(v)
    return _key(fn, types, constexprs, kwargs.get("num_warps", 4))


# ---------------------------------------------------------------------------------------------
# loading the kernels (by path) and listing the specs
# ---------------------------------------------------------------------------------------------

def load_modules() -> dict:
    """The kernel modules, imported from cpift_fast/kernels/ under a private package name."""
    if _PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(_PACKAGE, KERNEL_DIR / "__init__.py",
                                                      submodule_search_locations=[str(KERNEL_DIR)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[_PACKAGE] = pkg
        spec.loader.exec_module(pkg)
    return {m: importlib.import_module(f"{_PACKAGE}.{m}") for m in MODULES}


def jit_kernels(module) -> list[str]:
    """Names of the launchable @triton.jit kernels defined in `module` (by convention: `_*_kernel`)."""
    from triton.runtime.jit import JITFunction

    return sorted(name for name, obj in vars(module).items()
                  if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.fn.__module__ == module.__name__)


def all_specs(modules: dict) -> list[tuple[str, int, object]]:
    out = []
    for m, module in modules.items():
        specs = list(module.aot_specs()) if hasattr(module, "aot_specs") else []
        out += [(m, i, s) for i, s in enumerate(specs)]
    return out


def _source_hash(module: str) -> str:
    """Hash of what a module's compiled code depends on: its source, _common.py, this tool, triton."""
    import triton

    h = hashlib.sha256(triton.__version__.encode())
    for p in (KERNEL_DIR / f"{module}.py", KERNEL_DIR / "_common.py", Path(__file__).resolve()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# compiling one spec (in a worker process)
# ---------------------------------------------------------------------------------------------

_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_ADDPTR = re.compile(r"^\s*%\S+ = tt\.addptr %\S+, (%\S+) : tensor<[^>]*>, tensor<[0-9x]*xi32>")
_LD = re.compile(r"^\s*(?:@%p\d+\s+)?ld\.global\S*")


def _ptx_props(ptx: str, ttir: str) -> dict:
    lines = ptx.splitlines()
    loads = [m.group(0) for m in map(_LD.match, lines) if m]
    ranges = set(re.findall(r"^\s*(%\S+) = tt\.make_range", ttir, re.M))
    i32_offsets = [m.group(1) for m in map(_ADDPTR.match, ttir.splitlines()) if m and m.group(1) not in ranges]
    return {
        "div_full": sum("div.full.f32" in l for l in lines),
        "div_approx": sum("div.approx" in l for l in lines),
        "fma": sum(bool(re.search(r"\bfma\.rn", l)) for l in lines),
        "atomics": sorted({l.split()[0] for l in (l.strip().split(" ", 1)[-1] if l.strip().startswith("@") else
                                                  l.strip() for l in lines) if l.startswith(("atom.", "red."))}),
        "fences": sum(bool(re.match(r"\s*(fence|membar)\.", l)) for l in lines),
        "ld_vector": sum(bool(re.search(r"\.v[24]\.", l)) for l in loads),
        "ld_scalar": sum(not re.search(r"\.v[24]\.", l) for l in loads),
        "i32_tensor_offsets": len(i32_offsets),
        "popc": sum(bool(re.search(r"\bpopc\.b32", l)) for l in lines),
    }


def compile_one(m: str, index: int, cc: int) -> dict:
    """Compile spec `index` of module `m` for sm_<cc>; never raises (a failure is a result)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = load_modules()[m]
    spec = list(module.aot_specs())[index]
    fn = spec.kernel
    result = {"module": m, "kernel": fn.__name__, "key": spec_key(spec), "target": f"sm_{cc}",
              "constexprs": {k: _value_str(v) for k, v in spec.constexprs.items()}}
    t0 = time.perf_counter()
    try:
        signature, attrs = {}, {}
        for i, (name, kind) in enumerate(_params(fn.fn)):
            signature[name] = kind or spec.types[name]
            if signature[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, signature, constexprs=dict(spec.constexprs), attrs=attrs)
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with tempfile.TemporaryDirectory() as cache, knobs.cache.scope(), contextlib.redirect_stdout(log):
            knobs.cache.dir = cache  # fresh cache: ptxas runs, so its -v log is there to read
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                      options={**OPTIONS, "num_warps": spec.num_warps})
        text = log.getvalue()
        stack, spill_st, spill_ld = map(int, _PTXAS.search(text).groups())
        result.update(ok=True, error=None, registers=int(_REGS.search(text).group(1)), spill_stores=spill_st,
                      spill_loads=spill_ld, stack=stack, shared=compiled.metadata.shared,
                      num_warps=compiled.metadata.num_warps,
                      **_ptx_props(compiled.asm["ptx"], compiled.asm["ttir"]))
    except Exception as e:  # noqa: BLE001 - a compile failure is the gate's finding, reported per spec
        msg = f"{type(e).__name__}: {e}"
        result.update(ok=False, error=msg[-2000:])
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)
    load_modules()


# ---------------------------------------------------------------------------------------------
# the gate
# ---------------------------------------------------------------------------------------------

def run_gate(jobs: int | None = None, use_cache: bool = True) -> dict:
    """Compile every declared spec for every target; returns {"results", "problems", "wall_s", ...}."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("triton_aot: run with TRITON_INTERPRET unset (kernels must be JIT functions)")
    t0 = time.perf_counter()
    modules = load_modules()
    specs = all_specs(modules)
    problems = []
    declared = {(m, s.kernel.__name__) for m, _, s in specs}
    for m, module in modules.items():
        for k in jit_kernels(module):
            if (m, k) not in declared:
                problems.append(f"{m}.{k}: no aot_specs() entry (every launchable kernel must be declared)")
    keys = [spec_key(s) for _, _, s in specs]
    dupes = {k for k in keys if keys.count(k) > 1}
    problems += [f"declared twice: {k}" for k in sorted(dupes)]

    digest = {m: _source_hash(m) for m in modules}
    cache_file = CACHE_DIR / "cache.json"
    cache = json.loads(cache_file.read_text()) if use_cache and cache_file.exists() else {}

    def name(m, s, cc):
        return f"{digest[m]} {spec_key(s)} sm_{cc}"

    cache = {k: v for k, v in cache.items() if k.split(" ", 1)[0] in digest.values()}  # drop stale entries
    todo = [(m, i, cc) for m, i, s in specs for cc in TARGETS if name(m, s, cc) not in cache]
    jobs = jobs or os.cpu_count() or 1

    def save():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_file)

    if todo:
        ctx = __import__("multiprocessing").get_context("fork")
        with cf.ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx,
                                    initializer=_worker_init) as pool:
            for done, r in enumerate(pool.map(compile_one, *zip(*todo), chunksize=4), 1):
                cache[f"{digest[r['module']]} {r['key']} {r['target']}"] = r
                if use_cache and done % 100 == 0:  # an interrupted run keeps what it compiled
                    save()
        if use_cache:
            save()
    results = [cache[name(m, s, cc)] for m, _, s in specs for cc in TARGETS]
    for r in results:
        if not r["ok"]:
            problems.append(f"{r['key']} {r['target']}: compile failed: {r['error'].splitlines()[0][:300]}")
        elif r["spill_stores"] or r["spill_loads"]:
            problems.append(f"{r['key']} {r['target']}: spills {r['spill_stores']} B stores, "
                            f"{r['spill_loads']} B loads ({r['registers']} registers)")
    return {"results": results, "problems": problems, "wall_s": round(time.perf_counter() - t0, 1),
            "compiled": len(todo), "cached": len(results) - len(todo), "jobs": jobs}


def summary(gate: dict) -> list[dict]:
    """Per kernel and target: specs, failures, max registers, max spill bytes, max shared, max stack."""
    rows: dict = {}
    for r in gate["results"]:
        row = rows.setdefault((r["module"], r["kernel"], r["target"]), {
            "kernel": f"{r['module']}.{r['kernel']}", "target": r["target"], "specs": 0, "failed": 0,
            "max_registers": 0, "max_spill_bytes": 0, "max_shared": 0, "max_stack": 0})
        row["specs"] += 1
        if not r["ok"]:
            row["failed"] += 1
            continue
        row["max_registers"] = max(row["max_registers"], r["registers"])
        row["max_spill_bytes"] = max(row["max_spill_bytes"], r["spill_stores"] + r["spill_loads"])
        row["max_shared"] = max(row["max_shared"], r["shared"])
        row["max_stack"] = max(row["max_stack"], r["stack"])
    return list(rows.values())


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_report(gate: dict) -> None:
    import triton

    rows = summary(gate)
    failed = sum(not r["ok"] for r in gate["results"])
    spilling = sum(r["ok"] and (r["spill_stores"] + r["spill_loads"]) > 0 for r in gate["results"])
    md = [
        "# Triton AOT compile report",
        "",
        "Written by `python tools/triton_aot.py --write-report` (tests/test_compile_gate.py checks it is "
        "current). Every specialization declared by `aot_specs()` in cpift_fast/kernels/*.py, compiled without a "
        f"GPU for sm_80 and sm_90 (triton {triton.__version__}, its bundled ptxas; `enable_fp_fusion=False`, "
        "pointers 16-byte aligned). Per-specialization numbers and PTX properties: `compile_report.json`.",
        "",
        f"- specializations x targets: {len(gate['results'])}; compile failures: {failed}; "
        f"with spills: {spilling}",
        f"- gate wall time when written: {gate['wall_s']} s for {gate['compiled']} compiles "
        f"({gate['jobs']} processes, {gate['cached']} from cache)",
        "",
        "| kernel | target | specs | failed | max registers | max spill bytes | max shared bytes | max stack bytes |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    md += [f"| {r['kernel']} | {r['target']} | {r['specs']} | {r['failed']} | {r['max_registers']} | "
           f"{r['max_spill_bytes']} | {r['max_shared']} | {r['max_stack']} |" for r in rows]
    if gate["problems"]:
        md += ["", "## Problems", ""] + [f"- {p}" for p in gate["problems"]]
    _write(REPORT_MD, "\n".join(md) + "\n")
    keep = ("key", "target", "ok", "error", "registers", "spill_stores", "spill_loads", "stack", "shared",
            "num_warps", "div_full", "div_approx", "fma", "atomics", "fences", "ld_vector", "ld_scalar",
            "i32_tensor_offsets", "popc")
    _write(REPORT_JSON, json.dumps({"triton": triton.__version__, "results": [
        {k: r[k] for k in keep if k in r} for r in gate["results"]]}, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    ap.add_argument("--json", type=Path, help="write the full results here")
    ap.add_argument("--write-report", action="store_true", help=f"write {REPORT_MD.name} and {REPORT_JSON.name}")
    ap.add_argument("--no-cache", action="store_true", help=f"ignore and do not write {CACHE_DIR}")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    gate = run_gate(args.jobs, use_cache=not args.no_cache)
    for r in summary(gate):
        print(f"{r['kernel']:40s} {r['target']}  specs {r['specs']:3d}  failed {r['failed']}  "
              f"regs {r['max_registers']:3d}  spill {r['max_spill_bytes']}  shared {r['max_shared']}")
    print(f"triton_aot: {len(gate['results'])} compiles checked ({gate['compiled']} compiled, {gate['cached']} "
          f"cached) in {gate['wall_s']} s with {gate['jobs']} processes; {len(gate['problems'])} problems")
    for p in gate["problems"]:
        print("  PROBLEM:", p)
    if args.json:
        _write(args.json, json.dumps(gate))
    if args.write_report:
        write_report(gate)
    return 1 if gate["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
