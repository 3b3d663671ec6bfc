"""core_region(..., group=pg) on 2 gloo processes equals the single-process global mask."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpift_fast import core_region

WORLD = 2


def full_pair(dtype):
    """Shared by both ranks (same seed): heavy ties so that the tie budget is split across ranks."""
    g = torch.Generator().manual_seed(0)
    shapes = {"layers.0.w": (37, 11), "layers.1.w": (1,), "layers.2.w": (0,), "layers.3.w": (5000,)}
    base, tuned = {}, {}
    for name, shape in shapes.items():
        b = torch.randint(-4, 4, shape, generator=g).float()
        delta = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.randint(0, 4, shape, generator=g)]
        base[name], tuned[name] = b.to(dtype), (b + delta).to(dtype)
    return base, tuned


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's contiguous piece of the flattened tensor (rank 0 first: the global flat order)."""
    return torch.tensor_split(t.reshape(-1), WORLD)[rank]


def _worker(rank: int, init_file: str, results: str, fraction: float, mode: str, dtype) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        base, tuned = full_pair(dtype)
        local_b = {n: shard(t, rank) for n, t in base.items()}
        local_t = {n: shard(t, rank) for n, t in tuned.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = core_region(local_b, local_t, fraction, mode=mode, group=dist.group.WORLD, progress=False)
        torch.save({"bits": mask.to_bool(), "k": mask.info.k, "selected": mask.info.selected},
                   os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fraction,mode,dtype", [(0.3, "exact", torch.float32), (0.05, "exact", torch.bfloat16),
                                                 (0.9, "exact", torch.float32), (0.3, "approx", torch.float32)])
def test_two_process_gloo_equals_single_process(tmp_path, fraction, mode, dtype):
    init_file = str(tmp_path / "init")
    mp.start_processes(_worker, args=(init_file, str(tmp_path), fraction, mode, dtype), nprocs=WORLD,
                       start_method="fork")
    base, tuned = full_pair(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = core_region(base, tuned, fraction, mode=mode, progress=False)
    expected = single.to_bool()
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in base:
        got = torch.cat([p["bits"][name] for p in parts])
        assert torch.equal(got, expected[name].reshape(-1)), name
    for p in parts:
        assert p["k"] == single.info.k and p["selected"] == single.info.selected
