"""Benchmark: per-tensor SLERP over ~100 tensors totalling N elements (fp32 and bf16).

  fused      cpift_fast.slerp: one fused reduction pass + one fused elementwise pass
             (C++ on CPU, Triton on CUDA)
  reference  the same function on the pure-PyTorch path (CPIFT_BACKEND=torch)
  mergekit   mergekit's own slerp function (mergekit.merge_methods.slerp.slerp), result cast to the
             input dtype as mergekit does when it writes the merge; skipped with the reason printed
             when mergekit is not importable (pip install --no-deps mergekit)
  copy BW    torch.add(a, b) over the same tensors: a one-pass floor (read a, b; write out)

GB/s counts one read of a and b and one write of the result. Pairs are realistic for fine-tuned
weights (b = a + small noise, so most tensors take the true-SLERP branch). Targets: fused >= 3x
faster than mergekit and >= 2x faster than the reference.

    python bench/bench_fuse.py            # N = 10^8
    python bench/bench_fuse.py --quick    # N = 10^6
"""

from __future__ import annotations

import argparse
import os

import torch

from .harness import machine_info, median, tensor_sizes, time_it, write_results


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
            return mk(torch.tensor([t]), a.unsqueeze(0), b.unsqueeze(0)).reshape(a.shape).to(a.dtype)
    except Exception:  # noqa: BLE001 - older mergekit: numpy, scalar t

        def run(t, a, b):
            out = mk(t, a, b)
            out = torch.from_numpy(out) if not isinstance(out, torch.Tensor) else out
            return out.reshape(a.shape).to(a.dtype)
    from importlib.metadata import version

    return run, f"mergekit {version('mergekit')} (its torch slerp)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from cpift_fast import _ops, slerp

    n = 10**6 if args.quick else 10**8
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = _ops.OPS["slerp_apply"].backend_for(device)
    sizes = tensor_sizes(n, 100)
    mk, mk_note = mergekit_slerp_fn()
    print(mk_note)
    t = 0.4
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        pairs = []
        for s in sizes:
            a = torch.randn(s, generator=gen)
            b = a + 0.3 * torch.randn(s, generator=gen)
            pairs.append((a.to(dtype).to(device), b.to(dtype).to(device)))
        nbytes = 3 * n * pairs[0][0].element_size()

        def run_ours(backend_name):
            def go():
                if backend_name is None:
                    os.environ.pop("CPIFT_BACKEND", None)
                else:
                    os.environ["CPIFT_BACKEND"] = backend_name
                try:
                    return [slerp(t, a, b) for a, b in pairs]
                finally:
                    os.environ.pop("CPIFT_BACKEND", None)
            return go

        paths = {f"fused ({backend})": run_ours(None), "reference (torch)": run_ours("torch"),
                 "copy BW (torch.add)": lambda: [torch.add(a, b) for a, b in pairs]}
        if mk is not None:
            paths["mergekit"] = lambda: [mk(t, a, b) for a, b in pairs]
        ours = paths[f"fused ({backend})"]()
        if mk is not None:
            theirs = paths["mergekit"]()
            worst = max(float((x.float() - y.float()).abs().max() / (y.float().abs().max() + 1e-30))
                        for x, y in zip(ours, theirs))
            print(f"{dtype}: max relative difference fused vs mergekit {worst:.2e}")
        del ours
        times = {name: median(time_it(fn, repeats=args.repeats, device=device)) for name, fn in paths.items()}
        fused = times[f"fused ({backend})"]
        for name, sec in times.items():
            rows.append({"dtype": str(dtype).replace("torch.", ""), "path": name, "ms": 1e3 * sec,
                         "GB/s": nbytes / sec / 1e9, "fused speed-up": sec / fused})
        del pairs

    def ratio(dtype, name):
        r = [row for row in rows if row["dtype"] == dtype and row["path"] == name]
        return r[0]["fused speed-up"] if r else None

    notes = [f"{len(sizes)} tensors, {n} elements, t = {t}; {mk_note}."]
    for dtype in ("float32", "bfloat16"):
        ref = ratio(dtype, "reference (torch)")
        mkr = ratio(dtype, "mergekit")
        notes.append(f"{dtype}: {ref:.1f}x vs reference (target 2x: {'met' if ref >= 2 else 'MISSED'})"
                     + (f", {mkr:.1f}x vs mergekit (target 3x: {'met' if mkr >= 3 else 'MISSED'})"
                        if mkr is not None else ", mergekit skipped"))
    if device == "cpu":
        notes.append("Triton: not timed (no GPU here; the interpreter is a correctness tool, not a benchmark).")
    meta = {**machine_info(device), "elements": n, "tensors": len(sizes)}
    write_results("fuse_quick" if args.quick else "fuse", rows, ["dtype", "path", "ms", "GB/s", "fused speed-up"],
                  meta, "\n".join(notes))


if __name__ == "__main__":
    main()
