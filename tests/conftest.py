"""Test setup: Triton kernels run under the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it when a
kernel is defined), hence at the top of conftest.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

ALL_BACKENDS = ("cpp", "triton", "torch")

# ---- every Triton launch under the interpreter, by canonical specialization key ------------------
# tests/test_compile_gate.py checks that each one is declared to the AOT gate (tools/triton_aot.py),
# i.e. that CI compiled for sm_80 / sm_90 exactly what the tests ran (same block sizes, dtypes).
_AOT_TOOL = pathlib.Path(__file__).resolve().parent.parent / "tools" / "triton_aot.py"
TRITON_LAUNCHES: set[str] = set()
LAUNCH_CHECK_TEST = "test_launched_kernels_are_declared"  # runs last: it reads TRITON_LAUNCHES


def load_aot_tool():
    spec = importlib.util.spec_from_file_location("triton_aot", _AOT_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record_triton_launches():
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # triton is optional
        return
    launch_key = load_aot_tool().launch_key
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        TRITON_LAUNCHES.add(launch_key(self.fn, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


if os.environ.get("TRITON_INTERPRET") == "1":
    _record_triton_launches()


@pytest.fixture(scope="session")
def triton_launches():
    """Canonical keys of the Triton kernel specializations launched so far in this session."""
    return TRITON_LAUNCHES


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: getattr(item, "originalname", item.name) == LAUNCH_CHECK_TEST)  # stable: last
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request, monkeypatch):
    """Run the test once per backend, forced through CPIFT_BACKEND (CPU tensors)."""
    monkeypatch.setenv("CPIFT_BACKEND", request.param)
    return request.param


CPU_CAPABILITIES = ("default", "avx2", "avx512")  # what x86-64 builds compile (aarch64: default only)


@pytest.fixture(params=CPU_CAPABILITIES)
def cpu_capability(request):
    """Run the test once per CPU capability of the C++ kernels (torch.ops.cpift_cpu.set_capability);
    skipped where the build did not compile it or this CPU cannot run it. torch's own kernels keep
    their capability."""
    from cpift_fast import _ops

    if not _ops.extension()[0]:
        pytest.skip("the C++ extension is not built")
    cpu = torch.ops.cpift_cpu
    name = request.param
    if name not in cpu.compiled_capabilities():
        pytest.skip(f"{name} is not compiled on this architecture (compiled: {', '.join(cpu.compiled_capabilities())})")
    if name not in cpu.supported_capabilities():
        pytest.skip(f"this CPU does not support {name} (supported: {', '.join(cpu.supported_capabilities())})")
    previous = cpu.capability()
    cpu.set_capability(name)
    yield name
    cpu.set_capability(previous)


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
