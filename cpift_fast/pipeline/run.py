"""Resumable runs: every stage is a directory ``runs/NAME/<key>/`` written atomically.

A stage is computed in ``.tmp-<name>-<pid>`` next to its final place, gets a ``manifest.json``
(config hash of the settings it used, the digests of its inputs, the digest of its own outputs,
and the size and sha256 of every file it wrote) and is then renamed into place, so a directory
either holds a finished stage or does not exist. Every data file, then the manifest, then the
directory entries are fsynced before the rename.

Re-runs: a stage whose manifest matches (same config hash, same input digests) and whose files
check out against the manifest (``verify="fast"``: every recorded file present with its recorded
size and no unrecorded one; ``"full"``: their sha256 re-computed too) is skipped; a mismatch
re-runs the stage with a warning naming the file. A changed setting or input re-runs it and,
through the changed digest, everything downstream. ``--from KIND`` re-runs every stage of that
kind and of all later kinds. Each stage seeds its own RNGs from (run seed, stage key) and reads its
inputs from disk, so a killed run that is re-run gives bit-identical results to one that was never
interrupted.

Concurrency: each stage has an exclusive lock (``flock`` on ``.locks/<key>.lock`` in the run
directory), held while it is checked, computed and published. Several processes may work on one
run directory: two that need the same stage do it once (the second waits, then reuses the first's
result), independent stages proceed in parallel. A temp directory is removed only by a process
holding its stage's lock, i.e. when its owner is dead. Readers of a finished stage take no lock:
a stage that is *replaced* (``--from``, or a failed verification) while another process reads its
files can fail that reader, so re-run with ``--from`` from one process at a time. Locks are
``flock``: local file systems and NFSv4 (Linux maps it to POSIX locks there).

One stage kind at a time (``cpift run CFG --stage KIND [--task NAME]``, cluster fan-out): a Run
made with ``only=KIND`` (and ``task=NAME`` for a per-task kind: ``PER_TASK``, probe and core)
computes only the stages of that kind (of that task). Every other stage it is asked for must be
finished: an unfinished one of an earlier kind is a missing input (``MissingStageError``, nothing upstream is computed; one that
another process is computing right now is waited for); an unfinished one of a later kind, or
another task's piece of the kind, is not this command's work (``NotSelected``: the caller drops the
part of the pipeline that needs it, without waiting for a process that holds its lock).

Several processes of one launch (torchrun, accelerate launch; ``dist=``, see dist.py): rank 0 alone
locks, checks, cleans and publishes, and broadcasts each decision and outcome; a ``collective``
stage (training; core selection and fusion from local checkpoints) runs its function on every
rank, any other stage on rank 0 only. Every rank ends each ``stage`` call with the same StageOut,
or the same error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import torch

from .dist import SINGLE, Dist

# The order of stage kinds; --from KIND re-runs this kind and every later one.
KINDS = ("base", "probe", "core", "group", "stages", "fuse", "consolidate", "forgetting", "eval")
MANIFEST = "manifest.json"
LOCKS = ".locks"
VERIFY = ("fast", "full")
# kinds with one stage per task, and the key segment above the task (seedK/probe/<task>,
# seedK/cores/<task>): --task selects one. (The seed-level core stage, seedK/core, collects the cores.)
PER_TASK = {"probe": "probe", "core": "cores"}
_TEMP_PREFIXES = (".tmp-", ".old-")


@dataclass(frozen=True)
class StageOut:
    key: str
    path: str
    digest: str
    manifest: dict


def task_of(key: str, kind: str) -> str | None:
    """The task of a per-task stage (key .../<PER_TASK[kind]>/<task>), else None."""
    parts = key.split("/")
    segment = PER_TASK.get(kind)
    return parts[-1] if segment is not None and len(parts) >= 2 and parts[-2] == segment else None


class MissingStageError(ValueError):
    """A ``--stage`` command needs an input stage (of an earlier kind) that is not finished."""

    def __init__(self, key: str, kind: str, needed_by: str, config: str = "CONFIG"):
        self.key, self.kind, self.needed_by, self.config = key, kind, needed_by, config
        task = f" --task {task_of(key, kind)}" if task_of(key, kind) is not None else ""
        super().__init__(f"--stage {needed_by} needs stage {key}, which is not finished: run "
                         f"`cpift run {config} --stage {kind}{task}` first")

    def __reduce__(self):  # pickled by its fields (rank 0's error raised on every rank)
        return MissingStageError, (self.key, self.kind, self.needed_by, self.config)

    def for_config(self, config: str) -> MissingStageError:
        """The same error with the command naming `config`."""
        return MissingStageError(self.key, self.kind, self.needed_by, config)


class NotSelected(Exception):
    """A ``--stage`` Run was asked for an unfinished stage that is not its work (a later kind, or
    another task's piece): the caller skips what needs it (driver: one pipeline branch)."""


def digest_dir(path: str) -> str:
    """sha256 over (relative path, content) of every file except the manifest, in sorted order;
    safetensors files (checkpoints, masks) by tensor content and sorted metadata."""
    h = hashlib.sha256()
    for rel, full in _files(path):
        h.update(rel.encode() + b"\0")
        if full.endswith((".safetensors", ".mask")):
            _hash_safetensors(full, h)
            continue
        with open(full, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _files(path: str) -> Iterator[tuple[str, str]]:
    """(relative path, full path) of every file of a stage directory but the manifest, sorted."""
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel != MANIFEST:
                yield rel, full


def _hash_safetensors(path: str, h) -> None:
    """Hash a safetensors file by content: sorted metadata, then each tensor's name, dtype, shape and
    bytes. (The writer orders metadata keys differently from one process to the next, so the raw
    bytes of two identical files may differ.)"""
    from ..io import SafetensorsFile

    with SafetensorsFile(path) as f:
        h.update(json.dumps(sorted(f.metadata.items())).encode())
        for key in sorted(f.names):
            t = f.read(key).contiguous()
            h.update(f"{key}|{t.dtype}|{list(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            del t


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_files(path: str) -> dict[str, dict]:
    """Size and sha256 of every file of a stage directory (each fsynced on the way), and the
    directories' entries fsynced: what the manifest records and a skip verifies."""
    out = {}
    for rel, full in _files(path):
        fd = os.open(full, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        out[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    for root, _, _ in os.walk(path):
        _fsync_dir(root)
    return out


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_stage(path: str, manifest: dict, full: bool = False) -> str | None:
    """None if the stage directory holds exactly the files its manifest records (sizes; with
    `full` also sha256), else a sentence naming the first bad file."""
    files = manifest.get("files")
    if not isinstance(files, dict):  # a manifest from before file records: check the content digest
        try:
            return None if digest_dir(path) == manifest.get("digest") else \
                f"the content of {path} does not match its manifest digest"
        except (OSError, ValueError) as exc:
            return str(exc)
    present = dict(_files(path))
    for rel in sorted(set(files) | set(present)):
        full_path = os.path.join(path, rel)
        if rel not in present:
            return f"{full_path} is missing"
        if rel not in files:
            return f"{full_path} is not one of the files the stage wrote"
        size = os.path.getsize(full_path)
        if size != files[rel].get("size"):
            return f"{full_path} has {size} bytes, the manifest records {files[rel].get('size')}"
        if full and _sha256(full_path) != files[rel].get("sha256"):
            return f"{full_path} does not match the sha256 in the manifest"
    return None


def seed_everything(seed: int, key: str) -> int:
    """Seed python, numpy and torch from (seed, stage key); return the derived seed."""
    derived = int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:4], "little") & 0x7FFFFFFF
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    return derived


def _stage_of_temp(name: str) -> str | None:
    """'.tmp-shift-123' -> 'shift' (the stage directory a temp belongs to); None if not a temp."""
    if not name.startswith(_TEMP_PREFIXES):
        return None
    base, sep, pid = name[len(".tmp-"):].rpartition("-")
    return base if sep and base else None


class Run:
    """The stage cache of one run directory (see the module doc: locking, verification)."""

    def __init__(self, root: str, from_kind: str | None = None, progress: bool = True, verify: str = "fast",
                 only: str | None = None, task: str | None = None, dist: Dist = SINGLE):
        """`only`: compute only stages of this kind (`task`: only this task's piece of a per-task
        kind); see the module doc. Cannot be combined with `from_kind`. `dist`: this process's
        place in a multi-process launch (only rank 0 writes in `root`)."""
        if from_kind is not None and from_kind not in KINDS:
            raise ValueError(f"--from {from_kind!r}: unknown stage (valid: {', '.join(KINDS)})")
        if verify not in VERIFY:
            raise ValueError(f"--verify {verify!r}: must be one of {', '.join(VERIFY)}")
        if only is not None and only not in KINDS:
            raise ValueError(f"--stage {only!r}: unknown stage (valid: {', '.join(KINDS)})")
        if task is not None and only not in PER_TASK:
            raise ValueError(f"--task needs --stage {' or '.join(PER_TASK)} (the per-task stages), got --stage {only}")
        if only is not None and from_kind is not None:
            raise ValueError("--stage and --from cannot be combined")
        self.only, self.task = only, task
        self.root = os.path.abspath(root)
        self.forced = set(KINDS[KINDS.index(from_kind):]) if from_kind else set()
        self.dist = dist
        self.progress = progress and dist.is_main
        self.verify = verify
        self.done: dict[str, StageOut] = {}
        self.log: list[tuple[str, str, float]] = []  # (key, "ran"|"cached", seconds)
        self.selected_done: list[str] = []  # keys of the finished stages this Run selects (see `only`)
        self.warnings: list[str] = []  # rank 0's (the rank that checks stages)
        if dist.is_main:
            os.makedirs(os.path.join(self.root, LOCKS), exist_ok=True)
            self._clean_temps()

    # ----- locks and temps --------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str, wait: bool = True) -> Iterator[bool]:
        """Hold the exclusive lock of `key` (a stage key, or a name like "report") for the block.
        With wait=False, yields False at once instead of waiting when another process holds it."""
        path = os.path.join(self.root, LOCKS, quote(key, safe="") + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not wait:
                    yield False
                    return
                if self.progress:
                    print(f"  … {key}: another process holds it, waiting", flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
        finally:
            os.close(fd)  # releases the lock

    def _clean_temps(self) -> None:
        """Remove half-written stages of dead processes: a temp is removed only while its stage's
        lock is held here (a live owner holds it, so its temps are never touched)."""
        for root, dirs, _ in os.walk(self.root):
            if root == self.root and LOCKS in dirs:
                dirs.remove(LOCKS)
            for d in list(dirs):
                base = _stage_of_temp(d)
                if base is None:
                    continue
                dirs.remove(d)
                key = os.path.relpath(os.path.join(root, base), self.root).replace(os.sep, "/")
                with self.lock(key, wait=False) as held:
                    if held:
                        shutil.rmtree(os.path.join(root, d), ignore_errors=True)

    def _clean_stage_temps(self, final: str) -> None:
        """With the stage's lock held: remove its temps (their owners are dead)."""
        parent, base = os.path.split(final)
        for d in os.listdir(parent):
            if _stage_of_temp(d) == base:
                shutil.rmtree(os.path.join(parent, d), ignore_errors=True)

    def path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def selected(self, key: str, kind: str) -> bool:
        """Whether this Run computes stage `key` of `kind` (every stage unless made with `only`)."""
        if self.only is None:
            return True
        return kind == self.only and (self.task is None or task_of(key, kind) == self.task)

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"cpift: warning: {message}", file=sys.stderr, flush=True)

    def _reusable(self, key: str, final: str, config_hash: str, inputs: dict) -> dict | None:
        """The manifest of a finished stage with these settings and inputs whose files check out."""
        manifest_path = os.path.join(final, MANIFEST)
        if not os.path.exists(manifest_path):
            return None
        try:
            with open(manifest_path) as f:
                old = json.load(f)
            if not isinstance(old, dict) or "digest" not in old:
                raise ValueError("not a stage manifest")
        except (OSError, ValueError) as exc:
            self._warn(f"stage {key}: {manifest_path} is unreadable ({exc}); re-running the stage")
            return None
        if old.get("config_hash") != config_hash or old.get("inputs") != inputs:
            return None
        problem = verify_stage(final, old, full=self.verify == "full")
        if problem is not None:
            self._warn(f"stage {key}: {problem}; re-running the stage")
            return None
        return old

    # ----- stages -----------------------------------------------------------------------------

    def stage(self, key: str, kind: str, params: dict, deps: list[StageOut],
              fn: Callable[[str], dict | None], seed: int = 0, collective: bool = False) -> StageOut:
        """Return the finished stage `key`, computing it with fn(tmp_dir) unless a valid one exists.

        `params`: every setting the stage uses (hashed into the manifest); `deps`: input stages.
        fn writes its outputs into the directory it is given and may return extra manifest info.
        `collective`: in a multi-process launch, fn runs on every rank (a training stage; only rank 0
        may write into the directory, and rank 0's return value is recorded), else on rank 0 alone.
        """
        if kind not in KINDS:
            raise ValueError(f"stage {key}: unknown kind {kind!r}")
        if key in self.done:
            return self.done[key]
        out = self._stage(key, kind, params, deps, fn, seed, collective)
        if self.selected(key, kind):
            self.selected_done.append(key)
        return out

    def _stage(self, key, kind, params, deps, fn, seed, collective) -> StageOut:
        config_hash = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
        inputs = {d.key: d.digest for d in deps}
        final = self.path(key)
        with contextlib.ExitStack() as held:  # rank 0: the stage's lock, until the stage is published
            old = self.dist.on_main(lambda: self._decide(key, kind, config_hash, inputs, final, held))
            if old is None:
                out = self._compute(key, kind, params, config_hash, inputs, final, fn, seed, collective)
            else:
                out = StageOut(key, final, old["digest"], old)
                self.log.append((key, "cached", 0.0))
                if self.progress:
                    print(f"  ✓ {key} (done earlier, skipped)", flush=True)
        self.done[key] = out
        return out

    def _decide(self, key, kind, config_hash, inputs, final, held: contextlib.ExitStack) -> dict | None:
        """Take the stage's lock (kept in `held`) and return the manifest of a reusable finished
        stage, or None when the stage is to be computed now; raise NotSelected / MissingStageError
        when it is not this Run's work."""
        os.makedirs(os.path.dirname(final), exist_ok=True)
        selected = self.selected(key, kind)
        upstream = not selected and KINDS.index(kind) < KINDS.index(self.only)
        if not held.enter_context(self.lock(key, wait=selected or upstream)):
            raise NotSelected(key)  # someone else's work, in progress
        self._clean_stage_temps(final)
        old = None if kind in self.forced else self._reusable(key, final, config_hash, inputs)
        if old is None and upstream:
            raise MissingStageError(key, kind, self.only)
        if old is None and not selected:
            raise NotSelected(key)
        return old

    def _compute(self, key, kind, params, config_hash, inputs, final, fn, seed, collective) -> StageOut:
        """Run fn in a temp directory and publish it at `final` (rank 0 holds the stage's lock):
        on every rank when `collective`, else on rank 0 alone; the manifest reaches every rank."""
        parent, base = os.path.split(final)
        tmp = self.dist.broadcast(os.path.join(parent, f".tmp-{base}-{os.getpid()}"))  # rank 0's

        def prepare():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            if self.progress:
                print(f"▶ {key}", flush=True)
            return time.perf_counter()

        def run_fn():
            seed_everything(seed, key)
            return fn(tmp) or {}

        def publish(info, t0):
            return self._publish(key, kind, params, config_hash, inputs, final, tmp, info, time.perf_counter() - t0)

        try:
            t0 = self.dist.on_main(prepare)
            if collective:
                info = self.dist.together(run_fn)  # rank 0's info is the one recorded
                manifest = self.dist.on_main(lambda: publish(info, t0))
            else:
                manifest = self.dist.on_main(lambda: publish(run_fn(), t0))
        except BaseException:
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        out = StageOut(key, final, manifest["digest"], manifest)
        self.log.append((key, "ran", manifest["seconds"]))
        if self.progress:
            print(f"  ✓ {key} ({manifest['seconds']:.1f} s)", flush=True)
        return out

    def _publish(self, key, kind, params, config_hash, inputs, final, tmp, info, seconds) -> dict:
        """Write the manifest of the finished temp directory `tmp` and rename it to `final`."""
        parent, base = os.path.split(final)
        manifest = {"stage": key, "kind": kind, "config_hash": config_hash, "params": params,
                    "inputs": inputs, "digest": digest_dir(tmp), "files": _record_files(tmp),
                    "seconds": round(seconds, 3), "info": info}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):
            old_dir = os.path.join(parent, f".old-{base}-{os.getpid()}")
            shutil.rmtree(old_dir, ignore_errors=True)
            os.rename(final, old_dir)
            os.rename(tmp, final)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(parent)
        return manifest
