"""EPI's cost per step: MaskedAdamW with an importance EMA beside MaskedAdamW alone (issue 11).

Paths, timed in one run, interleaved, fp32 params in T tensors (log-uniform mix) and in the tensor
shapes of a LLaMA-style model:

  alone            MaskedAdamW.step()
  fused/<dtype>    MaskedAdamW(importance=tracker).step(): the fused op masked_adamw_ema_ (C++ on
                   CPU, Triton on CUDA), one pass over g and θ; EMA state fp32 / bf16 / int8
  separate/<dtype> tracker.update() then MaskedAdamW.step(): the same two ops as two passes
  pure PyTorch     fused/fp32 with every op on the pure-PyTorch path (CPIFT_BACKEND=torch)
  torch EMA        MaskedAdamW.step() after the EMA as a user would write it in PyTorch (fp32 state,
                   grad_x_param: foreach mul / abs / mul_ / add_): a separate EMA pass

Bytes per element: AdamW 28 (p and both moments read and written, g read); the EMA adds its state
read and written (8 / 4 / ≈2.03 B) and, unfused, g and θ read again (8 B). GB/s uses the bytes a
fused step would move (28 + state), so an unfused path shows its extra traffic as lost bandwidth.
"""

from __future__ import annotations

import torch

from .harness import Case, Path, describe_mix, mix, run_op, target

STATE_BYTES = {"fp32": 8.0, "bf16": 4.0, "int8": 2.0 + 8.0 / 256}  # read + write per element (+ scales)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": "int8"}
SIZES = {"quick": {"n": 2**21, "tensors": 20}, "full": {"n": 2**26, "tensors": 100}}
PATHS = ("alone", *(f"{kind}/{d}" for kind in ("fused", "separate") for d in DTYPES), "torch EMA", "pure PyTorch")


def specs(size: str) -> list[dict]:
    s = SIZES[size]
    return [{"case": f"fp32 params, {s['n'] / 2**20:.0f}M in {s['tensors']} tensors", "mix": "log", "n": s["n"],
             "tensors": s["tensors"], "headline": True, "paths": PATHS},
            {"case": f"fp32 params, LLaMA shapes, {s['n'] / 2**20:.0f}M", "mix": "llama", "n": s["n"],
             "tensors": None, "headline": False, "paths": PATHS}]


def build(spec: dict, device: torch.device) -> Case:
    from cpift_fast import ImportanceTracker, MaskedAdamW, ops

    shapes = mix(spec["mix"], spec["n"], spec["tensors"])
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen).to(device)) for _, shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    named = [(name, p) for (name, _), p in zip(shapes, params)]
    n = sum(p.numel() for p in params)

    def optimizer(**kw):
        return MaskedAdamW(named, lr=1e-6, **kw)

    def nbytes(state):
        return (28 + (STATE_BYTES[state] if state else 0)) * n

    backend = ops.masked_adamw_ema_.backend_for(device)
    paths = {"alone": Path(optimizer().step, "fused", nbytes(None))}
    plain = optimizer()
    separate = {}
    for name, dtype in DTYPES.items():
        tracker = ImportanceTracker(named, ["a"], beta=0.999, state_dtype=dtype)
        tracker.set_task("a")
        paths[f"fused/{name}"] = Path(optimizer(importance=tracker).step, "fused", nbytes(name),
                                      extra={"backend": backend, "state B/elem/task": STATE_BYTES[name] / 2})
        apart = ImportanceTracker(named, ["a"], beta=0.999, state_dtype=dtype)
        apart.set_task("a")
        separate[f"separate/{name}"] = Path(lambda apart=apart: (apart.update(), plain.step()), "fused",
                                            nbytes(name), extra={"state B/elem/task": STATE_BYTES[name] / 2})
    paths |= separate
    ema = [torch.zeros_like(p) for p in params]
    grads = [p.grad for p in params]

    def torch_ema_step():
        with torch.no_grad():
            signal = torch._foreach_mul(grads, [p.detach() for p in params])
            torch._foreach_abs_(signal)
            torch._foreach_mul_(ema, 0.999)
            torch._foreach_add_(ema, signal, alpha=0.001)
        plain.step()

    paths["torch EMA"] = Path(torch_ema_step, "anchor", nbytes("fp32"), extra={"state B/elem/task": 4.0})
    paths["pure PyTorch"] = Path(paths["fused/fp32"].fn, "reference", nbytes("fp32"), backend="torch", rounds=1,
                                 extra={"backend": "torch", "state B/elem/task": 4.0})
    params_info = {k: v for k, v in spec.items() if k not in ("case", "paths")} | describe_mix(shapes)
    return Case(spec["case"], params_info, paths, baseline="alone")


def run(size: str, device: torch.device, progress: bool = True):
    result = run_op("importance", specs(size), build, size, device, progress)
    for spec in specs(size):
        c = spec["case"]
        median = {path: result.find(c, path)["median_s"] for path in spec["paths"]}
        gbps = {path: result.find(c, path)["gbps"] for path in spec["paths"]}
        result.targets += [target(f"fused/{d} GB/s / alone's, {c}", gbps[f"fused/{d}"] / gbps["alone"], ">= 0.9")
                           for d in DTYPES]
        result.targets += [target(f"fused/bf16 time / alone's, {c}", median["fused/bf16"] / median["alone"], "<= 1.2"),
                           target(f"torch EMA time / fused/fp32's, {c}", median["torch EMA"] / median["fused/fp32"],
                                  ">= 1.5")]
        result.notes.append(f"{c}: time of the two cpift ops as separate passes / the fused step's, fp32 / bf16 / "
                            "int8 state: " + " / ".join(f"{median['separate/' + d] / median['fused/' + d]:.2f}"
                                                        for d in DTYPES) + ".")
    result.notes.append("Issue 11's targets: fused GB/s >= 90 % of alone's, fused with bf16 state <= 1.2x alone, "
                        ">= 1.5x faster than MaskedAdamW after a PyTorch EMA (fp32 state).")
    return result
