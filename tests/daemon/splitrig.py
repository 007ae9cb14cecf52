"""A rig for split tests: real runner, real SCSI, real mirror, real files, recorded ring order.

Shared by the randomized split checkers (tests/daemon/test_split_checker.py), the targeted split
tests and ``benchmarks/split_checker.py``.

* :class:`RecordingUio` is the ``FakeUio`` of tests/daemon/test_runner.py that also records, under
  its lock, every queued command in ring order (the order of ``queue`` calls under the lock *is*
  the ring order) with the producer's ``cmd_head`` right after it, and a logical clock stamp for
  every queue and every reap, so a checker can tell which commands may have overlapped in time.
* :class:`JitterImage` is an :class:`Image` whose writes and reads first wait a random tiny time
  (perturbation only: nothing waits on it for synchronisation), and which can *gate* writes at
  chosen offsets behind a :class:`threading.Event` for deterministic tests.
* Every block written by a test identifies its write: :func:`block` encodes (writer, sequence,
  index within the write, LBA) into all 512 bytes, so the final image can be decoded block by
  block when a checker fails.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from targetmirror.daemon.device import MirrorCommands, ServedDevice
from targetmirror.daemon.runner import DeviceRunner
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import StateStore
from targetmirror.scsi.identity import DeviceIdentity
from targetmirror.store.image import Image
from targetmirror.tcmu.ring import Ring
from targetmirror.tcmu.uio import UioInfo
from tests.daemon.test_runner import FakeUio
from tests.tcmu.producer import Completion, Producer

BS = 512
INIT_WRITER = 0xFFFF
_BLOCK = struct.Struct("<HHHHI4x")  # writer, seq, index, magic, lba: 16 bytes, 32 times a block
_MAGIC = 0x5EB1


def block(writer: int, seq: int, index: int, lba: int) -> bytes:
    """The 512 bytes of block ``index`` of write ``(writer, seq)``, landing at ``lba``."""
    return _BLOCK.pack(writer, seq, index, _MAGIC, lba) * (BS // _BLOCK.size)


def init_block(lba: int) -> bytes:
    """What block ``lba`` holds before any write of a trial."""
    return block(INIT_WRITER, lba & 0xFFFF, 0, lba)


def describe(data: bytes) -> str:
    """Human-readable identity of one 512-byte block (for failure messages)."""
    writer, seq, index, magic, lba = _BLOCK.unpack_from(data)
    if magic != _MAGIC or data != _BLOCK.pack(writer, seq, index, magic, lba) * (BS // 16):
        return "<torn or foreign block>"
    if writer == INIT_WRITER:
        return f"init(lba {lba})"
    return f"w{writer}.s{seq}[{index}]@{lba}"


@functools.lru_cache(maxsize=8)
def initial_image(nblocks: int) -> bytes:
    return b"".join(init_block(lba) for lba in range(nblocks))


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, blocks, 0)


def write16(lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, lba, blocks, 0, 0)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


# -- the kernel side, recorded ------------------------------------------------------------------

@dataclass
class Queued:
    """One command as the "kernel" queued it."""

    order: int
    """Position in ring order (0 = first queued on this device)."""
    cmd_id: int
    head_after: int
    """``cmd_head`` right after this entry was queued: it was queued before a split instant
    iff ``head_after <= ring_head`` (the ring of a trial never wraps)."""
    queued_at: int
    """Logical clock stamp of the queue."""
    kind: str
    """"write" or "read"."""
    lba: int
    blocks: int
    payload: bytes = b""
    """Data-out of a write (the blocks it puts at ``lba``...)."""
    label: str = ""


class RecordingUio(FakeUio):
    """FakeUio that records ring order and stamps queues and reaps on one logical clock."""

    def __init__(self, producer: Producer, clock: Callable[[], int] | None = None) -> None:
        super().__init__(producer)
        self.log: list[Queued] = []
        self.reaped: dict[int, tuple[int, Completion]] = {}
        """cmd_id -> (reap stamp, completion).  cmd_ids are not reused within one producer's
        first 65535 commands, which a rig never exceeds."""
        self._clock = clock if clock is not None else itertools.count().__next__

    def notify(self) -> None:
        with self.lock:
            self.notifies += 1
            for cmd_id, comp in self.producer.reap().items():
                self.reaped[cmd_id] = (self._clock(), comp)
            self.lock.notify_all()

    def submit(self, kind: str, cdb: bytes, lba: int, blocks: int, data_out: bytes = b"",
               data_in_len: int = 0, label: str = "") -> Queued:
        with self.lock:
            cmd_id = self.producer.queue(cdb, data_out, data_in_len)
            rec = Queued(len(self.log), cmd_id, self.producer.head, self._clock(), kind, lba,
                         blocks, data_out, label)
            self.log.append(rec)
            self.lock.notify_all()
        self._event()
        return rec

    def _event(self) -> None:
        os.eventfd_write(self.efd, 1)

    def queued(self) -> int:
        return len(self.log)

    def wait_reaped(self, ids: Sequence[int], timeout: float = 20.0) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: all(i in self.reaped for i in ids), timeout)

    def wait_queued(self, n: int, timeout: float = 20.0) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: len(self.log) >= n, timeout)

    def close(self) -> None:
        """What ServedDevice.close() calls on its UioDevice (the rig closes the eventfd)."""


class RecordingSocketUio(RecordingUio):
    """RecordingUio whose fd speaks the UIO protocol (4-byte events and notifies) through a
    ``SOCK_SEQPACKET`` pair, so the express lane's wait loop can poll, ack and notify it in C
    (``lane_fd``); a thread plays the kernel and reaps (and stamps) on every notify."""

    def __init__(self, producer: Producer, clock: Callable[[], int] | None = None) -> None:
        super().__init__(producer, clock)
        self.user, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.user.setblocking(False)
        self._reaper = threading.Thread(target=self._reap_loop, name="kernel", daemon=True)
        self._reaper.start()

    def fileno(self) -> int:
        return self.user.fileno()

    def lane_fd(self) -> int:
        return self.user.fileno()

    def ack(self) -> bool:
        try:
            return len(self.user.recv(4)) == 4
        except BlockingIOError:
            return False

    def notify(self) -> None:
        self.user.send(bytes(4))

    def _reap_loop(self) -> None:
        while True:
            try:
                msg = self.kernel.recv(4)
            except OSError:
                return
            if not msg:
                return
            RecordingUio.notify(self)

    def _event(self) -> None:
        self.kernel.send(bytes(4))

    def shutdown(self) -> None:
        self.kernel.shutdown(socket.SHUT_RDWR)
        self._reaper.join(10)
        self.kernel.close()
        self.user.close()


# -- the images -------------------------------------------------------------------------------

class JitterImage(Image):
    """An Image whose I/O is randomly delayed (perturbation) and optionally gated (control)."""

    def __init__(self, path: str, rng: random.Random | None = None,
                 max_delay: float = 0.0, p_delay: float = 0.0) -> None:
        super().__init__(path)
        self.fast = False  # gated or delayed I/O must not run on the ring thread
        self.rng = rng
        self.max_delay = max_delay
        self.p_delay = p_delay
        self.gates: dict[int, tuple[threading.Event, threading.Event]] = {}
        """offset -> (entered, release): a write starting at ``offset`` sets ``entered`` and
        waits for ``release``."""
        self.writes: list[tuple[int, int]] = []
        """(offset, length) of every write that reached the file, in order."""

    express = False
    """Set by ``make_device(express=True)``: the express lane may write the fd itself, past
    the jitter, the gates and ``writes`` (the Python path still goes through them)."""

    def express_fd(self, write: bool = True) -> int | None:
        if not self.express or not self.fast or (write and self.frozen):
            return None
        return self.fd

    def gate(self, offset: int) -> tuple[threading.Event, threading.Event]:
        g = (threading.Event(), threading.Event())
        self.gates[offset] = g
        return g

    def _jitter(self) -> None:
        rng = self.rng
        if rng is not None and self.max_delay and rng.random() < self.p_delay:
            time.sleep(rng.random() * self.max_delay)

    def writev(self, offset: int, iov: Sequence[memoryview]) -> None:
        g = self.gates.get(offset)
        if g is not None:
            g[0].set()
            if not g[1].wait(30):
                raise AssertionError(f"gate at {offset} of {self.path} never released")
        self._jitter()
        super().writev(offset, iov)
        self.writes.append((offset, sum(len(v) for v in iov)))

    def readv(self, offset: int, iov: Sequence[memoryview]) -> None:
        self._jitter()
        super().readv(offset, iov)


# -- one served device ------------------------------------------------------------------------

@dataclass
class RigDevice:
    """One served mirror: a real :class:`ServedDevice` (what ``split()`` takes) and the test's
    handles on the kernel double and the images."""

    served: ServedDevice
    uio: RecordingUio
    producer: Producer
    a: JitterImage
    b: JitterImage
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.served.info.dev_name

    @property
    def mirror(self) -> Mirror:
        m = self.served.mirror
        assert m is not None
        return m

    @property
    def runner(self) -> DeviceRunner:
        return self.served.runner

    def close(self, timeout: float = 10.0) -> None:
        if self.extra.get("closed"):
            return
        self.extra["closed"] = True
        self.runner.stop()
        self.runner.join(timeout)
        self.mirror.close()
        if isinstance(self.uio, RecordingSocketUio):
            self.uio.shutdown()
        self.producer.close()
        os.close(self.uio.efd)

    def image_bytes(self, leg: str) -> bytes:
        path = self.a.path if leg == "a" else self.b.path
        with open(path, "rb") as f:
            return f.read(self.mirror.size)


def prepare_images(directory: str, name: str, nblocks: int) -> tuple[str, str]:
    """(Re)write ``<name>.a.img`` and ``<name>.b.img`` with the initial content."""
    data = initial_image(nblocks)
    paths = []
    for leg in ("a", "b"):
        path = os.path.join(directory, f"{name}.{leg}.img")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, len(data))
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        paths.append(path)
    return paths[0], paths[1]


def make_device(directory: str, name: str, nblocks: int, *, workers: int,
                store: StateStore | None, rng: random.Random | None = None,
                max_delay: float = 0.0, p_delay: float = 0.0,
                mirror_name: str | None = None, images: tuple[str, str] | None = None,
                clock: Callable[[], int] | None = None, start: bool = True,
                cmdr_size: int = 256 * 1024, data_size: int = 2 << 20,
                fast: bool = False, express: bool = False, loop: bool = False) -> RigDevice:
    """Images with the initial content, a Mirror over jittery Images, a Producer whose ring
    does not wrap within a trial, and a started DeviceRunner.  ``fast`` images let the ring
    thread run small commands itself (never with gates: a gated write would stall it);
    ``express`` (with ``fast``) also gives the runner the compiled express lane, if built;
    ``loop`` (with ``express``) lets the lane wait for commands in C (its wait loop, on a
    socket that speaks the UIO protocol) instead of draining once per wake-up."""
    pa, pb = images if images is not None else prepare_images(directory, name, nblocks)
    a = JitterImage(pa, rng, max_delay, p_delay)
    b = JitterImage(pb, rng, max_delay, p_delay)
    a.fast = b.fast = fast
    a.express = b.express = express
    mirror = Mirror(mirror_name or name, a, b, size=nblocks * BS, block_size=BS, store=store)
    commands = MirrorCommands(
        mirror, lambda: DeviceIdentity(serial=f"{name}0001"[:16], max_transfer_blocks=2048))
    producer = Producer(cmdr_size=cmdr_size, data_size=data_size)
    uio = (RecordingSocketUio if loop and express else RecordingUio)(producer, clock)
    runner = DeviceRunner(name, uio, Ring(producer.buf), commands.admit,
                          before_dispatch=commands.commit, workers=workers,
                          tag=mirror.epoch,
                          express=commands.express if express and commands.lane else None)
    if start:
        runner.start()
    info = UioInfo(name=f"tcm-user/0/{name}/mirror/{pa}|{pb}", minor=0, hba=0, dev_name=name,
                   subtype="mirror", cfgstring=f"{pa}|{pb}", map_size=producer.map_size,
                   dev_path="/dev/null")
    served = ServedDevice(info, uio, runner, mirror,  # type: ignore[arg-type]
                          stats=commands.stats)
    return RigDevice(served, uio, producer, a, b, extra={"commands": commands})


# -- the model ---------------------------------------------------------------------------------

def apply_writes(initial: bytes, writes: Sequence[Queued]) -> bytearray:
    """``initial`` with every write applied in the given (ring) order."""
    img = bytearray(initial)
    for w in writes:
        img[w.lba * BS:w.lba * BS + len(w.payload)] = w.payload
    return img


def diff_blocks(actual: bytes, expected: bytes, limit: int = 12) -> str:
    """The first differing blocks, decoded."""
    out = []
    for lba in range(len(expected) // BS):
        got = actual[lba * BS:(lba + 1) * BS]
        want = expected[lba * BS:(lba + 1) * BS]
        if got != want:
            out.append(f"lba {lba}: has {describe(got)}, expected {describe(want)}")
            if len(out) >= limit:
                out.append("...")
                break
    return "; ".join(out)


def shared_clock() -> Callable[[], int]:
    """One logical clock for several devices (stamps are comparable across them)."""
    lock = threading.Lock()
    counter = itertools.count()

    def tick() -> int:
        with lock:
            return next(counter)

    return tick
