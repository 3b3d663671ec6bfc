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
    "masked_adamw_": "adamw",
    "masked_grad_sq_norm": "adamw",
    # core selection (issue 4)
    "select_histogram": "select",
    "select_mask": "select",
    # overlap and fusion (issue 5)
    "overlap_counts": "overlap",
    "slerp_stats": "fuse",
    "slerp_apply": "fuse",
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
    if not _extension()[0]:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"cpift::{op}", dispatch_key)
    except RuntimeError:  # an extension built before this op existed: rebuild (make install)
        return False


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
            "cuda_kernels": _has_kernel("mask_binary", "CUDA"),
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


def mask_binary(a: torch.Tensor, b: torch.Tensor, op: int) -> torch.Tensor:
    """Word-wise a & b (0), a | b (1), a & ~b (2), a ^ b (3)."""
    return call("mask_binary", a.device, a, b, op)


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


# ---------------------------------------------------------------------------------------------
# masked AdamW ops (issue 3)
# ---------------------------------------------------------------------------------------------

def masked_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
                  frozen: list[torch.Tensor], steps: list[float], lr: float, beta1: float, beta2: float,
                  weight_decay: float, eps: float, amsgrad: bool, maximize: bool,
                  grad_scale: torch.Tensor | None = None) -> None:
    """One AdamW step, in place, of every element whose frozen bit is clear.

    frozen[i]: int32 words of params[i] (bit j = bit j % 32 of word j // 32), or [] for none frozen;
    steps[i]: the step being taken (>= 1, bias corrections use it); max_exp_avg_sqs: [] unless
    amsgrad; grad_scale: grads are divided by it (GradScaler). Frozen elements of params and of all
    moments keep their bits. Trainable: p *= 1 - lr·wd; m = lerp(m, g, 1 - β1);
    v = β2·v + (1 - β2)·g²; p -= lr/(1 - β1^t) · m / (sqrt(v)/sqrt(1 - β2^t) + eps).
    """
    if params:
        call("masked_adamw_", params[0].device, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen,
             [float(s) for s in steps], float(lr), float(beta1), float(beta2), float(weight_decay), float(eps),
             bool(amsgrad), bool(maximize), grad_scale)


def masked_grad_sq_norm(grads: list[torch.Tensor], frozen: list[torch.Tensor]) -> torch.Tensor:
    """float32[T]: sum of g² over the elements of grads[i] whose frozen bit is clear."""
    if not grads:
        return torch.zeros(0, dtype=torch.float32)
    return call("masked_grad_sq_norm", grads[0].device, grads, frozen)


@_FAKE_REGISTRARS.append
def _adamw_fakes() -> None:
    @torch.library.register_fake("cpift::masked_adamw_")
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, frozen, steps, lr, beta1, beta2, weight_decay,
          eps, amsgrad, maximize, grad_scale):
        return None

    @torch.library.register_fake("cpift::masked_grad_sq_norm")
    def _(grads, frozen):
        return grads[0].new_empty((len(grads),), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# core selection ops (issue 4)
# ---------------------------------------------------------------------------------------------

SELECT_BINS = (1 << 15, 1 << 16)  # histogram bins of level 0 (key >> 16) and level 1 (key & 0xffff)


def select_histogram(base: torch.Tensor, tuned: torch.Tensor, level: int, prefix: int) -> torch.Tensor:
    """int64 histogram of the nonzero keys, key = bits(fp32(base) − fp32(tuned)) & 0x7fffffff.

    level 0: 32768 bins, bin = key >> 16. level 1: 65536 bins, bin = key & 0xffff, only keys with
    key >> 16 == prefix. Zero keys are never counted; Inf/NaN land in bins >= 0x7f80 of level 0.
    """
    return call("select_histogram", base.device, base, tuned, level, prefix)


def select_mask(base: torch.Tensor, tuned: torch.Tensor, threshold: int,
                tie_budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 words, int64 n_eq): bit i set iff key > threshold, or key == threshold and i is among
    the first `tie_budget` such elements in flat order; n_eq counts the keys equal to threshold."""
    return call("select_mask", base.device, base, tuned, threshold, tie_budget)


@_FAKE_REGISTRARS.append
def _select_fakes() -> None:
    @torch.library.register_fake("cpift::select_histogram")
    def _(base, tuned, level, prefix):
        return base.new_empty((SELECT_BINS[1 if level else 0],), dtype=torch.int64)

    @torch.library.register_fake("cpift::select_mask")
    def _(base, tuned, threshold, tie_budget):
        return (base.new_empty(((base.numel() + 31) // 32,), dtype=torch.int32),
                base.new_empty((), dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# overlap and fusion ops (issue 5)
# ---------------------------------------------------------------------------------------------

def overlap_counts(masks: list[torch.Tensor]) -> torch.Tensor:
    """int64[T, T]: popcount(masks[i] & masks[j]) for T int32 word buffers of one length, one pass."""
    device = masks[0].device if masks else torch.device("cpu")
    return call("overlap_counts", device, list(masks))


def slerp_stats(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """float64[3] = (Σ u·v, Σ u², Σ v²), u = a − base, v = b − base (fp32 math, fp64 sums), one pass."""
    return call("slerp_stats", a.device, a, b, base)


def slerp_apply(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None, c0: float, c1: float, c2: float,
                values: list[torch.Tensor], words: list[torch.Tensor], rule: int) -> torch.Tensor:
    """c0·a + c1·b + c2·base in a's dtype, with values[k] transplanted where words[k] has a bit set."""
    return call("slerp_apply", a.device, a, b, base, float(c0), float(c1), float(c2), list(values), list(words),
                int(rule))


@_FAKE_REGISTRARS.append
def _overlap_fuse_fakes() -> None:
    if not hasattr(torch.ops.cpift, "slerp_apply"):  # an extension built before these ops existed
        return

    @torch.library.register_fake("cpift::overlap_counts")
    def _(masks):
        return masks[0].new_empty((len(masks), len(masks)), dtype=torch.int64)

    @torch.library.register_fake("cpift::slerp_stats")
    def _(a, b, base):
        return a.new_empty((3,), dtype=torch.float64)

    @torch.library.register_fake("cpift::slerp_apply")
    def _(a, b, base, c0, c1, c2, values, words, rule):
        return torch.empty_like(a, memory_format=torch.contiguous_format)
