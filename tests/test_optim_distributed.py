"""MaskedAdamW under FSDP2 (fully_shard, DTensor params) and DDP: 2 processes, gloo, CPU.

Each process steps only its local shards with the mask cut to them; the result must equal
single-process training on the full batch, and frozen elements must not move at all.
The test runs this file as a script (fresh interpreter, torch.multiprocessing.spawn of 2 ranks).
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import free_port

STEPS = 4
BATCH = 8


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(33, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5))


def _mask(model):
    from cpift_fast import ParamMask

    gen = torch.Generator().manual_seed(1)
    return ParamMask.from_bool({n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in model.named_parameters()})


def _batches():
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(BATCH, 33, generator=gen) for _ in range(STEPS)]


def _train(model, opt, batches, rank=0, world=1):
    """Mean loss over the global batch; each rank sees its slice (gradients averaged by the wrapper)."""
    from cpift_fast import masked_grad_norm

    norm = None
    for x in batches:
        opt.zero_grad()
        model(x.chunk(world)[rank]).square().mean().backward()
        norm = masked_grad_norm(model.named_parameters(), opt.frozen_mask())
        opt.step()
    return norm


def _single_process():
    from cpift_fast import MaskedAdamW

    model = _model()
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True, frozen=_mask(model))
    norm = _train(model, opt, _batches())
    return model, opt, norm


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from cpift_fast import MaskedAdamW

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # FSDP2: DTensor params sharded on dim 0 (shard sizes not multiples of 32: masks must be re-packed)
        model = _model()
        mask = _mask(model)
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True, frozen=mask)
        norm = _train(model, opt, _batches(), rank, world)
        fsdp = {n: p.full_tensor() for n, p in model.named_parameters()}
        fsdp_state = {n: opt.state[p]["exp_avg"].full_tensor() for n, p in model.named_parameters()}
        local_shapes = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}

        # DDP: plain tensors, gradients all-reduced
        model = _model()
        ddp = DistributedDataParallel(model)
        opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True, frozen=mask)
        for x in _batches():
            opt.zero_grad()
            ddp(x.chunk(world)[rank]).square().mean().backward()
            opt.step()
        if rank == 0:
            torch.save({"fsdp": fsdp, "fsdp_state": fsdp_state, "fsdp_norm": norm, "local_shapes": local_shapes,
                        "ddp": {n: p.detach().clone() for n, p in model.named_parameters()}},
                       os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_and_ddp_match_single_process(tmp_path):
    env = dict(os.environ, CPIFT_BACKEND="cpp", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "result.pt", weights_only=True)

    model, opt, norm = _single_process()
    init = dict(_model().named_parameters())
    mask = _mask(model)
    assert got["local_shapes"]["0.weight"] == (16, 33)  # rank 0 holds rows 0..15: a shard of 528 elements
    for n, p in model.named_parameters():
        frozen = mask.tensor_bits(n)
        for result in (got["fsdp"][n], got["ddp"][n]):
            assert torch.equal(result[frozen], init[n].detach()[frozen])
            torch.testing.assert_close(result, p.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["fsdp_state"][n], opt.state[p]["exp_avg"], rtol=1e-5, atol=1e-7)
        assert not torch.equal(p.detach()[~frozen], init[n].detach()[~frozen])
    torch.testing.assert_close(got["fsdp_norm"], norm, rtol=1e-5, atol=0)


if __name__ == "__main__":
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch was built without torch.distributed", allow_module_level=True)
    mp.spawn(_worker, args=(2, free_port(), sys.argv[1]), nprocs=2)
