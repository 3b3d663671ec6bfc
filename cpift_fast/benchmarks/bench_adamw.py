"""Benchmark: the masked AdamW step.

N parameters in ~T tensors of mixed sizes (fp32, then bf16 with bf16 moments), frozen fraction
0.01 / 0.5 / 0.99, frozen elements either random or one contiguous run per tensor; and the tensor
shapes of a LLaMA-style model (harness.llama_shapes) at 1 % frozen, random. Per step:

  masked     cpift_fast.MaskedAdamW, fused kernel (C++ on CPU, Triton on CUDA)
  torch      torch.optim.AdamW(fused=True), no mask (the speed a masked step should approach)
  reference  MaskedAdamW on the pure-PyTorch path (reference.masked_adamw_: foreach AdamW on the
             tensors, then the frozen elements restored from a copy) — what a user would write

The three paths' steps are timed interleaved (harness.measure_interleaved), so that all see the
same machine load. Effective GB/s = the bytes a full unmasked AdamW step moves (fp32: 28 B/param,
bf16: 14 B/param) plus the mask (N/8 B), over the time, for every path.

Targets: masked <= 1.10x torch's fused step (every case of a dtype), reference >= 4x masked.
"""

from __future__ import annotations

import functools

import torch

from .harness import Case, Path, mix, describe_mix, run_op, target

FRACTIONS = (0.01, 0.5, 0.99)
LAYOUTS = ("random", "contiguous")
DTYPES = ("float32", "bfloat16")
SIZES = {"quick": {"n": 2**21, "tensors": 20}, "full": {"n": 2**26, "tensors": 100}}
PATHS = ("MaskedAdamW (fused)", "torch AdamW(fused=True)", "MaskedAdamW (pure PyTorch)")


def make_mask(names, params, fraction: float, layout: str, seed: int = 0):
    from cpift_fast import ParamMask

    g = torch.Generator().manual_seed(seed)
    bits = {}
    for name, p in zip(names, params):
        if layout == "random":
            b = torch.rand(p.numel(), generator=g) < fraction
        else:
            b = torch.zeros(p.numel(), dtype=torch.bool)
            b[: round(fraction * p.numel())] = True
        bits[name] = b.view(p.shape)
    return ParamMask.from_bool(bits, device=params[0].device)


def specs(size: str) -> list[dict]:
    """The cases: dtype x layout x frozen fraction on the log-uniform mix, then the LLaMA mix."""
    s = SIZES[size]
    out = []
    for dtype in DTYPES:
        for layout in LAYOUTS:
            for fraction in FRACTIONS:
                out.append({"case": f"{dtype}, {fraction:.0%} frozen, {layout}", "dtype": dtype, "frozen": fraction,
                            "layout": layout, "mix": "log", "n": s["n"], "tensors": s["tensors"],
                            "headline": fraction == 0.01 and layout == "random", "paths": PATHS})
        out.append({"case": f"{dtype}, LLaMA shapes, 1% frozen, random", "dtype": dtype, "frozen": 0.01,
                    "layout": "random", "mix": "llama", "n": s["n"], "tensors": None, "headline": False,
                    "paths": PATHS})
    return out


@functools.lru_cache(maxsize=1)  # the cases of one dtype and mix come one after the other
def _params(dtype: torch.dtype, kind: str, n: int, tensors: int | None, device: torch.device):
    """Named parameters with gradients (each case's optimizers get fresh state)."""
    shapes = mix(kind, n, tensors)
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device=device, dtype=dtype))
              for _, shape in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device=device, dtype=dtype)
    return shapes, [name for name, _ in shapes], params


def build(spec: dict, device: torch.device) -> Case:
    from cpift_fast import MaskedAdamW

    dtype = getattr(torch, spec["dtype"])
    shapes, names, params = _params(dtype, spec["mix"], spec["n"], spec["tensors"], device)
    n = sum(p.numel() for p in params)
    nominal = n * (28 if dtype == torch.float32 else 14) + n / 8

    torch_opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    fused_backend = "cpp" if device.type == "cpu" else "triton"
    mask = make_mask(names, params, spec["frozen"], spec["layout"])
    opt = MaskedAdamW(list(zip(names, params)), lr=1e-4, frozen=mask)
    params_info = {k: v for k, v in spec.items() if k not in ("case", "paths")} | describe_mix(shapes)
    return Case(spec["case"], params_info, {
        PATHS[0]: Path(opt.step, "fused", nominal, backend=fused_backend, extra={"backend": fused_backend}),
        PATHS[1]: Path(torch_opt.step, "anchor", nominal),
        # 20-50x slower than the others: one round (not interleaved; n = 1 at full size)
        PATHS[2]: Path(opt.step, "reference", nominal, backend="torch", rounds=1, extra={"backend": "torch"}),
    }, baseline=PATHS[0])


def run(size: str, device: torch.device, progress: bool = True):
    try:
        result = run_op("adamw", specs(size), build, size, device, progress)
    finally:
        _params.cache_clear()
    for dtype in DTYPES:
        cases = [s["case"] for s in specs(size) if s["dtype"] == dtype]
        worst = max(result.find(c, PATHS[0])["median_s"] / result.find(c, PATHS[1])["median_s"] for c in cases)
        slowest_gain = min(result.find(c, PATHS[2])["ratio"] for c in cases)
        result.targets += [target(f"{dtype}: MaskedAdamW / torch AdamW(fused=True), worst case", worst, "<= 1.10"),
                           target(f"{dtype}: pure-PyTorch path / MaskedAdamW, smallest", slowest_gain, ">= 4")]
    result.notes.append("GB/s for every path: the bytes a fused unmasked step moves (fp32 28 B/param, bf16 "
                        "14 B/param) plus the mask (N/8 B). torch's fused step has no mask: it is the speed "
                        "a masked step should approach.")
    return result
