"""Backend dispatch: defaults, forced backends, clear refusals, op registration for torch.compile."""

import json
import os
import subprocess
import sys

import pytest
import torch

import cpift_fast
from cpift_fast import BackendUnavailable, _ops, ops

needs_ext = pytest.mark.skipif(not _ops.extension()[0], reason="C++ extension not built (CPIFT_SKIP_EXT=1?)")


def test_default_backends(monkeypatch):
    monkeypatch.delenv("CPIFT_BACKEND", raising=False)
    expected_cpu = "cpp" if _ops.extension()[0] else "torch"
    assert _ops.OPS["mask_binary"].backend_for("cpu") == expected_cpu
    assert _ops.OPS["mask_binary"].backend_for("meta") == "torch"
    assert _ops.OPS["mask_binary"].backend_for("cuda") in ("triton", "cuda", "torch")


def test_forced_backend_is_used(monkeypatch):
    words = torch.tensor([0b1011, -1], dtype=torch.int32)
    for name in ("cpp", "triton", "torch"):
        monkeypatch.setenv("CPIFT_BACKEND", name)
        assert _ops.OPS["mask_popcount"].backend_for("cpu") == name
        assert ops.mask_popcount(words, torch.tensor([0, 1, 2])).tolist() == [3, 32]


@pytest.mark.parametrize(
    "forced, env, reason",
    [
        ("cuda", {}, "runs CUDA tensors only"),
        ("warp", {}, "unknown backend 'warp'"),
        ("triton", {"TRITON_INTERPRET": "0"}, "set TRITON_INTERPRET=1"),
    ],
)
def test_forced_backend_that_cannot_run_raises(monkeypatch, forced, env, reason):
    monkeypatch.setenv("CPIFT_BACKEND", forced)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(BackendUnavailable, match=f"CPIFT_BACKEND={forced} cannot run mask_binary: .*{reason}"):
        ops.mask_binary(torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), 0)


def test_backend_info_reports_every_op(monkeypatch):
    monkeypatch.delenv("CPIFT_BACKEND", raising=False)
    info = cpift_fast.backend_info()
    assert info["built"]["torch"] == torch.__version__
    assert set(info["ops"]) == set(_ops.OPS)
    for choice in info["ops"].values():
        assert choice["cpu"] in ("cpp", "torch")
    json.dumps(info)  # printable by `cpift info`


def test_backend_info_shows_forced_error(monkeypatch):
    monkeypatch.setenv("CPIFT_BACKEND", "cuda")
    info = cpift_fast.backend_info()
    assert info["forced"] == "cuda"
    assert info["ops"]["mask_pack"]["cpu"].startswith("error: CPIFT_BACKEND=cuda cannot run")


def test_skip_ext_falls_back_to_reference_and_refuses_cpp():
    code = (
        "import os, json, torch, cpift_fast\n"
        "from cpift_fast import ops\n"
        "count = cpift_fast.ParamMask.from_bool({'a': torch.ones(40, dtype=torch.bool)}).count()\n"
        "info = cpift_fast.backend_info()\n"
        "os.environ['CPIFT_BACKEND'] = 'cpp'\n"
        "try:\n"
        "    ops.mask_pack(torch.ones(3, dtype=torch.bool)); err = None\n"
        "except cpift_fast.BackendUnavailable as e:\n"
        "    err = str(e)\n"
        "print(json.dumps([count, info['ops']['mask_pack']['cpu'], info['built']['extension_error'], err]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CPIFT_BACKEND"} | {"CPIFT_SKIP_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    count, cpu_backend, ext_error, err = json.loads(out.stdout.strip().splitlines()[-1])
    assert count == 40 and cpu_backend == "torch"
    assert "CPIFT_SKIP_EXT=1" in ext_error
    assert "CPIFT_BACKEND=cpp cannot run mask_pack" in err and "CPIFT_SKIP_EXT=1" in err


@needs_ext
def test_mask_ops_compile_fullgraph():
    def union_count(a, b, offsets):
        return torch.ops.cpift.mask_popcount(torch.ops.cpift.mask_binary(a, b, 1), offsets)

    a = torch.randint(-2**31, 2**31 - 1, (64,), dtype=torch.int32)
    b = torch.randint(-2**31, 2**31 - 1, (64,), dtype=torch.int32)
    offsets = torch.tensor([0, 10, 64])
    compiled = torch.compile(union_count, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(a, b, offsets), union_count(a, b, offsets))


@needs_ext
def test_cpp_kernel_errors_name_the_input():
    with pytest.raises(RuntimeError, match="mask_binary: word counts differ \\(3 vs 4\\)"):
        torch.ops.cpift.mask_binary(torch.zeros(3, dtype=torch.int32), torch.zeros(4, dtype=torch.int32), 0)
    with pytest.raises(RuntimeError, match="mask_pack: bits must be bool"):
        torch.ops.cpift.mask_pack(torch.zeros(3))
