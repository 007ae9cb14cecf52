"""A sequence-numbered O_DIRECT writer for split proofs (runs on the initiator side, in the guest).

Every write is one 4 KiB block that says who wrote it and when, so an image can be decoded after
the fact and each block matched to exactly one logged write:

* :class:`SeqWriter` runs ``threads`` worker threads inside the calling process (so a test can
  start it, wait until N writes are acknowledged, split, let it go on, and stop it).  Each thread
  owns a disjoint set of blocks -- thread ``t`` of ``T`` writes blocks ``t, t+T, t+2T, ...`` --
  so every block is written at most once and the *only* write a block can hold is known.
* With several targets (devices) a thread is a *chain of dependent writes*: step ``k`` goes to
  target ``k % n`` and is issued only after step ``k-1`` was acknowledged.  With one target the
  same loop is a plain writer with ``threads`` writes in flight.
* Every write is recorded (:class:`Write`): issue time taken just before ``pwrite`` and ack time
  right after it returns, on both ``time.monotonic()`` (comparable across processes: one
  system-wide clock) and ``time.time()`` (comparable with the daemon's ``instant_wall``).
* The block payload: a header (magic, writer id, thread, target, step, global sequence number,
  block number, build timestamp), filler derived from the header, and a CRC32 of everything
  before it in the last 4 bytes.  :func:`decode` checks all of it, so a torn or foreign block is
  told apart from a valid one and from zeros.

Buffers are anonymous ``mmap`` pages (page-aligned, as O_DIRECT needs).
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

BLOCK = 4096
MAGIC = b"TMSEQW01"
#: magic, writer id, thread, target, step, seq, block, built (monotonic seconds)
HEADER = struct.Struct("<8sIIIIQQd")
_CRC = struct.Struct("<I")
_BODY = BLOCK - _CRC.size
ZERO = bytes(BLOCK)


@dataclass(slots=True)
class Write:
    """One logged write.  ``ack_*`` are None while in flight; ``error`` is set on failure."""

    seq: int
    thread: int
    target: int
    step: int
    block: int
    built: float
    issue_mono: float
    issue_wall: float
    ack_mono: float | None = None
    ack_wall: float | None = None
    error: str | None = None

    @property
    def acked(self) -> bool:
        return self.ack_mono is not None and self.error is None

    def payload(self, writer_id: int) -> bytes:
        return payload(writer_id, self.thread, self.target, self.step, self.seq, self.block,
                       self.built)


@dataclass(frozen=True, slots=True)
class Decoded:
    """What a valid block says about the write that put it there."""

    writer_id: int
    thread: int
    target: int
    step: int
    seq: int
    block: int
    built: float


def payload(writer_id: int, thread: int, target: int, step: int, seq: int, block: int,
            built: float) -> bytes:
    """The 4096 bytes of one write (deterministic in its arguments)."""
    head = HEADER.pack(MAGIC, writer_id, thread, target, step, seq, block, built)
    reps = _BODY // len(head) + 1
    body = (head * reps)[:_BODY]
    return body + _CRC.pack(zlib.crc32(body))


def decode(data: bytes | memoryview) -> Decoded | str | None:
    """``None`` for an all-zero block, a :class:`Decoded` for a valid one, else a reason string
    (torn, foreign, bad checksum)."""
    if data == ZERO:
        return None
    if len(data) != BLOCK:
        return f"length {len(data)}"
    body = bytes(data[:_BODY])
    if body[:8] != MAGIC:
        return "no magic (foreign or torn block)"
    if _CRC.unpack_from(data, _BODY)[0] != zlib.crc32(body):
        return "bad checksum (torn block)"
    _m, wid, thread, target, step, seq, block, built = HEADER.unpack_from(body)
    return Decoded(wid, thread, target, step, seq, block, built)


def scan_image(path: str | Path, num_blocks: int) -> dict[int, Decoded | str]:
    """Decode every non-zero 4 KiB block of an image file: block number -> Decoded or reason."""
    found: dict[int, Decoded | str] = {}
    chunk = 256 * BLOCK
    with open(path, "rb", buffering=0) as f:
        for first in range(0, num_blocks, 256):
            data = f.read(min(chunk, (num_blocks - first) * BLOCK))
            if not data:
                break
            if data.count(0) == len(data):
                continue
            view = memoryview(data)
            for i in range(len(data) // BLOCK):
                blk = view[i * BLOCK:(i + 1) * BLOCK]
                d = decode(blk)
                if d is not None:
                    found[first + i] = d
    return found


class SeqWriter:
    """Threads writing numbered blocks with O_DIRECT; see the module docstring.

    ``targets``: device paths (one = plain writer; several = dependent-write chains).
    ``num_blocks``: 4 KiB blocks available on each target (threads stop when theirs run out).
    ``log_path``: where :meth:`stop` writes the write log (JSON lines).
    """

    def __init__(self, targets: Sequence[str], *, threads: int, num_blocks: int,
                 writer_id: int = 1, log_path: str | Path | None = None) -> None:
        if not targets or threads < 1:
            raise ValueError("need at least one target and one thread")
        self.targets = list(targets)
        self.nthreads = threads
        self.num_blocks = num_blocks
        self.writer_id = writer_id
        self.log_path = Path(log_path) if log_path else None
        self.stop_event = threading.Event()
        self._seq = itertools.count()
        self._seq_lock = threading.Lock()
        self._logs: list[list[Write]] = [[] for _ in range(threads)]
        self._acked = [0] * threads
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self.exhausted = 0
        self.started_mono = 0.0
        self.stopped_mono = 0.0

    # -- control ---------------------------------------------------------------------------
    def start(self) -> SeqWriter:
        self.started_mono = time.monotonic()
        for t in range(self.nthreads):
            th = threading.Thread(target=self._run, args=(t,), name=f"seqwriter-{t}",
                                  daemon=True)
            self._threads.append(th)
            th.start()
        return self

    @property
    def acked(self) -> int:
        """Writes acknowledged so far (all threads)."""
        return sum(self._acked)

    def running(self) -> int:
        return sum(th.is_alive() for th in self._threads)

    def wait_acked(self, n: int, timeout: float) -> int:
        """Block until at least ``n`` writes are acknowledged; raise on timeout or if every
        thread has ended (error or out of blocks) first."""
        deadline = time.monotonic() + timeout
        while (got := self.acked) < n:
            if self.errors:
                raise RuntimeError(f"seqwriter: write failed: {self.errors[0]}")
            if not self.running():
                raise RuntimeError(f"seqwriter: all threads ended after {got} writes")
            if time.monotonic() > deadline:
                raise TimeoutError(f"seqwriter: {got} of {n} writes acknowledged after "
                                   f"{timeout} s")
            time.sleep(0.02)
        return got

    def stop(self, timeout: float = 120.0) -> list[Write]:
        """Stop issuing, wait for the writes in flight to return, write the log; return it."""
        self.stop_event.set()
        for th in self._threads:
            th.join(timeout)
            if th.is_alive():
                raise TimeoutError(f"seqwriter: {th.name} did not return within {timeout} s")
        self.stopped_mono = time.monotonic()
        records = self.records()
        if self.log_path is not None:
            with self.log_path.open("w") as f:
                for w in records:
                    f.write(json.dumps(asdict(w)) + "\n")
        return records

    def records(self) -> list[Write]:
        """Every write so far, in global sequence order."""
        out = [w for log in self._logs for w in log]
        out.sort(key=lambda w: w.seq)
        return out

    def chains(self) -> dict[int, list[Write]]:
        """thread -> its writes in step order (each thread is one chain)."""
        return {t: list(log) for t, log in enumerate(self._logs)}

    # -- worker ----------------------------------------------------------------------------
    def _blocks(self, thread: int) -> Iterator[tuple[int, int, int]]:
        """(step, target, block) for one thread: disjoint from every other thread's blocks."""
        n = len(self.targets)
        for step in itertools.count():
            block = thread + self.nthreads * (step // n)
            if block >= self.num_blocks:
                return
            yield step, step % n, block

    def _run(self, thread: int) -> None:
        try:
            self._write_loop(thread)
        except BaseException as exc:  # anything unexpected must reach the test, not stderr
            self.errors.append(f"thread {thread} crashed: {exc!r}")
            raise

    def _write_loop(self, thread: int) -> None:
        flags = os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC
        fds = [os.open(path, flags) for path in self.targets]
        buf = mmap.mmap(-1, BLOCK)
        log = self._logs[thread]
        try:
            for step, target, block in self._blocks(thread):
                if self.stop_event.is_set():
                    return
                with self._seq_lock:
                    seq = next(self._seq)
                built = time.monotonic()
                buf[:] = payload(self.writer_id, thread, target, step, seq, block, built)
                w = Write(seq, thread, target, step, block, built, 0.0, 0.0)
                log.append(w)
                w.issue_wall = time.time()
                w.issue_mono = time.monotonic()
                try:
                    n = os.pwrite(fds[target], buf, block * BLOCK)
                except OSError as exc:
                    w.ack_mono = time.monotonic()
                    w.error = f"{exc}"
                    self.errors.append(f"thread {thread} block {block}: {exc}")
                    return
                w.ack_mono = time.monotonic()
                w.ack_wall = time.time()
                if n != BLOCK:
                    w.error = f"short write {n}"
                    self.errors.append(f"thread {thread} block {block}: short write {n}")
                    return
                self._acked[thread] += 1
            with self._seq_lock:
                self.exhausted += 1
        finally:
            buf.close()
            for fd in fds:
                os.close(fd)
