"""Op dispatch: the one place that decides which implementation of an op runs.

Every op exists three times with identical semantics and signature:

- ``torch.ops.cpift.<op>`` — the C++ extension (CPU kernels; CUDA C++ kernels where built),
- ``cpift_fast.kernels.<module>.<op>`` — Triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1),
- ``cpift_fast.reference.<op>`` — pure PyTorch, any device.

Default choice: CUDA tensors → Triton (CUDA C++ for ops in ``CUDA_CPP_PREFERRED``), CPU tensors →
C++, otherwise → reference. ``CPIFT_BACKEND=triton|cuda|cpp|torch`` forces one; a forced backend
that cannot run raises :class:`BackendUnavailable` with the reason, never falls back silently.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch

from . import reference

BACKENDS = ("triton", "cuda", "cpp", "torch")

# op name -> module under cpift_fast.kernels that holds its Triton launcher
TRITON_MODULE: dict[str, str] = {
    "mask_pack": "mask",
    "mask_unpack": "mask",
    "mask_popcount": "mask",
    "mask_binary": "mask",
    # masked AdamW (issue 3)
    # core selection (issue 4)
    # overlap and fusion (issue 5)
}

# Ops whose CUDA C++ kernel measured faster than the Triton one on a GPU (bench/results/).
CUDA_CPP_PREFERRED: set[str] = set()


class BackendUnavailable(RuntimeError):
    """A backend was requested (CPIFT_BACKEND or argument) that cannot run this op here."""


# ---------------------------------------------------------------------------------------------
# what is available
# ---------------------------------------------------------------------------------------------

@functools.cache
def _extension() -> tuple[bool, str | None]:
    if os.environ.get("CPIFT_SKIP_EXT") == "1":
        return False, "CPIFT_SKIP_EXT=1 at import"
    try:
        importlib.import_module("cpift_fast._C")
    except ImportError as exc:  # not built (CPIFT_SKIP_EXT=1 install) or built against another torch
        return False, f"cpift_fast._C did not load: {exc}"
    _register_fakes()
    return True, None


@functools.cache
def _triton() -> tuple[str | None, str | None]:
    try:
        import triton
    except ImportError as exc:
        return None, f"triton is not installed ({exc}); pip install triton"
    return triton.__version__, None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return _extension()[0] and torch._C._dispatch_has_kernel_for_dispatch_key(f"cpift::{op}", dispatch_key)


def _why_not(backend: str, op: str, device: torch.device) -> str | None:
    """None if `backend` can run `op` on `device`, else the reason it cannot."""
    if op not in TRITON_MODULE:
        return f"unknown op {op!r}"
    if backend == "torch":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs CPU tensors only, got a {device.type} tensor"
        if not _extension()[0]:
            return _extension()[1]
        return None if _has_kernel(op, "CPU") else f"the extension has no CPU kernel for {op}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA C++ backend runs CUDA tensors only, got a {device.type} tensor"
        if not _extension()[0]:
            return _extension()[1]
        return None if _has_kernel(op, "CUDA") else f"the extension was built without a CUDA kernel for {op}"
    if backend == "triton":
        version, reason = _triton()
        if version is None:
            return reason
        if device.type == "cpu" and not _interpreting():
            return ("Triton on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 before "
                    "cpift_fast's kernels are imported")
        if device.type not in ("cpu", "cuda"):
            return f"Triton runs CUDA tensors (or CPU tensors interpreted), got a {device.type} tensor"
        return None
    return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"


def forced_backend() -> str | None:
    value = os.environ.get("CPIFT_BACKEND", "").strip().lower()
    return value or None


def backend_for(op: str, device: torch.device | str) -> str:
    """The backend that runs `op` for tensors on `device` (raises if a forced one cannot)."""
    device = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        reason = _why_not(forced, op, device)
        if reason is not None:
            raise BackendUnavailable(f"CPIFT_BACKEND={forced} cannot run {op}: {reason}")
        return forced
    if device.type == "cuda":
        order = ("cuda", "triton") if op in CUDA_CPP_PREFERRED else ("triton", "cuda")
    elif device.type == "cpu":
        order = ("cpp",)
    else:
        order = ()
    for backend in order:
        if _why_not(backend, op, device) is None:
            return backend
    return "torch"


def implementation(op: str, backend: str):
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.cpift, op)
    if backend == "triton":
        return getattr(importlib.import_module(f"cpift_fast.kernels.{TRITON_MODULE[op]}"), op)
    return getattr(reference, op)


def call(op: str, device: torch.device, *args: Any) -> Any:
    return implementation(op, backend_for(op, device))(*args)


def backend_info() -> dict:
    """What was built, and which backend each op uses for CPU and for CUDA tensors right now."""
    ext_ok, ext_error = _extension()
    triton_version, triton_error = _triton()

    def choice(op: str, device: str) -> str:
        try:
            return backend_for(op, device)
        except BackendUnavailable as exc:
            return f"error: {exc}"

    return {
        "built": {
            "extension": ext_ok,
            "extension_error": ext_error,
            "cuda_kernels": ext_ok and torch._C._dispatch_has_kernel_for_dispatch_key("cpift::mask_binary", "CUDA"),
            "triton": triton_version,
            "triton_error": triton_error,
            "triton_interpret": _interpreting(),
            "torch": torch.__version__,
        },
        "forced": forced_backend(),
        "ops": {op: {"cpu": choice(op, "cpu"), "cuda": choice(op, "cuda")} for op in TRITON_MODULE},
    }


# ---------------------------------------------------------------------------------------------
# fake (meta) implementations of the C++ ops, for torch.compile. Each op section below adds a
# function to _FAKE_REGISTRARS; they run once, right after the extension loads.
# ---------------------------------------------------------------------------------------------

_FAKE_REGISTRARS: list = []


def _register_fakes() -> None:
    for registrar in _FAKE_REGISTRARS:
        registrar()


# ---------------------------------------------------------------------------------------------
# mask ops
# ---------------------------------------------------------------------------------------------

def mask_pack(bits: torch.Tensor) -> torch.Tensor:
    """bool[n] -> int32[ceil(n/32)], bit i in bit (i % 32) of word i // 32."""
    return call("mask_pack", bits.device, bits)


def mask_unpack(words: torch.Tensor, numel: int) -> torch.Tensor:
    """int32 words -> bool[numel] (inverse of mask_pack)."""
    return call("mask_unpack", words.device, words, numel)


def mask_popcount(words: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Bits set in each segment words[offsets[s]:offsets[s+1]] -> int64[T]."""
    return call("mask_popcount", words.device, words, offsets)


MASK_AND, MASK_OR, MASK_ANDNOT, MASK_XOR = 0, 1, 2, 3


@_FAKE_REGISTRARS.append
def _mask_fakes() -> None:
    @torch.library.register_fake("cpift::mask_pack")
    def _(bits):
        return bits.new_empty(((bits.numel() + 31) // 32,), dtype=torch.int32)

    @torch.library.register_fake("cpift::mask_unpack")
    def _(words, numel):
        return words.new_empty((numel,), dtype=torch.bool)

    @torch.library.register_fake("cpift::mask_popcount")
    def _(words, offsets):
        return offsets.new_empty((offsets.shape[0] - 1,), dtype=torch.int64)

    @torch.library.register_fake("cpift::mask_binary")
    def _(a, b, op):
        return torch.empty_like(a)


def mask_binary(a: torch.Tensor, b: torch.Tensor, op: int) -> torch.Tensor:
    """Word-wise a & b (0), a | b (1), a & ~b (2), a ^ b (3)."""
    return call("mask_binary", a.device, a, b, op)


# ---------------------------------------------------------------------------------------------
# masked AdamW ops (issue 3)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# core selection ops (issue 4)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# overlap and fusion ops (issue 5)
# ---------------------------------------------------------------------------------------------
