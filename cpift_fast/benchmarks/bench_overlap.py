"""Benchmark: pairwise overlap (|A∩B|, |A∪B| for all pairs) of T masks of N elements.

  fused        cpift_fast.overlap_counts over ParamMask words: one pass (C++ on CPU, Triton on CUDA)
  reference    overlap_counts on the pure-PyTorch path (CPIFT_BACKEND=torch: unpack to bool, T² passes)
  bool pairs   what users write today: T bool tensors, (a & b).sum() and (a | b).sum() for every
               pair i <= j (T(T+1)/2 x 2 passes over N bytes each); also with one reused out=
               buffer (no fresh allocation per pair: fresh pages are slow on some machines)
  numpy        numpy.packbits masks (N/8 bytes each), popcount of a & b and a | b per pair
               (numpy.bitwise_count; a 256-entry table on numpy < 2); on the CPU
  read BW      torch.sum over a buffer as large as the mask words: this machine's read bandwidth

The bool paths need T·N bytes (8 GB for T = 8, N = 10^9): they are measured in a second case at
N_bool = 10^8 (quick: 2^20 of N = 2^22), where the fused path is timed too (the ratio at N_bool is
measured, not extrapolated). GB/s: the bytes each path must read (words: N/8 per mask, also for the
pure-PyTorch path; bool: N per mask per pass; numpy: N/8 per mask per pass). Targets: fused >= 20x
the faster bool path, >= 60 % of the read bandwidth.
"""

from __future__ import annotations

import numpy as np
import torch

from .harness import Case, Path, count, run_op, target

T = 8
SIZES = {"quick": (2**22, 2**20), "full": (10**9, 10**8)}  # N, N_bool
PATHS = {"words": ("fused", "read BW (torch.sum)"),
         "bool": ("fused", "pure PyTorch", "bool pairs", "bool pairs, reused out= buffer", "numpy packbits")}


def random_words(T: int, n: int, gen: torch.Generator, device) -> list[torch.Tensor]:
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


_POPCOUNT_TABLE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(packed: np.ndarray) -> int:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return int(np.bitwise_count(packed).sum(dtype=np.int64))
    return int(_POPCOUNT_TABLE[packed].sum(dtype=np.int64))


def numpy_pairs(packed: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Jaccard counts as a numpy user writes them: masks from numpy.packbits, popcounts per pair."""
    T = len(packed)
    inter = np.zeros((T, T), dtype=np.int64)
    union = np.zeros((T, T), dtype=np.int64)
    for i in range(T):
        for j in range(i, T):
            inter[i, j] = inter[j, i] = _popcount(packed[i] & packed[j])
            union[i, j] = union[j, i] = _popcount(packed[i] | packed[j])
    return inter, union


def specs(size: str) -> list[dict]:
    n, n_bool = (x - x % 32 for x in SIZES[size])
    return [{"case": f"T = {T}, N = {count(n)} (words)", "kind": "words", "T": T, "n": n, "headline": True,
             "paths": PATHS["words"]},
            {"case": f"T = {T}, N = {count(n_bool)} (bool paths too)", "kind": "bool", "T": T, "n": n_bool,
             "headline": True, "paths": PATHS["bool"]}]


def build(spec: dict, device: torch.device) -> Case:
    from cpift_fast import _ops, ops

    n = spec["n"]
    gen = torch.Generator().manual_seed(0)
    words = random_words(T, n, gen, device)
    nbytes = T * (n // 32) * 4
    backend = _ops.OPS["overlap_counts"].backend_for(device)
    params = {k: v for k, v in spec.items() if k not in ("case", "paths")}
    fused = Path(lambda: ops.overlap_counts(words), "fused", nbytes, extra={"backend": backend})
    if spec["kind"] == "words":
        probe = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        return Case(spec["case"], params, {"fused": fused, "read BW (torch.sum)": Path(probe.sum, "floor", nbytes)},
                    baseline="fused")

    bools = [ops.mask_unpack(w, n) for w in words]
    buf = torch.empty_like(bools[0])
    packed = [np.packbits(b.cpu().numpy(), bitorder="little") for b in bools]
    # the anchors' arithmetic, checked against the fused counts on the first 2^20 elements
    head = 2**20 // 32
    want = ops.overlap_counts([w[:head] for w in words]).cpu()
    small = [b[: 32 * head] for b in bools]
    assert torch.equal(bool_pairs(small)[0], want), "bool pairs and fused counts differ"
    assert torch.equal(bool_pairs_buffered(small, torch.empty_like(small[0]))[0], want)
    assert np.array_equal(numpy_pairs([p[: 4 * head] for p in packed])[0], want.numpy())
    bool_bytes = 2 * (T * (T + 1) // 2) * 2 * n  # each pair op reads two N-byte tensors, twice
    once = {"rounds": 1}  # seconds per call at full size
    return Case(spec["case"], params, {
        "fused": fused,
        "pure PyTorch": Path(lambda: ops.overlap_counts(words), "reference", nbytes, backend="torch",
                             extra={"backend": "torch"}, **once),
        "bool pairs": Path(lambda: bool_pairs(bools), "anchor", bool_bytes, **once),
        "bool pairs, reused out= buffer": Path(lambda: bool_pairs_buffered(bools, buf), "anchor", bool_bytes, **once),
        "numpy packbits": Path(lambda: numpy_pairs(packed), "anchor", bool_bytes / 8, extra={"device": "cpu"}),
    }, baseline="fused")


def run(size: str, device: torch.device, progress: bool = True):
    result = run_op("overlap", specs(size), build, size, device, progress)
    words_case, bool_case = (s["case"] for s in specs(size))
    fused = result.find(words_case, "fused")
    floor = result.find(words_case, "read BW (torch.sum)")
    speedup = min(result.find(bool_case, p)["ratio"] for p in ("bool pairs", "bool pairs, reused out= buffer"))
    result.targets += [target("fused vs the faster bool path, at N_bool", speedup, ">= 20"),
                       target("fused, % of the read bandwidth (torch.sum)", 100 * fused["gbps"] / floor["gbps"],
                              ">= 60")]
    n, n_bool = (s["n"] for s in specs(size))
    if n != n_bool:
        scaled = result.find(bool_case, "bool pairs, reused out= buffer")["median_s"] * n / n_bool
        result.notes.append(f"bool pairs (out= buffer) scaled linearly to N = {count(n)}: {scaled:.1f} s, "
                            f"{scaled / fused['median_s']:.0f}x the fused path at that N (an extrapolation, not "
                            "a measurement).")
    result.notes.append("GB/s: the bytes each path must read: the words (N/8 per mask) for the fused and the "
                        "pure-PyTorch path (which unpacks them to bool first), N per mask per pass for the bool "
                        "pairs, N/8 per mask per pass for numpy (on the CPU).")
    return result
