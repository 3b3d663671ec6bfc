"""Benchmark: pairwise overlap (|A∩B|, |A∪B| for all pairs) of T masks of N elements.

  fused        cpift_fast.overlap_counts over ParamMask words: one pass (C++ on CPU, Triton on CUDA)
  bool pairs   what users write today: T bool tensors, (a & b).sum() and (a | b).sum() for every
               pair i <= j (T(T+1)/2 x 2 passes over N bytes each); also with one reused out=
               buffer (no fresh allocation per pair: fresh pages are slow on some machines)
  read BW      torch.sum over a buffer as large as the mask words: this machine's read bandwidth

The bool path needs T·N bytes (8 GB for T = 8, N = 10^9): it is measured at N_bool = min(N, 10^8)
and its time scaled linearly to N (the fused path is timed at both sizes, so the ratio at N_bool
is measured, not extrapolated). Target: fused >= 20x the bool path, >= 60% of read bandwidth.

    python bench/bench_overlap.py            # T = 8, N = 10^9 (1 GB of words)
    python bench/bench_overlap.py --quick    # T = 8, N = 10^7
"""

from __future__ import annotations

import argparse
import gc

import torch

from .harness import machine_info, median, time_it, write_results


def random_words(T: int, n: int, gen: torch.Generator, device: str) -> list[torch.Tensor]:
    nwords = n // 32  # n is a multiple of 32: no padding bits
    return [torch.randint(-2**31, 2**31 - 1, (nwords,), dtype=torch.int32, generator=gen).to(device)
            for _ in range(T)]


def bool_pairs(bools: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = len(bools)
    inter = torch.zeros(T, T, dtype=torch.int64)
    union = torch.zeros(T, T, dtype=torch.int64)
    for i in range(T):
        for j in range(i, T):
            inter[i, j] = inter[j, i] = (bools[i] & bools[j]).sum()
            union[i, j] = union[j, i] = (bools[i] | bools[j]).sum()
    return inter, union


def bool_pairs_buffered(bools: list[torch.Tensor], buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same T² passes into one reused scratch tensor (no fresh allocation per pair)."""
    T = len(bools)
    inter = torch.zeros(T, T, dtype=torch.int64)
    union = torch.zeros(T, T, dtype=torch.int64)
    for i in range(T):
        for j in range(i, T):
            inter[i, j] = inter[j, i] = torch.logical_and(bools[i], bools[j], out=buf).sum()
            union[i, j] = union[j, i] = torch.logical_or(bools[i], bools[j], out=buf).sum()
    return inter, union


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-T", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from cpift_fast import _ops, ops

    T = args.T
    n = 10**7 if args.quick else 10**9
    n_bool = min(n, 10**8)
    n, n_bool = n - n % 32, n_bool - n_bool % 32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = _ops.OPS["overlap_counts"].backend_for(device)
    gen = torch.Generator().manual_seed(0)
    rows = []

    words = random_words(T, n, gen, device)
    nbytes = T * (n // 32) * 4
    probe = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    bw = nbytes / median(time_it(lambda: probe.sum(), repeats=args.repeats, device=device))
    del probe
    t_fused = median(time_it(lambda: ops.overlap_counts(words), repeats=args.repeats, device=device))
    rows.append({"path": f"fused ({backend})", "N": n, "ms": 1e3 * t_fused, "GB/s": nbytes / t_fused / 1e9,
                 "% read BW": 100 * nbytes / t_fused / bw, "speed-up": 1.0})
    rows.append({"path": "read BW (torch.sum)", "N": n, "ms": 1e3 * nbytes / bw, "GB/s": bw / 1e9,
                 "% read BW": 100.0})
    del words
    gc.collect()

    small = random_words(T, n_bool, gen, device)
    t_fused_small = median(time_it(lambda: ops.overlap_counts(small), repeats=args.repeats, device=device))
    bools = [ops.mask_unpack(w, n_bool) for w in small]
    inter, union = bool_pairs(bools)
    assert torch.equal(ops.overlap_counts(small).cpu(), inter), "fused and bool counts differ"
    t_bool_small = median(time_it(lambda: bool_pairs(bools), warmup=0, repeats=max(1, args.repeats // 2),
                                  device=device))
    buf = torch.empty_like(bools[0])
    assert torch.equal(bool_pairs_buffered(bools, buf)[1], union)
    t_buf_small = median(time_it(lambda: bool_pairs_buffered(bools, buf), warmup=0,
                                 repeats=max(1, args.repeats // 2), device=device))
    scale = n / n_bool
    bool_bytes = 2 * (T * (T + 1) // 2) * 2 * n_bool  # each pair op reads two N-byte tensors, twice
    rows.append({"path": "bool pairs", "N": n_bool, "ms": 1e3 * t_bool_small,
                 "GB/s": bool_bytes / t_bool_small / 1e9, "speed-up": t_bool_small / t_fused_small})
    rows.append({"path": "bool pairs, reused out= buffer", "N": n_bool, "ms": 1e3 * t_buf_small,
                 "GB/s": bool_bytes / t_buf_small / 1e9, "speed-up": t_buf_small / t_fused_small})
    rows.append({"path": f"fused ({backend})", "N": n_bool, "ms": 1e3 * t_fused_small,
                 "GB/s": T * (n_bool // 32) * 4 / t_fused_small / 1e9, "speed-up": 1.0})
    if scale != 1:
        rows.append({"path": "bool pairs (out= buffer), scaled to N", "N": n, "ms": 1e3 * t_buf_small * scale,
                     "speed-up": t_buf_small * scale / t_fused})

    speedup = min(t_bool_small, t_buf_small) / t_fused_small
    frac = nbytes / t_fused / bw
    notes = (f"T = {T} masks of N = {n} elements ({nbytes / 1e9:.2f} GB of words). Bool path measured at "
             f"N = {n_bool} ({T * n_bool / 1e9:.1f} GB of bools){' and scaled linearly to N' if scale != 1 else ''}. "
             f"Speed-up vs the faster bool path at equal N: {speedup:.1f}x (target >= 20x: "
             f"{'met' if speedup >= 20 else 'MISSED'}); fused reads at {100 * frac:.0f}% of the measured read "
             f"bandwidth {bw / 1e9:.1f} GB/s (target >= 60%: {'met' if frac >= 0.6 else 'MISSED'}).")
    if device == "cpu":
        notes += " Triton: not timed (no GPU here; the interpreter is a correctness tool, not a benchmark)."
    meta = {**machine_info(device), "T": T, "N": n}
    write_results("overlap_quick" if args.quick else "overlap", rows,
                  ["path", "N", "ms", "GB/s", "% read BW", "speed-up"], meta, notes)


if __name__ == "__main__":
    main()
