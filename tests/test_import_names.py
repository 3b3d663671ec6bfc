"""The checkout puts no top-level name on sys.path but `cpift_fast`.

`python -m pytest` or `python -m cpift_fast` run from the checkout put its root first on sys.path.
A regular package there (a directory with __init__.py) would then shadow an installed distribution
of the same name. A root kernels/ package did: it shadowed PyPI's `kernels`, which transformers >=
5.25 requires, and no transformers model loaded. The Triton kernels are cpift_fast/kernels/; csrc/
(C++ sources, no __init__.py) installs as data of cpift_fast.csrc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_only_cpift_fast_is_a_package_at_the_checkout_root():
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == ["cpift_fast"], f"regular packages at the checkout root: {packages}"


def test_an_installed_kernels_distribution_wins_over_the_checkouts_kernels_dir(tmp_path):
    """A stand-in for PyPI's `kernels` (package + dist-info) on PYTHONPATH; Python started in the
    checkout's root (sys.path[0]) must import it, and cpift_fast's Triton modules must still resolve."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("__version__ = '0.19.1'\n")
    dist = site / "kernels-0.19.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    probe = (
        "import importlib.metadata, importlib.util, json, kernels\n"
        "print(json.dumps({'file': kernels.__file__, 'version': importlib.metadata.version('kernels'),\n"
        "                  'ours': importlib.util.find_spec('cpift_fast.kernels.mask').origin}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert Path(found["file"]) == site / "kernels" / "__init__.py", found
    assert found["version"] == "0.19.1"
    assert Path(found["ours"]).name == "mask.py", found
