"""Small helpers shared by test modules (pytest puts tests/ on sys.path)."""

import contextlib
import os


@contextlib.contextmanager
def forced(backend: str):
    """Run a block with CPIFT_BACKEND=backend, restoring the previous value after."""
    old = os.environ.get("CPIFT_BACKEND")
    os.environ["CPIFT_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            del os.environ["CPIFT_BACKEND"]
        else:
            os.environ["CPIFT_BACKEND"] = old


@contextlib.contextmanager
def one_thread():
    """Run a block on one intra-op thread (as a worker started with OMP_NUM_THREADS=1 does), restoring the
    previous count after. Matmul reductions split over threads sum in a thread-count-dependent order, so a
    reference meant to equal such a worker bit for bit must be computed this way."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def set_config_value(path: str, value):
    """A function that sets the dotted config key `path` to `value` in a config dict (creating parents)."""
    def change(cfg):
        node = cfg
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return change


def stage_digests(root: str) -> dict[str, str]:
    """{stage key: output digest} of every finished stage of a run directory (hidden dirs skipped)."""
    import json

    from cpift_fast.pipeline.run import MANIFEST

    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if MANIFEST in files:
            with open(os.path.join(dirpath, MANIFEST)) as f:
                out[os.path.relpath(dirpath, root).replace(os.sep, "/")] = json.load(f)["digest"]
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a launcher's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn, world: int, init_file: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # as a worker started with OMP_NUM_THREADS=1 (compare with one_thread())
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, tmp_dir, *args) -> None:
    """fn(rank, world, *args) in `world` forked processes joined in one gloo group (the default
    group, initialised through a file in `tmp_dir`), each on one intra-op thread; raises if any
    rank fails. `fn` must be a module-level function; results go through files."""
    import torch.multiprocessing as mp

    init_file = os.path.join(str(tmp_dir), f"init-{os.getpid()}-{world}")
    if os.path.exists(init_file):
        os.unlink(init_file)
    mp.start_processes(_rank_main, args=(fn, world, init_file, args), nprocs=world, start_method="fork")
