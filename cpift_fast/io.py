"""Checkpoint streaming: read named tensors one at a time, write sharded safetensors atomically.

Contract
--------
Reading — ``open_tensors(src) -> TensorSource`` accepts

- an ``nn.Module``: its ``named_parameters()`` (``remove_duplicate=True``: a tied/shared weight
  appears once, under the first name it is registered with — the same list an optimizer sees),
- a mapping ``{name: tensor}`` (insertion order) or a list of ``(name, tensor)`` pairs,
- a ``.safetensors`` file,
- a checkpoint directory: ``model.safetensors.index.json`` + the shards it names (as transformers
  writes), else ``model.safetensors``, else every ``*.safetensors`` in it (a name in two files is
  an error),
- an existing ``TensorSource`` (returned as is).

``names`` is a deterministic order: for modules, mappings and pairs the order given; for files and
directories the *natural* order of the names (digit runs compare as numbers, so ``layers.2``
precedes ``layers.10``), which does not depend on how tensors were spread over shards.
``shape(name)``, ``dtype(name)`` and ``numel(name)`` read only the headers. ``get(name)`` returns one
tensor (for files: a private copy-on-write map of that tensor's bytes alone, or a ``pread`` copy
for small or misaligned ones; a dropped tensor's pages leave the process at once, so a streamed
pass over any checkpoint size stays at the tensors it holds);
iterating yields ``(name, tensor)`` pairs in ``names`` order, so a consumer that drops each tensor
before the next holds one at a time. Tensors from modules are returned detached (no copy).
``prefetch(name)`` is ``get`` that also starts the reads of a mapped tensor's bytes
(``POSIX_FADV_WILLNEED``: the kernel reads them into the page cache in the background), so that a
reader thread running ahead of the kernels (cpift_fast.readahead) has the disk busy with the next
tensors while the current ones are processed; for small (``pread``) and in-memory tensors it is
``get``.
Every header is checked when the source opens (``CheckpointError`` naming the file, and the
tensor where one is at fault: truncated files, bad JSON, offsets that do not cover the data, a
broken shard index).

Writing — ``ShardedWriter(path, max_shard_size=...)`` is a context manager; ``add(name, tensor)``
writes the tensor's bytes to the current shard at once (nothing is buffered), and on a clean exit
the shards are renamed ``model-0000i-of-0000N.safetensors``, ``model.safetensors.index.json`` (the
transformers format, ``metadata.total_size`` in bytes) is written, and the temporary directory is
renamed into place (atomic: readers see the old directory or the complete new one; on an error the
temporary directory is removed; the files are fsynced before the rename, and the directory gets
the mode ``mkdir`` would give under the process umask). Every shard header carries ``{"format": "pt"}`` plus the
``metadata`` given. A shard is closed before a tensor that would push it past ``max_shard_size``
(a single bigger tensor gets a shard of its own). Each shard's header is written into space
reserved at its start and padded with spaces (allowed by the safetensors format); a header that
outgrows the reservation is handled by rewriting that one shard through a stream copy.
``save_sharded(tensors, path)`` wraps it for anything ``open_tensors`` accepts.

Writing from several processes — ``GroupShardedWriter(path, tensors, group=...)``: the ranks of a
process group write one checkpoint together, each its own tensors, into the very bytes
``ShardedWriter`` would write (``plan_shards`` fixes every shard's header and offsets up front).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


def natural_key(name: str) -> tuple:
    """Sort key: digit runs compare as integers (``layers.2`` < ``layers.10``)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


class TensorSource:
    """Named tensors with headers known up front and data fetched one tensor at a time."""

    def __init__(self, names, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype],
                 fetch, description: str, close=None, prefetch=None):
        self.names: tuple[str, ...] = tuple(names)
        self._shapes = dict(shapes)
        self._dtypes = dict(dtypes)
        self._fetch = fetch
        self._prefetch = prefetch or fetch
        self._close = close
        self.description = description

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._check(name)]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[self._check(name)]

    def numel(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n

    def nbytes(self, name: str) -> int:
        return self.numel(name) * _itemsize(self.dtype(name))

    def get(self, name: str) -> torch.Tensor:
        return self._fetch(self._check(name))

    def prefetch(self, name: str) -> torch.Tensor:
        """`get`, with the reads of a mapped tensor's bytes started in the background (see the module doc)."""
        return self._prefetch(self._check(name))

    def _check(self, name: str) -> str:
        if name not in self._shapes:
            raise KeyError(f"{self.description} has no tensor named {name!r} "
                           f"({len(self.names)} tensors, e.g. {list(self.names[:3])})")
        return name

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self._fetch(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self)

    @property
    def is_streamed(self) -> bool:
        """True when tensors are read from files (not held in memory by the caller)."""
        return self._close is not None

    def close(self) -> None:
        if self._close is not None:
            self._close()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorSource({self.description}, {len(self.names)} tensors)"


def _in_memory(pairs: list[tuple[str, torch.Tensor]], description: str) -> TensorSource:
    table: dict[str, torch.Tensor] = {}
    for name, t in pairs:
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"{description}: expected (str, Tensor) items, got ({type(name).__name__}, "
                            f"{type(t).__name__})")
        if name in table:
            raise ValueError(f"{description}: tensor name {name!r} appears twice")
        table[name] = t.detach()
    return TensorSource(table.keys(), {n: tuple(t.shape) for n, t in table.items()},
                        {n: t.dtype for n, t in table.items()}, table.__getitem__, description)


class CheckpointError(ValueError):
    """A checkpoint file or index is unreadable or malformed; the message names the file (and tensor)."""


_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_MAP_MIN = 1 << 16  # tensors at least this big are mapped, smaller ones read


class SafetensorsFile:
    """One ``.safetensors`` file: the header parsed and checked up front, tensors read on demand.

    A tensor of 64 KiB or more at an aligned offset is a private (copy-on-write) map of its own
    pages, unmapped when the tensor is freed; others are ``pread`` into a fresh tensor. Nothing
    stays mapped between reads (a whole-file map, as safetensors keeps, holds every page ever
    touched resident until the file is closed), so the resident memory of a streamed pass is the
    tensors alive at once, whatever the checkpoint size. A file truncated *while* a tensor of it is
    mapped raises SIGBUS on access, as with any memory map.

    Every check the safetensors library makes is made here, with the file (and tensor) named:
    header length, JSON, dtypes, shapes, offsets, and that the tensors exactly cover the data.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise CheckpointError(f"cannot open checkpoint file {path}: {exc.strerror or exc}") from None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _bad(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def _parse(self) -> None:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise self._bad(f"not a safetensors file ({size} bytes; the 8-byte header length is missing)")
        (n,) = struct.unpack("<Q", self._pread(8, 0))
        if n > min(size - 8, _MAX_HEADER):
            raise self._bad(f"invalid header length {n} (the file has {size} bytes): truncated or not a "
                            f"safetensors file")
        try:
            header = json.loads(self._pread(n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._bad(f"the safetensors header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._bad("the safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._bad("the safetensors __metadata__ is not a string-to-string object")
        self.metadata: dict[str, str] = meta
        self._start = 8 + n
        data_size = size - self._start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for name, e in header.items():
            if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
                raise self._bad(f"tensor {name!r}: header entry lacks dtype/shape/data_offsets")
            if e["dtype"] not in _ST_TO_TORCH:
                raise self._bad(f"tensor {name!r} has unsupported dtype {e['dtype']!r}")
            shape, offs = e["shape"], e["data_offsets"]
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise self._bad(f"tensor {name!r}: invalid shape {shape!r}")
            if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                    and 0 <= offs[0] <= offs[1]):
                raise self._bad(f"tensor {name!r}: invalid data_offsets {offs!r}")
            dtype = _ST_TO_TORCH[e["dtype"]]
            numel = 1
            for d in shape:
                numel *= d
            if offs[1] - offs[0] != numel * _itemsize(dtype):
                raise self._bad(f"tensor {name!r}: {offs[1] - offs[0]} data bytes for {e['dtype']} of shape "
                                f"{shape} (needs {numel * _itemsize(dtype)})")
            if offs[1] > data_size:
                raise self._bad(f"tensor {name!r} lies past the end of the file (needs {self._start + offs[1]} "
                                f"bytes, the file has {size}): the file is truncated")
            self.entries[name] = (dtype, tuple(shape), offs[0], offs[1])
            spans.append((offs[0], offs[1], name))
        end = 0
        for a, b, name in sorted(spans):
            if a != end:
                raise self._bad(f"data bytes {min(a, end)}..{max(a, end)} are {'not covered' if a > end else 'shared'} "
                                f"(at tensor {name!r}): the file is corrupt")
            end = b
        if end != data_size:
            raise self._bad(f"{data_size - end} bytes after the last tensor: the file is corrupt (incomplete "
                            f"metadata, file not fully covered)")

    def _pread(self, n: int, offset: int) -> bytes:
        data = os.pread(self._fd, n, offset)
        if len(data) != n:
            raise self._bad(f"unexpected end of file at byte {offset + len(data)} (the file changed while read)")
        return data

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str, willneed: bool = False) -> torch.Tensor:
        """A fresh tensor holding `name`'s bytes; with `willneed`, the kernel is asked to read a mapped
        tensor's bytes into the page cache now, in the background (POSIX_FADV_WILLNEED)."""
        dtype, shape, a, b = self.entries[name]
        t = torch.empty(shape, dtype=dtype)
        if b == a:
            return t
        if self._fd is None:
            raise self._bad(f"tensor {name!r} read after the file was closed")
        at = self._start + a
        if at % t.element_size() == 0 and b - a >= _MAP_MIN:
            # a private map of just this tensor's pages: no copy, and unmapped when the tensor dies
            page = at - at % mmap.ALLOCATIONGRANULARITY
            try:
                mapped = mmap.mmap(self._fd, at + (b - a) - page, offset=page, access=mmap.ACCESS_COPY)
            except OSError as exc:
                raise self._bad(f"cannot map tensor {name!r}: {exc.strerror or exc}") from None
            except ValueError:  # mmap: "length is greater than file size"
                raise self._bad(_SHRANK.format(name=name)) from None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # frombuffer: the map is writable (copy on write)
                raw = torch.frombuffer(mapped, dtype=torch.uint8, count=b - a, offset=at - page)
            if willneed:
                try:
                    os.posix_fadvise(self._fd, at, b - a, os.POSIX_FADV_WILLNEED)
                except (AttributeError, OSError):
                    pass  # only a hint
            return raw.view(dtype).view(shape)
        view = memoryview(t.view(-1).view(torch.uint8).numpy())
        pos, total = 0, b - a
        try:
            while pos < total:
                got = os.preadv(self._fd, [view[pos:]], self._start + a + pos)
                if got == 0:
                    raise self._bad(f"tensor {name!r}: unexpected end of file (the file shrank while read)")
                pos += got
        except OSError as exc:
            raise self._bad(f"cannot read tensor {name!r}: {exc.strerror or exc}") from None
        return t

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_SHRANK = "tensor {name!r}: its bytes are no longer in the file (the file shrank after it was opened)"


def _safetensors_files(files: list[str], description: str) -> TensorSource:
    opened: dict[str, SafetensorsFile] = {}
    where: dict[str, str] = {}
    try:
        for path in files:
            f = opened[path] = SafetensorsFile(path)
            for name in f.names:
                if name in where:
                    raise CheckpointError(f"{description}: tensor {name!r} is in both {where[name]} and {path}")
                where[name] = path
    except BaseException:
        for f in opened.values():
            f.close()
        raise
    names = sorted(where, key=natural_key)
    shapes = {n: opened[where[n]].entries[n][1] for n in names}
    dtypes = {n: opened[where[n]].entries[n][0] for n in names}

    def close():
        for f in opened.values():
            f.close()

    return TensorSource(names, shapes, dtypes, lambda name: opened[where[name]].read(name), description, close=close,
                        prefetch=lambda name: opened[where[name]].read(name, willneed=True))


def _directory(path: str) -> TensorSource:
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as exc:
            raise CheckpointError(f"cannot read shard index {index}: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"shard index {index} is not valid JSON ({exc})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"shard index {index} has no 'weight_map' object")
        bad = [f for f in weight_map.values() if not isinstance(f, str) or not f or os.path.basename(f) != f
               or f in (".", "..")]
        if bad:
            raise CheckpointError(f"shard index {index} names {bad[0]!r}, which is not a file name in {path}")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{index} names shard {missing[0]!r}, which is not in {path}")
        source = _safetensors_files([os.path.join(path, f) for f in files], f"checkpoint {path}")
        extra = set(source.names) - set(weight_map)
        if extra or len(source.names) != len(weight_map):
            absent = sorted(set(weight_map) - set(source.names), key=natural_key)
            detail = f"{sorted(extra)[0]!r} is in a shard but not in the index" if extra else \
                f"{absent[0]!r} is in the index but in no shard"
            source.close()
            raise CheckpointError(f"{index} does not match its shards: {detail}")
        return source
    single = os.path.join(path, SINGLE_NAME)
    if os.path.isfile(single):
        return _safetensors_files([single], f"checkpoint {path}")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no {INDEX_NAME}, no {SINGLE_NAME} and no *.safetensors file")
    return _safetensors_files([os.path.join(path, f) for f in files], f"checkpoint {path}")


def open_tensors(src: Any, description: str | None = None) -> TensorSource:
    """A TensorSource over a module, a mapping, (name, tensor) pairs, a safetensors file or directory."""
    if isinstance(src, TensorSource):
        return src
    if isinstance(src, torch.nn.Module):
        return _in_memory(list(src.named_parameters()), description or f"module {type(src).__name__}")
    if isinstance(src, Mapping):
        return _in_memory(list(src.items()), description or "tensor dict")
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if os.path.isdir(path):
            return _directory(path)
        if os.path.isfile(path):
            return _safetensors_files([path], f"file {path}")
        raise FileNotFoundError(f"no such checkpoint file or directory: {path}")
    if isinstance(src, (list, tuple)):
        return _in_memory(list(src), description or "tensor list")
    raise TypeError(f"cannot read tensors from a {type(src).__name__}: pass an nn.Module, a dict of tensors, "
                    f"(name, tensor) pairs, a .safetensors file or a checkpoint directory")


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

_HEADER_RESERVE = 256 * 1024


def process_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give `path` the mode ``open``/``mkdir`` would have (0666/0777 less the umask); for files and
    directories made by ``tempfile``, which creates them 0600/0700."""
    os.chmod(path, (0o777 if directory else 0o666) & ~process_umask())


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's entries') data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB'."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use bytes or e.g. '5GB', '500MB', '2GiB'")
    base = 1024 if m.group(3) else 1000
    exp = " KMGT".index(m.group(2).upper() or " ")
    return parse_size(int(float(m.group(1)) * base**exp))


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _header_block(entries: Mapping[str, dict], metadata: Mapping[str, str]) -> bytes:
    """The bytes before a shard's data: the 8-byte length and the JSON header, padded with spaces to
    fill the reserved _HEADER_RESERVE bytes, or (a header too big for them) to a multiple of 8."""
    header = json.dumps({"__metadata__": dict(metadata), **entries}, separators=(",", ":")).encode()
    room = _HEADER_RESERVE - 8
    if len(header) <= room:
        return struct.pack("<Q", room) + header + b" " * (room - len(header))
    header += b" " * ((-len(header)) % 8)
    return struct.pack("<Q", len(header)) + header


def plan_shards(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_size: int | str) -> list[dict]:
    """The shards ``ShardedWriter`` makes when given `tensors` (name, dtype, shape) in this order:
    one {name: safetensors header entry} per shard (a shard is closed before a tensor that would push
    it past max_shard_size; a bigger tensor gets a shard of its own; no tensor: one empty shard)."""
    limit = parse_size(max_shard_size)
    shards: list[dict] = []
    size = 0
    for name, dtype, shape in tensors:
        if dtype not in _TORCH_TO_ST:
            raise TypeError(f"ShardedWriter: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * _itemsize(dtype)
        if not shards or (size and size + nbytes > limit):
            shards.append({})
            size = 0
        shards[-1][name] = {"dtype": _TORCH_TO_ST[dtype], "shape": [int(d) for d in shape],
                            "data_offsets": [size, size + nbytes]}
        size += nbytes
    return shards or [{}]


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_index(directory: str, weight_map: dict[str, str], total: int) -> None:
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total},
                   "weight_map": dict(sorted(weight_map.items(), key=lambda kv: natural_key(kv[0])))}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _move_into_place(tmp: str, path: str) -> None:
    """Rename the finished directory `tmp` to `path` (replacing an old one) and fsync the parent."""
    fsync_path(tmp)
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(path)}-", dir=os.path.dirname(path))
        os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    fsync_path(os.path.dirname(path))


class _Shard:
    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "wb")
        self.file.write(b"\0" * _HEADER_RESERVE)
        self.entries: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        data = _tensor_bytes(t)
        self.file.write(data)
        self.entries[name] = {"dtype": _TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.size, self.size + data.nbytes]}
        self.size += data.nbytes

    def finish(self, metadata: dict[str, str]) -> None:
        block = _header_block(self.entries, metadata)
        if len(block) == _HEADER_RESERVE:
            self.file.seek(0)
            self.file.write(block)
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            return
        # The header outgrew the reservation: rewrite this shard with a header of the right size.
        self.file.close()
        tmp = self.path + ".rewrite"
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(block)
            src.seek(_HEADER_RESERVE)
            shutil.copyfileobj(src, dst, 16 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)


class ShardedWriter:
    """Write tensors one at a time into sharded safetensors + index; atomic on a clean exit.

    >>> with ShardedWriter("out/ckpt", max_shard_size="5GB") as w:
    ...     for name, t in tensors:
    ...         w.add(name, t)
    """

    def __init__(self, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                 metadata: Mapping[str, str] | None = None, overwrite: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        self.overwrite = overwrite
        self._tmp: str | None = None
        self._shards: list[_Shard] = []
        self._names: set[str] = set()

    def __enter__(self) -> ShardedWriter:
        if os.path.exists(self.path) and not self.overwrite:
            raise FileExistsError(f"{self.path} exists; pass overwrite=True to replace it")
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self._tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(self.path)}-", dir=parent)
        honour_umask(self._tmp, directory=True)
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._tmp is None:
            raise RuntimeError("ShardedWriter.add outside its `with` block")
        if name in self._names:
            raise ValueError(f"ShardedWriter: tensor {name!r} added twice")
        if tensor.dtype not in _TORCH_TO_ST:
            raise TypeError(f"ShardedWriter: tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        if not self._shards or (self._shards[-1].size and self._shards[-1].size + nbytes > self.max_shard_size):
            if self._shards:
                self._shards[-1].finish(self.metadata)
            self._shards.append(_Shard(os.path.join(self._tmp, f"shard-{len(self._shards)}.part")))
        self._shards[-1].add(name, tensor)
        self._names.add(name)

    def _finish(self) -> None:
        if not self._shards:
            self._shards.append(_Shard(os.path.join(self._tmp, "shard-0.part")))
        self._shards[-1].finish(self.metadata)
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(self._shards):
            final = _shard_name(i, n)
            os.rename(shard.path, os.path.join(self._tmp, final))
            weight_map.update({name: final for name in shard.entries})
        _write_index(self._tmp, weight_map, sum(s.size for s in self._shards))
        _move_into_place(self._tmp, self.path)
        self._tmp = None

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            for shard in self._shards:
                if not shard.file.closed:
                    shard.file.close()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None


class GroupShardedWriter:
    """The sharded checkpoint ``ShardedWriter`` would write, written by the ranks of a process group
    together: each rank adds the tensors it owns, in any order; the output directory is byte for
    byte the one ``ShardedWriter`` makes when given every tensor in `tensors` order.

    `tensors`: (name, dtype, shape) of every tensor of the checkpoint, in order, the same on every
    rank. The layout is known up front (``plan_shards``), so rank 0 creates the shard files in a
    temporary directory next to `path` with their final headers and sizes, and each rank writes its
    tensors' bytes at their offsets (``pwrite``; nothing is buffered). The directory must be on a
    file system every rank can write (a shared one across nodes). On exit (collective) every rank
    fsyncs and closes what it wrote; if every rank succeeded and every tensor was added exactly
    once, rank 0 writes the index and renames the directory into place (atomic, as ShardedWriter);
    otherwise rank 0 removes the temporary directory and every rank raises (its own error, or one
    naming the failed rank / the tensor no rank or two ranks added). Every method but ``add`` is
    collective. ``group=None``: one process, a planned ShardedWriter.
    """

    def __init__(self, path: str | os.PathLike, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_size: int | str = "5GB", metadata: Mapping[str, str] | None = None,
                 overwrite: bool = False, group=None):
        from .shard import group_rank_world

        self.path = os.path.abspath(os.fspath(path))
        self.metadata = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        self.overwrite, self.group = overwrite, group
        self.rank, self.world = group_rank_world(group)
        self.shards = plan_shards(list(tensors), max_shard_size)
        self._where = {name: (i, entry) for i, shard in enumerate(self.shards) for name, entry in shard.items()}
        self._starts = [len(_header_block(shard, self.metadata)) for shard in self.shards]
        self._fds: dict[int, int] = {}
        self._added: list[str] = []
        self._added_set: set[str] = set()
        self._tmp: str | None = None

    def _file(self, i: int) -> str:
        return os.path.join(self._tmp, _shard_name(i, len(self.shards)))

    def _create(self) -> str:
        if os.path.exists(self.path) and not self.overwrite:
            raise FileExistsError(f"{self.path} exists; pass overwrite=True to replace it")
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(self.path)}-", dir=parent)
        try:
            honour_umask(tmp, directory=True)
            for i, shard in enumerate(self.shards):
                size = max((e["data_offsets"][1] for e in shard.values()), default=0)
                with open(os.path.join(tmp, _shard_name(i, len(self.shards))), "wb") as f:
                    f.write(_header_block(shard, self.metadata))
                    f.truncate(self._starts[i] + size)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def __enter__(self) -> GroupShardedWriter:
        from .shard import on_rank0

        self._tmp = on_rank0(self.group, self._create)
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write `name`'s bytes into its shard (this rank's tensors only; not collective)."""
        if self._tmp is None:
            raise RuntimeError("GroupShardedWriter.add outside its `with` block")
        if name not in self._where:
            raise ValueError(f"GroupShardedWriter: tensor {name!r} is not one of the planned tensors of {self.path}")
        if name in self._added_set:
            raise ValueError(f"GroupShardedWriter: tensor {name!r} added twice")
        i, entry = self._where[name]
        if _TORCH_TO_ST.get(tensor.dtype) != entry["dtype"] or list(tensor.shape) != entry["shape"]:
            raise ValueError(f"GroupShardedWriter: tensor {name!r} is {tensor.dtype} of shape {list(tensor.shape)}; "
                             f"the plan has {entry['dtype']} of shape {entry['shape']}")
        if i not in self._fds:
            self._fds[i] = os.open(self._file(i), os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        data = _tensor_bytes(tensor)
        at, done = self._starts[i] + entry["data_offsets"][0], 0
        while done < data.nbytes:
            done += os.pwrite(self._fds[i], data[done:], at + done)
        self._added.append(name)
        self._added_set.add(name)

    def _close_files(self, sync: bool) -> None:
        fds, self._fds = self._fds, {}
        try:
            for fd in fds.values():
                if sync:
                    os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _publish(self) -> None:
        weight_map = {name: _shard_name(i, len(self.shards)) for name, (i, _) in self._where.items()}
        total = sum(max((e["data_offsets"][1] for e in shard.values()), default=0) for shard in self.shards)
        for i in range(len(self.shards)):
            fsync_path(self._file(i))
        _write_index(self._tmp, weight_map, total)
        _move_into_place(self._tmp, self.path)

    def __exit__(self, exc_type, exc, tb) -> None:
        from .shard import on_rank0

        if self._tmp is None:  # __enter__ failed (on every rank: its outcome was broadcast): nothing to undo
            return
        failure = None
        try:
            self._close_files(sync=exc_type is None)
        except OSError as err:
            failure = err
        status = None if exc_type is None and failure is None else f"{type(exc or failure).__name__}: {exc or failure}"
        reports = [(status, self._added)]
        if self.group is not None:
            import torch.distributed as dist

            reports = [None] * self.world
            dist.all_gather_object(reports, (status, self._added), group=self.group)
        problem = next((f"rank {r} failed ({st})" for r, (st, _) in enumerate(reports) if st is not None), None)
        if problem is None:
            by = {}
            for r, (_, added) in enumerate(reports):
                for name in added:
                    if name in by:
                        problem = f"tensor {name!r} was added by rank {by[name]} and rank {r}"
                    by[name] = r
            missing = next((n for n in self._where if n not in by), None)
            if problem is None and missing is not None:
                problem = f"tensor {missing!r} was added by no rank"
        tmp = self._tmp

        def finish():
            if problem is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return None
            self._publish()
            return None

        try:
            on_rank0(self.group, finish)
        finally:
            self._tmp = None
        if exc_type is None and failure is not None:
            raise failure
        if exc_type is None and problem is not None:
            raise RuntimeError(f"GroupShardedWriter {self.path}: {problem}; nothing was written")


def save_sharded(tensors: Any, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                 metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> None:
    """Stream anything ``open_tensors`` accepts into a sharded checkpoint directory at ``path``."""
    source = open_tensors(tensors)
    with ShardedWriter(path, max_shard_size, metadata, overwrite) as writer:
        for name, t in source:
            writer.add(name, t)
