"""EPI under FSDP2 (fully_shard, DTensor params) and DDP: 2 processes, gloo, CPU.

ImportanceTracker keeps the EMA state of each rank's shards only (sharded with the parameters);
layer means and the global top-k are all-reduced, so the masks, the drift log and the trained
parameters equal a 1-process run. Every rank trains on the same full batch, so the averaged
gradients are the 1-process gradients bit for bit and the comparison can be exact.
The test runs this file as a script (fresh interpreter, torch.multiprocessing.spawn of 2 ranks).
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import free_port, one_thread

TASKS = ("a", "b")
SCHEDULE = "aabbabab"


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(33, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5))


def _batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 33, generator=gen) * (1 + step % 3)


def _train(model, forward, state_dtype=torch.float32):
    """EPI with the EMA fused into MaskedAdamW; returns (tracker, isolation, optimizer)."""
    from cpift_fast import ImportanceTracker, MaskedAdamW
    from cpift_fast.evolving import EvolvingIsolation

    tracker = ImportanceTracker(model.named_parameters(), TASKS, beta=0.9, state_dtype=state_dtype, seed=3)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, importance=tracker)
    iso = EvolvingIsolation(opt, tracker, ratio=0.2, interval=2, warmup=2)
    for step, task in enumerate(SCHEDULE):
        opt.zero_grad()
        forward(_batch(step)).square().mean().backward()
        iso.before_step(task)
        opt.step()
        iso.after_step()
    return tracker, iso, opt


def _masks(iso):
    return {t: {n: b.clone() for n, b in iso.masks[t].to_bool().items()} for t in TASKS}


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        tracker, iso, _ = _train(model, model)
        state_bytes = tracker.state_bytes()
        result = {"params": {n: p.full_tensor() for n, p in model.named_parameters()}, "log": iso.log,
                  "masks": _masks(iso), "state_bytes": state_bytes,
                  "importance": {n: v.clone() for n, v in tracker.importance("a").items()}}
        model8 = _model()
        fully_shard(model8)
        _, iso8, _ = _train(model8, model8, "int8")
        result["int8_protected"] = [r["protected"] for r in iso8.log]
        model = _model()
        ddp = DistributedDataParallel(model)
        _, iso_ddp, _ = _train(model, ddp)
        result["ddp_params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        result["ddp_log"] = iso_ddp.log
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_epi_under_fsdp2_and_ddp_matches_single_process(tmp_path):
    env = dict(os.environ, CPIFT_BACKEND="cpp", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    model = _model()
    with one_thread():  # the ranks run with OMP_NUM_THREADS=1; the 1-process reference must sum in their order
        tracker, iso, _ = _train(model, model)
    assert iso.log and all(r["protected"] > 0 for r in iso.log[-2:])
    for got in ranks:
        for params in (got["params"], got["ddp_params"]):
            for n, p in model.named_parameters():
                assert torch.equal(params[n], p.detach()), n
        assert got["log"] == iso.log and got["ddp_log"] == iso.log  # global counts on every rank
        # 8-bit state: blocks and random streams are per shard (not bit-equal to 1 process), counts are global
        assert got["int8_protected"][-1] == round(0.2 * sum(p.numel() for p in model.parameters()))
    # each rank holds (and selected) its dim-0 shard: together, the 1-process masks and importance
    for t in TASKS:
        for n, bits in iso.masks[t].to_bool().items():
            assert torch.equal(torch.cat([got["masks"][t][n] for got in ranks]), bits), (t, n)
    for n, value in tracker.importance("a").items():
        assert torch.equal(torch.cat([got["importance"][n] for got in ranks]), value), n
    assert sum(got["state_bytes"] for got in ranks) == tracker.state_bytes()  # sharded, not replicated


if __name__ == "__main__":
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch was built without torch.distributed", allow_module_level=True)
    mp.spawn(_worker, args=(2, free_port(), sys.argv[1]), nprocs=2)
