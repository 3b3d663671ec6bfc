"""Read-ahead and write-behind: a thread does the I/O of the next (or previous) items while the
caller computes on the current one, within a byte budget.

Read-ahead
----------
``ReadAhead(keys, fetch, nbytes, budget)`` yields ``(key, fetch(key))`` for every key, in the order
of ``keys``. One reader thread calls ``fetch`` for the keys in that order, ahead of the caller,
while the bytes read ahead stay within ``budget``:

- an item's bytes are ``nbytes(key)``, known before it is read (from checkpoint headers); they
  count against the budget from the moment its fetch starts until the caller takes the item;
- the reader starts the next fetch only if it fits in what is left of the budget, or when nothing
  is read ahead (so an item bigger than the whole budget is still read, alone);
- what the caller holds (the item it works on, anything it keeps) is the caller's and does not
  count: peak memory = the caller's working set + ``budget`` (or + one item, if one is larger).

``budget=0`` starts no thread: ``fetch`` runs in the caller's thread when the item is asked for
(the plain loop). A thread helps because the work is done outside the GIL: file reads and
writes, ``posix_fadvise``, page faults and torch's kernels all release it.

Errors: an exception raised by ``fetch(key)`` reaches the caller when it asks for that item (the
items before it are delivered first), as the same exception with a note naming the item
(``describe(key)``, e.g. "tensor 'w' of checkpoint DIR"); the reader stops at the first error.

Stopping: leaving the ``with`` block (normally, by ``break`` or by an exception) or ``close()``
stops the reader: the fetch in progress finishes (a read cannot be interrupted), what was read
ahead is dropped, and the thread has ended when ``close()`` returns. A ReadAhead that is dropped
without being closed is closed when it is garbage-collected (the reader thread holds no
reference to it).

Write-behind
------------
``WriteBehind(write, nbytes, budget)``: ``put(key, value)`` queues an item and returns; one writer
thread calls ``write(key, value)`` for the items in the order they were put. ``put`` waits while
the bytes queued or being written (``nbytes(value)`` each) would exceed ``budget`` with the new
item (an item bigger than the budget waits until nothing is queued, then goes alone). ``finish()``
waits until every item is written and ends the thread; it, and any later ``put``, raise the first
exception of ``write`` (with a note naming the item); after an error nothing more is written.
``close()`` (also on leaving the ``with`` block) ends the thread without writing what is still
queued: the abort path. ``budget=0``: ``put`` writes in the caller's thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from .io import parse_size

DEFAULT_BUDGET = 32 << 20
"""Default budget in bytes (32 MiB): keeps the disk one or more tensor pairs ahead of the kernels
(a bigger item still goes alone, so double-buffering never stops), small next to a model. For
checkpoint files the items fetched ahead are maps whose reads have been started: their pages sit in
the page cache and join the process's memory only when the kernels touch them, so the budget adds
little to the RSS (only fp32 conversions of other dtypes are copies)."""


def check_budget(budget: Any, what: str = "readahead") -> int:
    """A byte budget from an int >= 0 or a size string ('64MB', '1GiB'); raises ValueError naming `what`."""
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise ValueError(f"{what} must be a number of bytes >= 0 or a size like '64MB', got {budget!r}")
    if isinstance(budget, int):
        if budget < 0:
            raise ValueError(f"{what} must be a number of bytes >= 0, got {budget}")
        return budget
    try:
        return parse_size(budget)
    except ValueError:
        raise ValueError(f"{what}: cannot parse size {budget!r}; use bytes or e.g. '64MB', '1GiB'") from None


class _State:
    """What the reader thread and the caller share (the thread never sees the ReadAhead itself)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.ready: deque = deque()  # (key, value, exception, nbytes), in key order
        self.ahead = 0               # bytes of items being read or ready, not yet taken
        self.closed = False


def _reader(state: _State, keys: Sequence, fetch: Callable, nbytes: Callable, budget: int) -> None:
    for key in keys:
        size, value, error = 0, None, None
        try:
            size = nbytes(key)
            with state.cond:
                while not state.closed and state.ahead and state.ahead + size > budget:
                    state.cond.wait()
                if state.closed:
                    return
                state.ahead += size
            value = fetch(key)
        except BaseException as exc:  # handed to the caller, which raises it
            error = exc
        with state.cond:
            if state.closed:
                return
            state.ready.append((key, value, error, size))
            state.cond.notify_all()
        if error is not None:
            return


class ReadAhead:
    """Iterate ``(key, fetch(key))`` in key order, fetched ahead on a reader thread within a byte budget.

    >>> with ReadAhead(names, source.get, lambda n: source.numel(n) * 4, 32 << 20) as items:
    ...     for name, tensor in items:
    ...         work(tensor)
    """

    def __init__(self, keys: Sequence, fetch: Callable[[Any], Any], nbytes: Callable[[Any], int],
                 budget: int = DEFAULT_BUDGET, describe: Callable[[Any], str] = repr):
        self.keys = list(keys)
        self.budget = check_budget(budget)
        self._fetch = fetch
        self._describe = describe
        self._next = 0
        self._state = _State()
        self._thread: threading.Thread | None = None
        if self.budget and self.keys:
            self._thread = threading.Thread(target=_reader, args=(self._state, self.keys, fetch, nbytes, self.budget),
                                            name="cpift-readahead", daemon=True)
            self._thread.start()

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self

    def __next__(self) -> tuple[Any, Any]:
        if self._state.closed or self._next >= len(self.keys):
            raise StopIteration
        key = self.keys[self._next]
        self._next += 1
        if self._thread is None:
            try:
                return key, self._fetch(key)
            except Exception as exc:
                exc.add_note(f"while reading {self._describe(key)}")
                raise
        state = self._state
        with state.cond:
            while not state.ready:
                state.cond.wait()
            _, value, error, size = state.ready.popleft()
            state.ahead -= size
            state.cond.notify_all()
        if error is not None:
            self.close()
            error.add_note(f"while reading {self._describe(key)} ahead on a reader thread")
            raise error
        return key, value

    @property
    def reader_alive(self) -> bool:
        """True while the reader thread runs (for tests and diagnostics)."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stop the reader (after the fetch in progress), drop what it read ahead, join the thread."""
        state = self._state
        with state.cond:
            state.closed = True
            state.ready.clear()
            state.cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_state", None) is not None:
            self.close()


class _Queue:
    """What the writer thread and the caller share (the thread never sees the WriteBehind itself)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.items: deque = deque()  # (key, value, nbytes)
        self.pending = 0              # bytes queued or being written
        self.error: BaseException | None = None
        self.done = False             # no more puts: write what is queued, then end
        self.aborted = False          # end now, drop what is queued


def _writer(queue: _Queue, write: Callable, describe: Callable) -> None:
    while True:
        with queue.cond:
            while not queue.items and not (queue.done or queue.aborted):
                queue.cond.wait()
            if queue.aborted or not queue.items:
                return
            key, value, size = queue.items[0]
        try:
            write(key, value)
        except BaseException as exc:  # handed to the caller, which raises it
            exc.add_note(f"while writing {describe(key)} behind on a writer thread")
            with queue.cond:
                queue.error = exc
                queue.items.clear()
                queue.pending = 0
                queue.cond.notify_all()
            return
        del value
        with queue.cond:
            if queue.aborted:
                return
            queue.items.popleft()
            queue.pending -= size
            queue.cond.notify_all()


class WriteBehind:
    """Write items on a writer thread, in the order put, with at most `budget` bytes queued.

    >>> with WriteBehind(writer.add, lambda t: t.numel() * t.element_size(), 32 << 20) as behind:
    ...     for name in names:
    ...         behind.put(name, compute(name))
    ...     behind.finish()
    """

    def __init__(self, write: Callable[[Any, Any], None], nbytes: Callable[[Any], int], budget: int = DEFAULT_BUDGET,
                 describe: Callable[[Any], str] = repr):
        self.budget = check_budget(budget)
        self._write, self._nbytes, self._describe = write, nbytes, describe
        self._queue = _Queue()
        self._thread: threading.Thread | None = None
        if self.budget:
            self._thread = threading.Thread(target=_writer, args=(self._queue, write, describe),
                                            name="cpift-writebehind", daemon=True)
            self._thread.start()

    def put(self, key: Any, value: Any) -> None:
        """Queue `value` for writing (waits while the budget is full); raises an earlier write's error."""
        queue = self._queue
        if queue.error is not None:
            raise queue.error
        if queue.done or queue.aborted:
            raise RuntimeError("WriteBehind.put after finish() or close()")
        if self._thread is None:
            try:
                self._write(key, value)
            except Exception as exc:
                exc.add_note(f"while writing {self._describe(key)}")
                raise
            return
        size = self._nbytes(value)
        with queue.cond:
            while queue.error is None and queue.pending and queue.pending + size > self.budget:
                queue.cond.wait()
            if queue.error is not None:
                raise queue.error
            queue.items.append((key, value, size))
            queue.pending += size
            queue.cond.notify_all()

    def finish(self) -> None:
        """Wait until everything put is written and end the thread; raise the first write error."""
        queue = self._queue
        with queue.cond:
            queue.done = True
            queue.cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if queue.error is not None:
            raise queue.error

    @property
    def writer_alive(self) -> bool:
        """True while the writer thread runs (for tests and diagnostics)."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """End the writer thread without writing what is still queued (the write in progress finishes)."""
        queue = self._queue
        with queue.cond:
            queue.aborted = True
            queue.items.clear()
            queue.cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_queue", None) is not None:
            self.close()


def runs(items: Iterable, elements_of: Callable[[Any], int], limit: int) -> Iterator[list]:
    """Consecutive items grouped for one list-op call each: up to `limit` elements per run (an item
    larger than `limit` alone). Hundreds of small tensors (norms, biases) then cost one parallel
    region over all threads, not one fixed cost (and one thread) each; a run's tensors are held while
    the read-ahead goes on, so peak memory grows by one run."""
    run, elements = [], 0
    for item in items:
        n = elements_of(item)
        if run and elements + n > limit:
            yield run
            run, elements = [], 0
        run.append(item)
        elements += n
    if run:
        yield run
