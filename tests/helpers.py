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
