"""Backend choice, and the one helper every op uses to register itself.

Each op has one home, ``cpift_fast/ops/<op>.py``, which declares it with :class:`Op`: the schema
(defined here in Python, so ``torch.ops.cpift.<op>`` exists with or without the C++ extension), the
one argument check, the fake (meta) implementation and the pure-PyTorch reference. Registration per
device key with ``torch.library``:

- ``CPU``: the C++ kernel (``TORCH_LIBRARY_IMPL(cpift, CPU, ...)`` in ``csrc/``, loaded at import),
- ``CUDA``: the Triton launcher (``cpift_fast.kernels.<module>``, imported on first use),
- ``CompositeExplicitAutograd``: the reference, for every other device (and CPU without the extension).

Calling an op (``ops.mask_pack(bits)``) runs the check, then the dispatcher, unless
``CPIFT_BACKEND=triton|cuda|cpp|torch`` forces one: then that implementation runs, or
:class:`BackendUnavailable` says why it cannot (never a silent fallback). ``cuda`` is the CUDA C++
kernel where one was built (namespace ``cpift_cuda``); Triton on CPU tensors needs
``TRITON_INTERPRET=1`` (how CI runs the GPU kernels).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

BACKENDS = ("triton", "cuda", "cpp", "torch")
LIB = torch.library.Library("cpift", "DEF")
OPS: dict[str, "Op"] = {}


class BackendUnavailable(RuntimeError):
    """A backend was requested (CPIFT_BACKEND) that cannot run this op here."""


def forced_backend() -> str | None:
    value = os.environ.get("CPIFT_BACKEND", "").strip().lower()
    return value or None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def extension() -> tuple[bool, str | None]:
    """(loaded, why not): loads the C++ kernels once; call only after every op is defined."""
    from . import _extension

    return _extension.load()


@functools.cache
def triton_version() -> tuple[str | None, str | None]:
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed; pip install 'cpift_fast[triton]'"
    import triton

    return triton.__version__, None


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
    except RuntimeError:  # the namespace or op was never registered
        return False


class Op:
    """One op: schema, check, fake, reference, and the Triton launcher ``cpift_fast/kernels/<module>.py:<name>``.

    ``device_of(*args)`` picks the device that chooses the backend (default: the first tensor
    argument, or the first tensor of the first list argument).
    """

    def __init__(self, schema: str, *, check: Callable, fake: Callable, reference: Callable,
                 triton_module: str, device_of: Callable | None = None, cuda_cpp: bool = False):
        self.name = schema.split("(", 1)[0]
        self.check = check
        self.reference = reference
        self.triton_module = triton_module
        self.cuda_cpp = cuda_cpp  # a CUDA C++ kernel exists (csrc/cuda), as torch.ops.cpift_cuda.<name>
        self._device_of = device_of or _first_device
        LIB.define(schema)
        torch.library.register_fake(f"cpift::{self.name}", fake, lib=LIB)
        LIB.impl(self.name, reference, "CompositeExplicitAutograd")
        if triton_version()[0] is not None:
            LIB.impl(self.name, self.triton, "CUDA")
        self.op = getattr(torch.ops.cpift, self.name)
        OPS[self.name] = self

    def triton(self, *args: Any) -> Any:
        """The Triton launcher (imported on first use: TRITON_INTERPRET is read at kernel definition)."""
        return getattr(importlib.import_module(f"cpift_fast.kernels.{self.triton_module}"), self.name)(*args)

    def why_not(self, backend: str, device: torch.device) -> str | None:
        """None if `backend` can run this op on `device`, else the reason it cannot."""
        if backend == "torch":
            return None
        if backend in ("cpp", "cuda"):
            return self._extension_why_not(backend, device)
        if backend == "triton":
            version, why = triton_version()
            if version is None:
                return why
            if device.type == "cpu" and not interpreting():
                return ("Triton on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 before "
                        "cpift_fast's kernels are imported")
            if device.type not in ("cpu", "cuda"):
                return f"Triton runs CUDA tensors (or CPU tensors interpreted), got a {device.type} tensor"
            return None
        return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"

    def _extension_why_not(self, backend: str, device: torch.device) -> str | None:
        """Why the compiled extension's kernel (``cpp``: CPU, ``cuda``: CUDA C++) cannot run here, or None."""
        cpu = backend == "cpp"
        wanted, label = ("cpu", "C++") if cpu else ("cuda", "CUDA C++")
        if device.type != wanted:
            return f"the {label} backend runs {wanted.upper()} tensors only, got a {device.type} tensor"
        if not cpu and not self.cuda_cpp:
            return f"{self.name} has no CUDA C++ kernel (Triton is its CUDA backend)"
        ok, why = extension()
        if not ok:
            return why
        if has_kernel(f"cpift::{self.name}" if cpu else f"cpift_cuda::{self.name}", "CPU" if cpu else "CUDA"):
            return None
        return (f"the extension has no CPU kernel for {self.name} (rebuild it: make install)" if cpu else
                "the extension was built without CUDA kernels (no nvcc or a CPU-only torch at build time)")

    def backend_for(self, device: torch.device | str) -> str:
        """The backend that runs this op for tensors on `device` (raises if a forced one cannot)."""
        device = torch.device(device)
        forced = forced_backend()
        if forced is not None:
            reason = self.why_not(forced, device)
            if reason is not None:
                raise BackendUnavailable(f"CPIFT_BACKEND={forced} cannot run {self.name}: {reason}")
            return forced
        if device.type == "cpu" and self.why_not("cpp", device) is None:
            return "cpp"
        if device.type == "cuda" and self.why_not("triton", device) is None:
            return "triton"
        return "torch"

    def implementation(self, backend: str) -> Callable:
        """The callable of one backend, outside the dispatcher (for forced backends and tests)."""
        if backend == "cpp":
            return self.op
        if backend == "cuda":
            return getattr(torch.ops.cpift_cuda, self.name)
        if backend == "triton":
            return self.triton
        return self.reference

    def __call__(self, *args: Any) -> Any:
        self.check(*args)
        if forced_backend() is None:
            return self.op(*args)
        return self.implementation(self.backend_for(self._device_of(*args)))(*args)


def _first_device(*args: Any) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device
    return torch.device("cpu")


def backend_info() -> dict:
    """What was built, and which backend each op uses for CPU and for CUDA tensors right now."""
    from . import _extension

    ext_ok, ext_error = extension()
    version, triton_error = triton_version()

    def choice(op: Op, device: str) -> str:
        try:
            return op.backend_for(device)
        except BackendUnavailable as exc:
            return f"error: {exc}"

    return {
        "built": {
            "extension": ext_ok,
            "extension_error": ext_error,
            "cuda_kernels": has_kernel("cpift_cuda::mask_binary", "CUDA"),
            "triton": version,
            "triton_error": triton_error,
            "triton_interpret": interpreting(),
            "torch": torch.__version__,
        } | _extension.build_info(),
        "forced": forced_backend(),
        "ops": {name: {"cpu": choice(op, "cpu"), "cuda": choice(op, "cuda")} for name, op in OPS.items()},
    }
