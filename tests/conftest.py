"""Test setup: Triton kernels run under the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it when a
kernel is defined), hence at the top of conftest.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ALL_BACKENDS = ("cpp", "triton", "torch")


def pytest_collection_modifyitems(config, items):
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


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
