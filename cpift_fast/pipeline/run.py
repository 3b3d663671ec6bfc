"""Resumable runs: every stage is a directory ``runs/NAME/<key>/`` written atomically.

A stage is computed in ``.tmp-<name>-<pid>`` next to its final place, gets a ``manifest.json``
(config hash of the settings it used, the digests of its inputs, the digest of its own outputs)
and is then renamed into place, so a directory either holds a finished stage or does not exist.
On a re-run, a stage whose manifest matches (same config hash, same input digests) is skipped; a
changed setting or input re-runs it and, through the changed digest, everything downstream.
``--from KIND`` re-runs every stage of that kind and of all later kinds. Each stage seeds its own
RNGs from (run seed, stage key) and reads its inputs from disk, so a killed run that is re-run
gives bit-identical results to one that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# The order of stage kinds; --from KIND re-runs this kind and every later one.
KINDS = ("base", "probe", "core", "group", "stages", "fuse", "consolidate", "forgetting", "eval")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StageOut:
    key: str
    path: str
    digest: str
    manifest: dict


def digest_dir(path: str) -> str:
    """sha256 over (relative path, content) of every file except the manifest, in sorted order;
    safetensors files (checkpoints, masks) by tensor content and sorted metadata."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel == MANIFEST:
                continue
            h.update(rel.encode() + b"\0")
            if name.endswith((".safetensors", ".mask")):
                _hash_safetensors(full, h)
                continue
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _hash_safetensors(path: str, h) -> None:
    """Hash a safetensors file by content: sorted metadata, then each tensor's name, dtype, shape and
    bytes. (The writer orders metadata keys differently from one process to the next, so the raw
    bytes of two identical files may differ.)"""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        h.update(json.dumps(sorted((f.metadata() or {}).items())).encode())
        for key in sorted(f.keys()):
            t = f.get_tensor(key).contiguous()
            h.update(f"{key}|{t.dtype}|{list(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def seed_everything(seed: int, key: str) -> int:
    """Seed python, numpy and torch from (seed, stage key); return the derived seed."""
    derived = int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:4], "little") & 0x7FFFFFFF
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    return derived


class Run:
    """The stage cache of one run directory."""

    def __init__(self, root: str, from_kind: str | None = None, progress: bool = True):
        if from_kind is not None and from_kind not in KINDS:
            raise ValueError(f"--from {from_kind!r}: unknown stage (valid: {', '.join(KINDS)})")
        self.root = os.path.abspath(root)
        self.forced = set(KINDS[KINDS.index(from_kind):]) if from_kind else set()
        self.progress = progress
        self.done: dict[str, StageOut] = {}
        self.log: list[tuple[str, str, float]] = []  # (key, "ran"|"cached", seconds)
        os.makedirs(self.root, exist_ok=True)
        self._clean_temps()

    def _clean_temps(self) -> None:
        """Remove half-written stages left by a killed run."""
        for root, dirs, _ in os.walk(self.root):
            for d in list(dirs):
                if d.startswith((".tmp-", ".old-")):
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
                    dirs.remove(d)

    def path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def stage(self, key: str, kind: str, params: dict, deps: list[StageOut],
              fn: Callable[[str], dict | None], seed: int = 0) -> StageOut:
        """Return the finished stage `key`, computing it with fn(tmp_dir) unless a valid one exists.

        `params`: every setting the stage uses (hashed into the manifest); `deps`: input stages.
        fn writes its outputs into the directory it is given and may return extra manifest info.
        """
        if kind not in KINDS:
            raise ValueError(f"stage {key}: unknown kind {kind!r}")
        if key in self.done:
            return self.done[key]
        config_hash = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
        inputs = {d.key: d.digest for d in deps}
        final = self.path(key)
        manifest_path = os.path.join(final, MANIFEST)
        if kind not in self.forced and os.path.exists(manifest_path):
            with open(manifest_path) as f:
                old = json.load(f)
            if old.get("config_hash") == config_hash and old.get("inputs") == inputs:
                out = StageOut(key, final, old["digest"], old)
                self.done[key] = out
                self.log.append((key, "cached", 0.0))
                if self.progress:
                    print(f"  ✓ {key} (done earlier, skipped)", flush=True)
                return out
        parent, base = os.path.split(final)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{base}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if self.progress:
            print(f"▶ {key}", flush=True)
        t0 = time.perf_counter()
        seed_everything(seed, key)
        try:
            info = fn(tmp) or {}
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.perf_counter() - t0
        manifest = {"stage": key, "kind": kind, "config_hash": config_hash, "params": params,
                    "inputs": inputs, "digest": digest_dir(tmp), "seconds": round(seconds, 3), "info": info}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            old_dir = os.path.join(parent, f".old-{base}-{os.getpid()}")
            os.rename(final, old_dir)
            os.rename(tmp, final)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.rename(tmp, final)
        out = StageOut(key, final, manifest["digest"], manifest)
        self.done[key] = out
        self.log.append((key, "ran", seconds))
        if self.progress:
            print(f"  ✓ {key} ({seconds:.1f} s)", flush=True)
        return out
