"""``targetmirror selftest``: prove the split on this host, against its own kernel and daemon.

What it does, in well under a minute, and undoes afterwards (also after Ctrl-C):

1. makes a scratch mirror on two temporary sparse files (a ``user:mirror`` backstore that the
   running ``targetmirrord`` serves) and exports it through **tcm_loop**, the kernel's loopback
   SCSI fabric, so that it appears as a local disk: every write goes initiator -> SCSI -> LIO ->
   TCMU ring -> targetmirrord, exactly the path a real initiator's does;
2. runs a sequence-numbered writer on that disk (O_DIRECT, several threads, each rewriting
   overlapping runs of blocks in its own window, every block stamped with the write that put it
   there and a checksum), and while it runs **splits** the mirror;
3. after the writer stops, reads images A and B and checks, window by window, that **A holds
   exactly the writes that were queued before the split instant** -- every write acknowledged
   before the instant, none issued after it, a write in flight at the instant either way but
   whole, and nothing torn or out of order (A equals the window replayed up to one cut) -- and
   that **B holds all of them** (the window replayed to the end), with nothing written outside
   the windows;
4. prints ``PASS`` or ``FAIL`` with the numbers, and removes the export, the backstore, the
   daemon's saved state of the scratch mirror and the files.

It needs root, LIO (configfs, ``target_core_user``, ``tcm_loop``) and a running targetmirrord
whose image directories (if it confines images) include ``--dir``.  Nothing here is imported by
the daemon; the check (:func:`check`) is pure and unit-tested on synthetic images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from targetmirror.errors import TargetMirrorError

BLOCK = 4096
MAGIC = b"TMSELFT1"
#: magic, run id, seq, thread, step, first block of the write, blocks in it, index in it, block
HEADER = struct.Struct("<8sQQIIQIIQ")
_CRC = struct.Struct("<I")
_BODY = BLOCK - _CRC.size
MAX_RUN = 8
"""Blocks per write at most (1..MAX_RUN, random): runs of a thread overlap each other."""
WINDOW = 64
"""Blocks each writer thread owns (256 KiB, four 64 KiB regions)."""


class SelftestError(TargetMirrorError):
    """The self-test could not run (not a FAIL of the split: a missing precondition)."""

    code = "selftest"


# -- the writer --------------------------------------------------------------------------------

def payload(run_id: int, seq: int, thread: int, step: int, first: int, nblocks: int,
            index: int) -> bytes:
    """The 4096 bytes of block ``index`` of one write (deterministic in its arguments)."""
    head = HEADER.pack(MAGIC, run_id, seq, thread, step, first, nblocks, index, first + index)
    body = (head * (_BODY // len(head) + 1))[:_BODY]
    return body + _CRC.pack(zlib.crc32(body))


@dataclass(frozen=True)
class Stamp:
    """What a valid block says about the write that put it there."""

    run_id: int
    seq: int
    thread: int
    step: int
    first: int
    nblocks: int
    index: int
    block: int


def decode(data: bytes | bytearray | memoryview) -> Stamp | str | None:
    """None for a zero block, a :class:`Stamp`, or why the block is not a valid one."""
    data = bytes(data)
    if data.count(0) == len(data):
        return None
    if data[:8] != MAGIC:
        return "foreign data"
    if _CRC.unpack_from(data, _BODY)[0] != zlib.crc32(data[:_BODY]):
        return "bad checksum (torn block)"
    return Stamp(*HEADER.unpack_from(data)[1:])


@dataclass
class Write:
    """One logged write: its place, and both clocks around the ``pwrite``."""

    seq: int
    thread: int
    step: int
    first: int
    nblocks: int
    issue_wall: float = 0.0
    ack_wall: float | None = None
    error: str | None = None


class Writer:
    """``threads`` threads, each rewriting random runs of blocks of its own window, O_DIRECT.

    Thread ``t`` owns blocks ``[base[t], base[t] + WINDOW)``; its writes are issued one after
    the other (the next when the previous was acknowledged), so the history of every block is
    known in order, while the threads' writes are in flight together.
    """

    def __init__(self, path: str, run_id: int, bases: Sequence[int], seed: int) -> None:
        self.path = path
        self.run_id = run_id
        self.bases = list(bases)
        self.seed = seed
        self.stop_event = threading.Event()
        self.logs: list[list[Write]] = [[] for _ in bases]
        self.errors: list[str] = []
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for t in range(len(self.bases)):
            th = threading.Thread(target=self._run, args=(t,), name=f"selftest-writer-{t}",
                                  daemon=True)
            self._threads.append(th)
            th.start()

    @property
    def acked(self) -> int:
        return sum(1 for log in self.logs for w in log if w.ack_wall is not None)

    def wait_acked(self, n: int, timeout: float) -> None:
        """Until ``n`` writes are acknowledged in all (a poll: the writers are other threads)."""
        deadline = time.monotonic() + timeout
        while self.acked < n:
            if self.errors:
                raise SelftestError(f"a write to the scratch disk failed: {self.errors[0]}")
            if time.monotonic() > deadline:
                raise SelftestError(f"the writer got only {self.acked} of {n} writes "
                                    f"acknowledged in {timeout:.0f} s")
            time.sleep(0.01)

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        for th in self._threads:
            th.join(timeout)
            if th.is_alive():
                raise SelftestError(f"{th.name} did not return within {timeout:.0f} s "
                                    "(a write to the scratch disk hangs)")

    def _run(self, t: int) -> None:
        # reproducible write pattern, not a secret
        rng = random.Random(self.seed * 1000 + t)  # noqa: S311  # nosec B311
        buf = mmap.mmap(-1, MAX_RUN * BLOCK)         # page-aligned, as O_DIRECT needs
        fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        try:
            step = 0
            while not self.stop_event.is_set():
                n = rng.randint(1, MAX_RUN)
                first = self.bases[t] + rng.randrange(WINDOW - n + 1)
                with self._seq_lock:
                    seq = self._seq
                    self._seq += 1
                buf[:n * BLOCK] = b"".join(payload(self.run_id, seq, t, step, first, n, i)
                                           for i in range(n))
                w = Write(seq, t, step, first, n)
                self.logs[t].append(w)
                w.issue_wall = time.time()
                try:
                    done = os.pwrite(fd, memoryview(buf)[:n * BLOCK], first * BLOCK)
                except OSError as exc:
                    w.error = str(exc)
                    self.errors.append(f"thread {t} block {first}: {exc}")
                    return
                if done != n * BLOCK:
                    w.error = f"short write of {done} bytes"
                    self.errors.append(f"thread {t} block {first}: {w.error}")
                    return
                w.ack_wall = time.time()
                step += 1
        finally:
            os.close(fd)
            buf.close()


# -- the check ---------------------------------------------------------------------------------

@dataclass
class Report:
    """The outcome and its numbers."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)


def replay(writes: Sequence[Write], run_id: int, base: int, upto: int) -> bytearray:
    """The window after the first ``upto`` writes of a thread, from zeros."""
    img = bytearray(WINDOW * BLOCK)
    for w in writes[:upto]:
        for i in range(w.nblocks):
            off = (w.first + i - base) * BLOCK
            img[off:off + BLOCK] = payload(run_id, w.seq, w.thread, w.step, w.first, w.nblocks, i)
    return img


def _describe(data: bytes | bytearray) -> str:
    d = decode(data)
    if d is None:
        return "zeros"
    if isinstance(d, str):
        return d
    return f"write seq {d.seq} (thread {d.thread} step {d.step})"


def _first_diff(got: bytes, want: bytes | bytearray, base: int) -> str:
    for i in range(len(want) // BLOCK):
        g, w = got[i * BLOCK:(i + 1) * BLOCK], want[i * BLOCK:(i + 1) * BLOCK]
        if g != w:
            return f"block {base + i} holds {_describe(g)}, expected {_describe(w)}"
    return "no difference"


def check(a: bytes, b: bytes, logs: Sequence[Sequence[Write]], bases: Sequence[int],
          run_id: int, instant_wall: float) -> Report:
    """Compare images A and B (whole LUNs) with the writers' logs; see the module docstring."""
    rep = Report(ok=True)
    problems = rep.problems
    writes = [w for log in logs for w in log]
    failed = [w for w in writes if w.error or w.ack_wall is None]
    if failed:
        problems.append(f"{len(failed)} write(s) were not acknowledged, e.g. seq "
                        f"{failed[0].seq}: {failed[0].error or 'no answer'}")
    in_flight = in_flight_in_a = before = after = in_a = overlapping = 0
    for t, log in enumerate(logs):
        base = bases[t]
        lo, hi = base * BLOCK, (base + WINDOW) * BLOCK
        acked = [w for w in log if w.ack_wall is not None and not w.error]
        seen: set[int] = set()
        for w in acked:
            blocks = set(range(w.first, w.first + w.nblocks))
            overlapping += bool(blocks & seen)
            seen |= blocks
        # B: every acknowledged write, replayed in the thread's order
        if b[lo:hi] != replay(acked, run_id, base, len(acked)):
            problems.append(f"B, thread {t}: " + _first_diff(b[lo:hi], replay(
                acked, run_id, base, len(acked)), base))
        # A: the thread's writes up to one cut, nothing else
        stamps = [decode(a[lo + i * BLOCK:lo + (i + 1) * BLOCK]) for i in range(WINDOW)]
        bad = [(base + i, s) for i, s in enumerate(stamps) if isinstance(s, str)]
        if bad:
            problems.append(f"A, thread {t}: block {bad[0][0]} is {bad[0][1]}")
            continue
        valid = [s for s in stamps if isinstance(s, Stamp)]
        cut = 1 + max((s.step for s in valid), default=-1)
        if cut > len(acked) or any(s.run_id != run_id or s.thread != t for s in valid):
            problems.append(f"A, thread {t}: holds a write that was never acknowledged "
                            "or is another run's")
            continue
        if a[lo:hi] != replay(acked, run_id, base, cut):
            problems.append(f"A, thread {t}: not the window after its first {cut} writes: "
                            + _first_diff(a[lo:hi], replay(acked, run_id, base, cut), base))
        for i, w in enumerate(acked):
            assert w.ack_wall is not None
            if w.ack_wall < instant_wall:
                before += 1
                if i >= cut:
                    problems.append(f"A lacks write seq {w.seq} (thread {t} step {w.step}), "
                                    f"acknowledged {instant_wall - w.ack_wall:.6f} s before "
                                    "the split instant")
            elif w.issue_wall > instant_wall:
                after += 1
                if i < cut:
                    problems.append(f"A holds write seq {w.seq} (thread {t} step {w.step}), "
                                    f"issued {w.issue_wall - instant_wall:.6f} s after the "
                                    "split instant")
            else:
                in_flight += 1
                in_flight_in_a += i < cut
        in_a += cut
    covered = bytearray(len(b))
    for base in bases:
        covered[base * BLOCK:(base + WINDOW) * BLOCK] = b"\1" * (WINDOW * BLOCK)
    for name, img in (("A", a), ("B", b)):
        stray = next((i for i in range(0, len(img), BLOCK)
                      if not covered[i] and img[i:i + BLOCK].count(0) != BLOCK), None)
        if stray is not None:
            problems.append(f"{name} has data outside the writers' windows at block "
                            f"{stray // BLOCK}: {_describe(img[stray:stray + BLOCK])}")
    rep.ok = not problems
    rep.numbers = {"writes": len(writes), "threads": len(logs),
                   "overlapping_writes": overlapping, "acked_before_instant": before,
                   "in_flight_at_instant": in_flight, "in_flight_in_A": in_flight_in_a,
                   "issued_after_instant": after, "writes_in_A": in_a,
                   "writes_in_B": sum(len([w for w in log if w.ack_wall is not None])
                                      for log in logs)}
    if before == 0 or after == 0:
        rep.ok = False
        problems.append(f"the split did not happen under load ({before} writes before the "
                        f"instant, {after} after): the test proves nothing")
    return rep


# -- the scratch mirror ------------------------------------------------------------------------

class Scratch:
    """Everything the self-test makes, each step recorded so :meth:`remove` undoes it."""

    def __init__(self, client: Any, directory: str, size: int,
                 say: Callable[[str], None]) -> None:
        self.client = client
        self.size = size
        self.say = say
        self.name = f"tmselftest-{os.getpid()}-{random.getrandbits(24):06x}"  # nosec B311
        try:
            self.dir = tempfile.mkdtemp(prefix="targetmirror-selftest-", dir=directory)
        except OSError as exc:
            raise SelftestError(f"--dir {directory}: cannot make a scratch directory there: "
                                f"{exc.strerror or exc}") from exc
        self.a = os.path.join(self.dir, "a.img")
        self.b = os.path.join(self.dir, "b.img")
        self.node = os.path.join(self.dir, "disk")
        self.so: Any = None
        self.target: Any = None
        self.served = False

    def make(self, timeout: float = 30.0) -> str:
        """Images, backstore, served by the daemon, exported through tcm_loop; the disk."""
        from targetmirror.lio.backstore import create_backstore

        for p in (self.a, self.b):
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self.size)
            finally:
                os.close(fd)
        self.so = create_backstore(self.name, self.size, f"a={self.a};b={self.b}")
        self.served = True  # from here the daemon may have opened it: forget it at the end
        st = self._wait_served(timeout)
        if st.get("state") != "mirrored":
            raise SelftestError(f"targetmirrord does not serve the scratch mirror: "
                                f"{st.get('reason') or st.get('state')} (if it confines "
                                "images, give --dir inside one of its image directories)")
        from rtslib_fb import LUN, TPG, FabricModule, Target

        try:
            self.target = Target(FabricModule("loopback"))
            tpg = TPG(self.target, 1)
            LUN(tpg, 0, self.so)
        except Exception as exc:  # rtslib raises RTSLibError or OSError, often as a bare one
            raise SelftestError(f"cannot export through tcm_loop: {exc} (modprobe tcm_loop)"
                                ) from exc
        return self._disk(tpg, timeout)

    def _wait_served(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                st: dict[str, Any] = self.client.mirror(self.name)
                if st.get("state") in ("mirrored", "not-ready"):
                    return st
            except TargetMirrorError as exc:
                if time.monotonic() > deadline:
                    raise SelftestError(f"targetmirrord did not take the scratch mirror in "
                                        f"{timeout:.0f} s: {exc}") from exc
            time.sleep(0.05)  # polling the daemon: it attaches on its own netlink event

    def _disk(self, tpg: Any, timeout: float) -> str:
        """The LUN's block device, as a node of our own in the scratch directory (works with
        and without udev, and leaves /dev alone)."""
        address = Path(tpg.path, "address").read_text().strip()   # "HOST:0:TPGT"
        host, channel, target = address.split(":")
        block_dir = Path("/sys/bus/scsi/devices", f"{host}:{channel}:{target}:0", "block")
        deadline = time.monotonic() + timeout
        while True:
            names = sorted(p.name for p in block_dir.glob("*")) if block_dir.exists() else []
            if names and Path("/sys/block", names[0], "size").read_text().strip() != "0":
                break
            if time.monotonic() > deadline:
                raise SelftestError(f"the tcm_loop LUN did not appear as a disk ({block_dir}) "
                                    f"in {timeout:.0f} s")
            time.sleep(0.05)  # the kernel's SCSI scan runs on its own
        major, minor = (int(x) for x in Path("/sys/block", names[0], "dev").read_text()
                        .split(":"))
        os.mknod(self.node, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
        self.say(f"scratch mirror {self.name} ({self.size >> 20} MiB, images in {self.dir}) "
                 f"exported through tcm_loop as {names[0]}")
        return self.node

    def remove(self) -> list[str]:
        """Undo everything, in reverse order; returns what could not be removed (and why)."""
        left: list[str] = []
        if self.target is not None:
            try:
                self.target.delete()
            except Exception as exc:  # keep going: the rest must still go
                left.append(f"tcm_loop target {self.target.wwn}: {exc}")
        if self.so is not None:
            try:
                for lun in list(self.so.attached_luns):
                    lun.delete()
                self.so.delete()
            except Exception as exc:
                left.append(f"backstore user:mirror/{self.name}: {exc}")
        if self.served:
            left += self._forget()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.node)
        shutil.rmtree(self.dir, onerror=lambda _f, p, e: left.append(f"{p}: {e[1]}"))
        return left

    def _forget(self, timeout: float = 30.0) -> list[str]:
        """Once the daemon has let the mirror go, have it delete the mirror's saved state."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.call("forget", name=self.name)
                return []
            except TargetMirrorError as exc:
                if "is served" not in str(exc) or time.monotonic() > deadline:
                    return [f"targetmirrord's saved state of {self.name}: {exc}"]
            time.sleep(0.05)  # the daemon detaches on the kernel's netlink event


# -- the run -----------------------------------------------------------------------------------

def _read(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def run(client: Any, *, directory: str, size: int, threads: int, before: int, after: int,
        say: Callable[[str], None]) -> Report:
    """The self-test; raises SelftestError (or KeyboardInterrupt) with everything removed."""
    nblocks = size // BLOCK
    if threads < 1 or threads * WINDOW > nblocks:
        raise SelftestError(f"--threads {threads}: expected 1 to {nblocks // WINDOW} for a "
                            f"{size >> 20} MiB scratch mirror")
    try:
        client.call("ping")
    except TargetMirrorError as exc:
        raise SelftestError(f"{exc}; the self-test needs the daemon running") from exc
    t0 = time.monotonic()
    scratch = Scratch(client, directory, size, say)
    writer: Writer | None = None
    try:
        disk = scratch.make()
        stride = nblocks // threads
        bases = [t * stride + (stride - WINDOW) // 2 for t in range(threads)]
        run_id = random.getrandbits(63)  # nosec B311
        writer = Writer(disk, run_id, bases, seed=run_id & 0xFFFF)
        writer.start()
        say(f"writing: {threads} threads, 1 to {MAX_RUN} blocks of 4 KiB per write, "
            "overlapping runs in each thread's window")
        writer.wait_acked(before, timeout=30)
        t_issue = time.time()
        res = client.split([scratch.name], wait=True, timeout=60)
        t_return = time.time()
        at_split = writer.acked
        writer.wait_acked(at_split + after, timeout=30)
        writer.stop()
        st = res["split"][0]
        sp = st["split"]
        instant = float(sp["instant_wall"])
        say(f"split under load: instant {instant - t_issue:.6f} s into the "
            f"{t_return - t_issue:.3f} s call, A {sp['a_status']} after draining "
            f"{sp.get('pre_split_drained')} write(s) in {sp.get('drain_seconds') or 0:.6f} s")
        rep = check(_read(scratch.a, size), _read(scratch.b, size), writer.logs, bases, run_id,
                    instant)
        if st["state"] != "split" or sp["a_status"] != "consistent":
            rep.ok = False
            rep.problems.append(f"the mirror is {st['state']} with A {sp['a_status']} after "
                                "the split")
        rep.numbers.update({"split_call_seconds": round(t_return - t_issue, 6),
                            "drain_seconds": sp.get("drain_seconds"),
                            "pre_split_drained": sp.get("pre_split_drained"),
                            "size_bytes": size})
    finally:
        if writer is not None:
            with contextlib.suppress(SelftestError):
                writer.stop()
        with _deferred_interrupts(say):
            left = scratch.remove()
        if left:
            say("could not remove: " + "; ".join(left))
    rep.numbers["seconds"] = round(time.monotonic() - t0, 3)
    if left:
        rep.ok = False
        rep.problems.append("left behind: " + "; ".join(left))
    return rep


@contextlib.contextmanager
def _deferred_interrupts(say: Callable[[str], None]) -> Iterator[None]:
    """Clean-up is not interrupted by a second Ctrl-C (or SIGTERM): it says so and goes on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum: int, _frame: FrameType | None) -> None:
        say(f"{signal.Signals(signum).name}: still removing the scratch mirror; please wait")

    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``targetmirror selftest``'s options (the CLI's parser calls this)."""
    p.add_argument("--dir", default=None,
                   help="where the scratch images go (default: the first image_dirs entry of "
                   "the configuration file, else /var/tmp); must be inside the daemon's image "
                   "directories when it confines images")
    p.add_argument("--size", default="64M", help="scratch mirror size (default %(default)s)")
    p.add_argument("--threads", type=int, default=8,
                   help="writer threads (default %(default)s)")
    p.add_argument("--writes-before", type=int, default=1000, dest="before",
                   help="writes acknowledged before the split (default %(default)s)")
    p.add_argument("--writes-after", type=int, default=500, dest="after",
                   help="writes acknowledged after it (default %(default)s)")
    p.add_argument("--config", default=None, help="configuration file (for --dir's default)")


def _default_dir(config: str | None) -> str:
    from targetmirror.config import loader

    try:
        dirs = loader.load(config).image_dirs
    except TargetMirrorError:
        dirs = None
    return str(dirs[0]) if dirs else "/var/tmp"  # noqa: S108  # nosec B108


def main(args: argparse.Namespace) -> int:
    """``targetmirror selftest``: 0 PASS, 1 FAIL or could not run, 130 interrupted."""
    from targetmirror.client import Client
    from targetmirror.units import parse_size

    size = parse_size(args.size)
    if size is None or size < 16 << 20 or size % BLOCK:
        raise SelftestError(f"--size {args.size!r}: expected at least 16M, a multiple of 4K")
    directory = args.dir or _default_dir(args.config)
    if os.geteuid() != 0:
        raise SelftestError("run it as root: it creates LIO objects and a disk")

    def say(text: str) -> None:
        print(f"selftest: {text}", flush=True)

    old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        rep = run(Client(args.socket), directory=directory, size=size, threads=args.threads,
                  before=args.before, after=args.after, say=say)
    except KeyboardInterrupt:
        say("interrupted; everything it made is removed")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
    n = rep.numbers
    line = (f"{'PASS' if rep.ok else 'FAIL'}: {n.get('writes')} writes by {n.get('threads')} "
            f"threads ({n.get('overlapping_writes')} overlapping an earlier one); A holds the "
            f"{n.get('writes_in_A')} queued before the split instant (all "
            f"{n.get('acked_before_instant')} acknowledged before it, "
            f"{n.get('in_flight_in_A')} of {n.get('in_flight_at_instant')} in flight at it, "
            f"none of {n.get('issued_after_instant')} issued after it), B all "
            f"{n.get('writes_in_B')}; {n.get('seconds')} s")
    if getattr(args, "json", False):
        print(json.dumps({"ok": rep.ok, "problems": rep.problems, **n}, indent=1))
    print(line)
    for p in rep.problems:
        print(f"  {p}")
    return 0 if rep.ok else 1


if __name__ == "__main__":  # pragma: no cover - the CLI is the entry point
    parser = argparse.ArgumentParser(prog="targetmirror selftest")
    add_arguments(parser)
    parser.add_argument("--socket", default="/run/targetmirror/control.sock")
    parser.add_argument("--json", action="store_true")
    try:
        sys.exit(main(parser.parse_args()))
    except TargetMirrorError as exc:
        print(f"targetmirror: {exc.code}: {exc}", file=sys.stderr)
        sys.exit(1)
