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
