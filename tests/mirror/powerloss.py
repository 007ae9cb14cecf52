"""A simulated power loss for the whole mirror: images, bitmap and state, in memory.

Every file has a *durable* copy and a *volatile* one (the page cache).  Writes change the
volatile copy and mark its 4 KiB pages dirty; ``fdatasync``/``fsync`` copies the dirty pages to
the durable copy.  A crash keeps the durable copy plus a random subset of the dirty pages (the
kernel may have written some back before the power went), so a write that was never flushed may
be there, half there (page by page), or gone -- the adversary a write-intent log exists for.

Every operation on any file (image read/write/flush/zero, bitmap write/sync, state save) is a
*crash point*: :meth:`SimFS.tick` counts it and, at the chosen count, raises :class:`PowerLoss`
there and at every later operation on this filesystem, in every thread, so the mirror stops
mid-step exactly as a dead machine would.  The state document is saved atomically and durably
when ``save`` returns (the real ``StateStore.save`` does write, fsync, rename, fsync dir; its
crash safety is the kernel's rename, not ours), so a crash inside a save keeps the old document.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Sequence

from targetmirror.errors import StoreError
from targetmirror.mirror.bitmap import Bitmap
from targetmirror.mirror.state import MirrorState, StateStore
from targetmirror.store.image import Image

PAGE = 4096


class PowerLoss(BaseException):
    """The machine lost power at this operation."""


class SimFile:
    def __init__(self, data: bytes = b"") -> None:
        self.durable = bytearray(data)
        self.cur = bytearray(data)
        self.dirty: set[int] = set()
        self.durable_size = len(data)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        end = offset + len(data)
        if end > len(self.cur):
            self.cur.extend(bytes(end - len(self.cur)))
        self.cur[offset:end] = data
        self.dirty.update(range(offset // PAGE, (end - 1) // PAGE + 1))

    def truncate(self, n: int) -> None:
        if n < len(self.cur):
            del self.cur[n:]
        else:
            self.cur.extend(bytes(n - len(self.cur)))
        self.dirty.update(range(0, (n + PAGE - 1) // PAGE))

    def sync(self) -> None:
        self.durable_size = len(self.cur)
        if len(self.durable) < len(self.cur):
            self.durable.extend(bytes(len(self.cur) - len(self.durable)))
        del self.durable[len(self.cur):]
        for p in self.dirty:
            self.durable[p * PAGE:(p + 1) * PAGE] = self.cur[p * PAGE:(p + 1) * PAGE]
        self.dirty.clear()

    def after_crash(self, rng: random.Random) -> SimFile:
        """What the disk holds after the power came back."""
        data = bytearray(self.durable[: self.durable_size])
        for p in sorted(self.dirty):
            if rng.random() < 0.5:  # this page happened to be written back
                chunk = self.cur[p * PAGE:(p + 1) * PAGE]
                if p * PAGE < len(data):
                    data[p * PAGE:p * PAGE + len(chunk)] = chunk[: len(data) - p * PAGE]
        return SimFile(bytes(data))


class SimFS:
    """Files that can lose power; see the module docstring."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.files: dict[str, SimFile] = {}
        self.docs: dict[str, bytes] = {}
        self.ops = 0
        self.crash_at: int | None = None
        self.crashed = False
        self._mu = threading.Lock()

    def tick(self) -> None:
        with self._mu:
            if self.crashed:
                raise PowerLoss
            self.ops += 1
            if self.crash_at is not None and self.ops >= self.crash_at:
                self.crashed = True
                raise PowerLoss

    def power_off(self) -> None:
        with self._mu:
            self.crashed = True

    def reboot(self) -> SimFS:
        """A new filesystem holding what survived."""
        with self._mu:
            self.crashed = True
            fs = SimFS(self.rng)
            fs.files = {p: f.after_crash(self.rng) for p, f in self.files.items()}
            fs.docs = dict(self.docs)
            return fs


class SimImage(Image):
    """An image file on a :class:`SimFS`."""

    def __init__(self, fs: SimFS, path: str, size: int) -> None:  # no super(): no real fd
        self.fs = fs
        self.path = path
        self.readonly = False
        self.direct = False
        self.fd = -1
        self.is_block_device = False
        if path not in fs.files:
            fs.files[path] = SimFile(bytes(size))
        self.file = fs.files[path]
        self.size = size
        self._closed = False
        self._close_lock = threading.Lock()
        self.frozen = False

    def readv(self, offset: int, iov: Sequence[memoryview]) -> None:
        self.fs.tick()
        pos = offset
        for v in iov:
            n = len(v)
            v[:] = self.file.cur[pos:pos + n]
            pos += n

    def writev(self, offset: int, iov: Sequence[memoryview]) -> None:
        if self.frozen:
            self._check_writable("write")
        self.fs.tick()
        pos = offset
        for v in iov:
            self.file.write(pos, v)
            pos += len(v)

    def flush(self) -> None:
        self.fs.tick()
        self.file.sync()

    def write_zeroes(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        self._check_writable("zeroing")
        self.fs.tick()
        self.file.write(offset, bytes(length))

    def close(self) -> None:
        self._closed = True

    def bytes(self) -> bytes:
        return bytes(self.file.cur)


class SimBitmap(Bitmap):
    """The change/write-intent bitmap, its file on a :class:`SimFS`."""

    def __init__(self, fs: SimFS, path: str, size: int, region_size: int) -> None:
        self.fs = fs
        super().__init__(path, size, region_size)

    def _open(self) -> bool:
        exists = self.path in self.fs.files
        if not exists:
            self.fs.files[self.path] = SimFile()
        self.file = self.fs.files[self.path]
        self.fd = -1
        return exists

    def _file_size(self) -> int:
        return len(self.file.cur)

    def _pread(self, n: int, offset: int) -> bytes:
        return bytes(self.file.cur[offset:offset + n])

    def _pwrite(self, data: bytes, offset: int) -> None:
        self.fs.tick()
        self.file.write(offset, data)

    def _truncate(self, n: int) -> None:
        self.fs.tick()
        self.file.truncate(n)

    def _fdatasync(self) -> None:
        self.fs.tick()
        self.file.sync()

    def close(self) -> None:
        pass


class SimStateStore(StateStore):
    """Mirror state documents and bitmaps on a :class:`SimFS`."""

    def __init__(self, fs: SimFS) -> None:  # no super(): no directory
        self.fs = fs
        self.directory = "/sim/state"

    def load(self, name: str) -> MirrorState | None:
        doc = self.fs.docs.get(name)
        return None if doc is None else MirrorState.from_json(json.loads(doc), f"sim:{name}")

    def save(self, st: MirrorState) -> None:
        self.fs.tick()
        self.fs.docs[st.name] = json.dumps(st.to_json()).encode()

    def bitmap_path(self, name: str) -> str:
        return f"/sim/state/{name}.bitmap"

    def open_bitmap(self, name: str, size: int, region_size: int) -> Bitmap:
        return SimBitmap(self.fs, self.bitmap_path(name), size, region_size)


def is_power_loss(exc: BaseException) -> bool:
    return isinstance(exc, PowerLoss) or isinstance(exc.__cause__, PowerLoss)


__all__ = ["PowerLoss", "SimBitmap", "SimFS", "SimImage", "SimStateStore", "StoreError",
           "is_power_loss"]
