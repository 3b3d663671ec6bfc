"""Benchmark: per-tensor SLERP over ~100 tensors totalling N elements (fp32 and bf16), and over the
tensor shapes of a LLaMA-style model (bf16).

  fused      cpift_fast.slerp: one fused reduction pass + one fused elementwise pass
             (C++ on CPU, Triton on CUDA)
  reference  the same function on the pure-PyTorch path (CPIFT_BACKEND=torch)
  mergekit   mergekit's own slerp function (mergekit.merge_methods.slerp.slerp), result cast to the
             input dtype as mergekit does when it writes the merge; skipped with the reason recorded
             when mergekit is not importable (pip install --no-deps mergekit)
  a + b      torch.add(a, b) over the same tensors: a one-pass floor (read a, b; write out)

GB/s counts one read of a and b and one write of the result. Pairs are realistic for fine-tuned
weights (b = a + small noise, so most tensors take the true-SLERP branch). Targets: fused >= 3x
faster than mergekit and >= 2x faster than the reference.
"""

from __future__ import annotations

import torch

from .harness import Case, Path, count, describe_mix, mix, run_op, target

SIZES = {"quick": 10**6, "full": 10**8}
T = 0.4


def mergekit_slerp_fn():
    try:
        from mergekit.merge_methods.slerp import slerp as mk
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip, and say why"
        return None, f"mergekit not importable ({type(exc).__name__}: {exc}); pip install --no-deps mergekit"
    import inspect

    params = list(inspect.signature(mk).parameters)
    if params[:3] != ["t", "v0", "v1"]:
        return None, f"unexpected mergekit slerp signature {params}"
    try:  # mergekit >= 0.1.5: torch tensors with a leading batch axis and a tensor t
        probe = mk(torch.tensor([0.5]), torch.ones(1, 4), torch.ones(1, 4))
        assert probe.shape == (1, 4)

        def run(t, a, b):
            return mk(torch.tensor([t], device=a.device), a.unsqueeze(0), b.unsqueeze(0)).reshape(a.shape).to(a.dtype)
    except Exception:  # noqa: BLE001 - older mergekit: numpy, scalar t

        def run(t, a, b):
            out = mk(t, a, b)
            out = torch.from_numpy(out) if not isinstance(out, torch.Tensor) else out
            return out.reshape(a.shape).to(a.dtype)
    from importlib.metadata import version

    return run, f"mergekit {version('mergekit')} (its torch slerp)"


def _paths() -> tuple[str, ...]:
    names = ("fused", "pure PyTorch", "a + b (torch.add)")
    return names + ("mergekit",) if mergekit_slerp_fn()[0] is not None else names


def specs(size: str) -> list[dict]:
    n = SIZES[size]
    return [{"case": f"{dtype}, {count(n)} elements in 100 tensors", "dtype": dtype, "mix": "log", "n": n,
             "tensors": 100, "headline": True, "paths": _paths()} for dtype in ("float32", "bfloat16")] + [
        {"case": f"bfloat16, LLaMA shapes, {count(n)} elements", "dtype": "bfloat16", "mix": "llama", "n": n,
         "tensors": None, "headline": False, "paths": _paths()}]


def build(spec: dict, device: torch.device) -> Case:
    from cpift_fast import _ops, slerp

    dtype = getattr(torch, spec["dtype"])
    shapes = mix(spec["mix"], spec["n"], spec["tensors"])
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for _, shape in shapes:
        a = torch.randn(shape, generator=gen)
        b = a + 0.3 * torch.randn(shape, generator=gen)
        pairs.append((a.to(dtype).to(device), b.to(dtype).to(device)))
    nbytes = 3 * sum(a.numel() for a, _ in pairs) * dtype.itemsize
    backend = _ops.OPS["slerp_apply"].backend_for(device)

    def ours():
        return [slerp(T, a, b) for a, b in pairs]

    paths = {"fused": Path(ours, "fused", nbytes, extra={"backend": backend}),
             "pure PyTorch": Path(ours, "reference", nbytes, backend="torch", extra={"backend": "torch"}),
             "a + b (torch.add)": Path(lambda: [torch.add(a, b) for a, b in pairs], "floor", nbytes)}
    mk, _ = mergekit_slerp_fn()
    if mk is not None:
        worst = max(float((x.float() - y.float()).abs().max() / (y.float().abs().max() + 1e-30))
                    for x, y in zip(ours(), [mk(T, a, b) for a, b in pairs]))
        paths["mergekit"] = Path(lambda: [mk(T, a, b) for a, b in pairs], "anchor", nbytes,
                                 extra={"max_rel_diff_vs_fused": worst})
    params = {k: v for k, v in spec.items() if k not in ("case", "paths")} | describe_mix(shapes) | {"t": T}
    return Case(spec["case"], params, paths, baseline="fused")


def run(size: str, device: torch.device, progress: bool = True):
    result = run_op("fuse", specs(size), build, size, device, progress)
    mk, why = mergekit_slerp_fn()
    if mk is None:
        result.skipped.append({"path": "mergekit", "reason": why})
    else:
        result.notes.append(f"{why}; max_rel_diff_vs_fused: the largest |mergekit - fused| / max |mergekit| of "
                            "any tensor.")
    for spec in specs(size):
        result.targets.append(target(f"fused vs pure PyTorch, {spec['case']}",
                                     result.find(spec["case"], "pure PyTorch")["ratio"], ">= 2"))
        if mk is not None:
            result.targets.append(target(f"fused vs mergekit, {spec['case']}",
                                         result.find(spec["case"], "mergekit")["ratio"], ">= 3"))
    return result
