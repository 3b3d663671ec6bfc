"""The AOT compile gate: every Triton kernel specialization compiles for sm_80 and sm_90 (no GPU needed),
without spills, with the PTX properties bit-exactness and speed depend on; the tests launch nothing
the gate did not compile; the committed report (cpift_fast/kernels/COMPILE_REPORT.md, compile_report.json) is
current.

The gate runs tools/triton_aot.py in a subprocess: kernels must be defined as JIT functions there,
while this process defines them for the interpreter (TRITON_INTERPRET=1, set by conftest).
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

pytest.importorskip("triton")

from conftest import LAUNCH_CHECK_TEST, load_aot_tool  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "triton_aot.py"
HISTOGRAM_KERNELS = {"_hist_kernel"}


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(TOOL), "--json", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=2400)
    wall = time.perf_counter() - t0
    print(proc.stdout[-4000:])
    print(f"compile gate wall time: {wall:.1f} s")
    if not out.exists():
        pytest.fail(f"tools/triton_aot.py crashed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _ok(gate):
    return [r for r in gate["results"] if r["ok"]]


def test_every_spec_compiles_for_sm80_and_sm90_without_spills(gate):
    assert gate["problems"] == [], "\n".join(gate["problems"])
    assert all(r["ok"] for r in gate["results"])
    by_key = {}
    for r in gate["results"]:
        by_key.setdefault(r["key"], set()).add(r["target"])
    assert by_key and all(t == {"sm_80", "sm_90"} for t in by_key.values())
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0 for r in _ok(gate))
    kernels = {r["key"].split("(")[0] for r in gate["results"]}
    for expected in ("mask._pack_kernel", "mask._unpack_kernel", "mask._popcount_blocks_kernel", "mask._binary_kernel",
                     "select._hist_kernel", "select._tie_count_kernel", "select._mask_kernel",
                     "overlap._overlap_kernel", "fuse._stats_kernel", "fuse._apply_kernel",
                     "adamw._masked_adamw_kernel"):
        assert expected in kernels


def test_no_approximate_division(gate):
    bad = [f"{r['key']} {r['target']}" for r in _ok(gate) if r["div_full"] or r["div_approx"]]
    assert not bad, "approximate fp32 division (div.full / div.approx) in:\n" + "\n".join(bad)


def test_no_fma_contraction_unless_written(gate):
    """Kernels compile with enable_fp_fusion=False: an FMA in the PTX must come from a tl.fma in the source."""
    written = {m for m in ("mask", "select", "overlap", "fuse", "adamw")
               if "tl.fma(" in (ROOT / "cpift_fast" / "kernels" / f"{m}.py").read_text()}
    bad = [f"{r['key']} {r['target']}: {r['fma']} fma" for r in _ok(gate)
           if r["fma"] and r["key"].split(".")[0] not in written]
    assert not bad, "\n".join(bad)


def test_histogram_atomics_are_relaxed(gate):
    hist = [r for r in _ok(gate) if r["key"].split("(")[0].split(".")[1] in HISTOGRAM_KERNELS]
    assert hist
    for r in hist:
        assert r["atomics"], r["key"]
        assert all(".relaxed." in a and "acq_rel" not in a and "acquire" not in a for a in r["atomics"]), r["atomics"]
        assert r["fences"] == 0, f"{r['key']} {r['target']}: {r['fences']} fences"


def test_gpu_popcount_is_one_instruction(gate):
    """The libdevice switch (what a GPU launch takes) compiles to popc.b32. The interpreter's SWAR
    fallback (USE_LIBDEVICE=False) is compiled too, and LLVM recognizes it as popcount as well."""
    switched = [r for r in _ok(gate) if "USE_LIBDEVICE=True" in r["key"]]
    assert switched
    for r in switched:
        assert r["popc"] > 0, f"{r['key']} {r['target']}: libdevice popc did not become popc.b32"


def test_adamw_global_loads_are_vectorized(gate):
    """Tensors whose storage is 16-byte aligned (P_ALIGN/S_ALIGN > 1: what PyTorch's allocator gives)
    get 16-byte vector loads; the unaligned fallback (P_ALIGN=1, a view at an odd offset) may not."""
    adamw = [r for r in _ok(gate) if r["key"].startswith("adamw._masked_adamw_kernel(") and "P_ALIGN=1," not in r["key"]]
    assert adamw
    scalar_only = [f"{r['key']} {r['target']}" for r in adamw if r["ld_vector"] == 0]
    assert not scalar_only, "no ld.global.v2/.v4 in:\n" + "\n".join(scalar_only)


def test_tensor_address_offsets_are_64_bit(gate):
    """An int32 tensor of element offsets (other than a bare tl.arange) wraps past 2^31 elements."""
    bad = [f"{r['key']} {r['target']}: {r['i32_tensor_offsets']}" for r in _ok(gate) if r["i32_tensor_offsets"]]
    assert not bad, "int32 address offsets in:\n" + "\n".join(bad)


def test_committed_report_is_current(gate):
    fix = "run `python tools/triton_aot.py --write-report` and commit cpift_fast/kernels/COMPILE_REPORT.md, compile_report.json"
    path = ROOT / "cpift_fast" / "kernels" / "compile_report.json"
    assert path.exists(), fix
    committed = {(r["key"], r["target"]): r for r in json.loads(path.read_text())["results"]}
    fresh = {(r["key"], r["target"]): r for r in gate["results"]}
    assert committed.keys() == fresh.keys(), f"specializations changed: {fix}"
    for k, r in fresh.items():
        c = committed[k]
        for field in ("ok", "registers", "spill_stores", "spill_loads", "shared"):
            assert c.get(field) == r.get(field), f"{k} {field}: report {c.get(field)}, now {r.get(field)}: {fix}"
    md = (ROOT / "cpift_fast" / "kernels" / "COMPILE_REPORT.md").read_text()
    assert f"specializations x targets: {len(fresh)}" in md, fix


def test_launch_key_matches_triton_specialization():
    """The key conftest records for a launch names the types a GPU launch specializes on."""
    import torch

    tool = load_aot_tool()

    def kernel(x_ptr, n, scale, m: "tl.int64", BLOCK: "tl.constexpr"):  # noqa: F821 - annotations as strings
        pass

    key = tool.launch_key(kernel, (torch.zeros(4, dtype=torch.bfloat16), 5, 0.5, 7), {"BLOCK": 256, "num_warps": 8})
    assert re.fullmatch(r".*kernel\(x_ptr:\*bf16, n:i32, scale:fp32, m:i64, BLOCK=256\) num_warps=8", key), key
    assert tool.launch_key(kernel, (torch.zeros(4), 2**40, 1.0, 0, 64), {}).endswith(
        "(x_ptr:*fp32, n:i64, scale:fp32, m:i64, BLOCK=64) num_warps=4")


def test_launched_kernels_are_declared(triton_launches):
    """Every specialization launched in this session (under the interpreter) is one the gate compiled:
    the tests run the GPU block sizes and nothing CI did not compile. Ordered last by conftest."""
    assert LAUNCH_CHECK_TEST == test_launched_kernels_are_declared.__name__
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("launches are recorded under the Triton interpreter only")
    if not triton_launches:
        pytest.skip("no Triton kernel was launched in this session (run it with the kernel tests)")
    tool = load_aot_tool()
    declared = {tool.spec_key(s) for _, _, s in tool.all_specs(tool.load_modules())}
    undeclared = sorted(set(triton_launches) - declared)
    assert not undeclared, "launched but not declared in aot_specs():\n" + "\n".join(undeclared)
