"""Benchmark: per-tensor SLERP over ~100 tensors totalling N elements (fp32 and bf16), and over the
tensor shapes of a LLaMA-style model (bf16).

  fused      cpift_fast.slerp: one fused reduction pass + one fused elementwise pass
             (C++ on CPU, Triton on CUDA)
  reference  the same function on the pure-PyTorch path (CPIFT_BACKEND=torch)
  mergekit   mergekit's own slerp function (mergekit.merge_methods.slerp.slerp), result cast to the
             input dtype as mergekit does when it writes the merge; skipped with the reason recorded
             when mergekit is not importable (pip install --no-deps mergekit)
  a + b      torch.add(a, b) over the same tensors: a one-pass floor (read a, b; write out)

List vs loop (what ``fuse_models`` runs): the same SLERP (stats, coefficients, blend) over
500 tensors of 4096 bf16 elements (norms, biases) and over one tensor of 2M elements:

  list ops        what fuse_models runs per run of tensors: one slerp_stats_list call, the SLERP
                  coefficients per tensor (Python), one slerp_apply_list call (the C++ kernels split
                  one work list of chunks of every tensor over all threads)
  list kernels    the two list-op calls alone (torch.ops.cpift.*, coefficients precomputed): the
                  kernels' own cost, without the per-tensor Python work around them
  per-tensor loop slerp_stats + coefficients + slerp_apply per tensor (fuse_models before the list ops)
  pure PyTorch    the list-ops path on the reference backend (CPIFT_BACKEND=torch)

The claim the pair of cases checks: per element, 500 small tensors are as fast as one big one
(targets: the list kernels' time per element on 500 x 4k over their time per element on 1 x 2M,
and the loop's time over the list ops' on 500 x 4k).

GB/s counts one read of a and b and one write of the result. Pairs are realistic for fine-tuned
weights (b = a + small noise, so most tensors take the true-SLERP branch). Targets: fused >= 3x
faster than mergekit and >= 2x faster than the reference.
"""

from __future__ import annotations

import torch

from .harness import Case, Path, count, describe_mix, mix, run_op, target

SIZES = {"quick": 10**6, "full": 10**8}
T = 0.4
LIST_CASES = {"500 x 4k": (500, 4096), "1 x 2M": (1, 1 << 21)}  # (tensors, elements each), every size
LIST_PATHS = ("list ops", "list kernels", "per-tensor loop", "pure PyTorch")


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
         "tensors": None, "headline": False, "paths": _paths()}] + [
        {"case": _list_case(k), "dtype": "bfloat16", "list": k, "tensors": t, "each": e, "headline": False,
         "paths": LIST_PATHS} for k, (t, e) in LIST_CASES.items()]


def _list_case(key: str) -> str:
    return f"list vs loop: bfloat16, {key} elements"


def _build_list(spec: dict, device: torch.device) -> Case:
    from cpift_fast import ops
    from cpift_fast.fuse import _slerp_run, slerp_coefficients

    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(spec["each"], generator=gen) for _ in range(spec["tensors"])]
    b = [(x + 0.3 * torch.randn(x.shape, generator=gen)).to(torch.bfloat16).to(device) for x in a]
    a = [x.to(torch.bfloat16).to(device) for x in a]
    n = len(a)
    elements = n * spec["each"]
    nbytes = 3 * elements * 2

    def run_list():
        return _slerp_run([T] * n, a, b, [None] * n, False, 0.9995, 1e-8, ["tensor"] * n)

    coeffs = [0.5, 0.5, 0.0] * n  # the blend costs the same whatever the coefficients
    none = [None] * n

    def run_kernels():
        torch.ops.cpift.slerp_stats_list(a, b, none)
        return torch.ops.cpift.slerp_apply_list(a, b, none, coeffs, [], [], [0] * n, 0)

    def run_loop():
        out = []
        for x, y in zip(a, b):
            c0, c1, c2, _ = slerp_coefficients(T, ops.slerp_stats(x, y, None))
            out.append(ops.slerp_apply(x, y, None, c0, c1, c2, [], [], 0))
        return out

    extra = {"elements": elements}
    paths = {"list ops": Path(run_list, "fused", nbytes, extra=extra | {"backend": _ops_backend(device)}),
             "list kernels": Path(run_kernels, "fused", nbytes, extra=extra | {"backend": _ops_backend(device)}),
             "per-tensor loop": Path(run_loop, "fused", nbytes, extra=extra | {"backend": _ops_backend(device)}),
             "pure PyTorch": Path(run_list, "reference", nbytes, backend="torch", extra=extra | {"backend": "torch"})}
    params = {k: v for k, v in spec.items() if k not in ("case", "paths")} | {"t": T, "elements": elements}
    return Case(spec["case"], params, paths, baseline="list ops")


def _ops_backend(device: torch.device) -> str:
    from cpift_fast import _ops

    return _ops.OPS["slerp_apply_list"].backend_for(device)


def build(spec: dict, device: torch.device) -> Case:
    if "list" in spec:
        return _build_list(spec, device)
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
    small, big = (result.find(_list_case(k), "list kernels") for k in LIST_CASES)
    per_element = {k: r["median_s"] / r["elements"] for k, r in zip(LIST_CASES, (small, big))}
    result.notes.append("list vs loop, ns per element: " + "; ".join(
        f"{k}: " + ", ".join(f"{p} {1e9 * result.find(_list_case(k), p)['median_s'] / (t * e):.3f}" for p in LIST_PATHS)
        for k, (t, e) in LIST_CASES.items()))
    result.targets.append(target("list kernels, time per element: 500 x 4k / 1 x 2M",
                                 per_element["500 x 4k"] / per_element["1 x 2M"], "<= 1.2"))
    result.targets.append(target("per-tensor loop vs list ops, 500 x 4k (time ratio)",
                                 result.find(_list_case("500 x 4k"), "per-tensor loop")["ratio"], ">= 1.5"))
    for spec in specs(size):
        if "list" in spec:
            continue
        result.targets.append(target(f"fused vs pure PyTorch, {spec['case']}",
                                     result.find(spec["case"], "pure PyTorch")["ratio"], ">= 2"))
        if mk is not None:
            result.targets.append(target(f"fused vs mergekit, {spec['case']}",
                                         result.find(spec["case"], "mergekit")["ratio"], ">= 3"))
    return result
