"""One backing image: a raw file or a block device, read and written without copies.

The ring hands us the command's data as memoryviews of the TCMU data area; ``os.preadv`` and
``os.pwritev`` move bytes straight between that shared memory and the image, and release the GIL
while they do, so two legs can be written in parallel from two threads.  Short transfers (legal
for files on some filesystems, and after a signal) are finished in a loop rather than treated as
errors; real failures become :class:`StoreError` with the failing operation in ``kind``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import fcntl
import importlib
import os
import stat
import struct
import threading
from collections.abc import Sequence
from typing import Any

from targetmirror.errors import FrozenImageError, StoreError

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# linux/fs.h: _IO(0x12, 119), _IO(0x12, 127), _IOR(0x12, 114, u64)
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268

_ZERO_CHUNK = bytes(1 << 20)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_fallocate.restype = ctypes.c_int


def _advance(iov: Sequence[memoryview], done: int) -> list[memoryview]:
    """Return the part of ``iov`` left after ``done`` bytes (for finishing a short transfer)."""
    rest: list[memoryview] = []
    for view in iov:
        n = len(view)
        if done >= n:
            done -= n
            continue
        rest.append(view[done:] if done else view)
        done = 0
    return rest


class Image:
    """A raw image file or block device opened for zero-copy vectored I/O.

    ``size`` is the usable size in bytes.  For files it is the file's length; for block devices
    the device's size.  The LUN may be smaller than the image, never larger (checked by the
    mirror).  ``direct=True`` opens with O_DIRECT where the backing allows it; tmpfs does not, so
    it falls back to buffered I/O and says so in ``self.direct``.
    """

    access: Any = None
    """How a networked kind reaches its storage (an RBD leg's CephAccess); None for a file."""

    def __init__(self, path: str, *, readonly: bool = False, direct: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self.direct = False
        fd = -1
        try:
            if direct:
                try:
                    fd = os.open(path, flags | os.O_DIRECT)
                    self.direct = True
                except OSError as exc:
                    if exc.errno != errno_mod.EINVAL:
                        raise
            if fd < 0:
                fd = os.open(path, flags)
        except OSError as exc:
            raise StoreError(f"cannot open image {path}: {exc.strerror}", kind="open",
                             path=path, errno=exc.errno) from exc
        self.fd = fd
        try:
            st = os.fstat(fd)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            if not (self.is_block_device or stat.S_ISREG(st.st_mode)):
                raise StoreError(f"image {path} is neither a regular file nor a block device",
                                 kind="open", path=path)
            if self.is_block_device:
                buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
                self.size: int = struct.unpack("<Q", buf)[0]
            else:
                self.size = st.st_size
        except BaseException:
            os.close(fd)
            raise
        self._closed = False
        self._close_lock = threading.Lock()
        self.frozen = False
        self.fast = not self.direct
        """Small writes land in the page cache and return within microseconds (no O_DIRECT):
        the ring thread may run them itself rather than pay for a hand-off to a worker.  An
        image whose I/O can take as long as the medium's latency says False."""

    def express_fd(self, write: bool = True) -> int | None:
        """The descriptor the express lane may ``pwritev``/``preadv`` itself, or None.

        Only a plain image in the page cache qualifies: the lane runs on the ring thread, so a
        slow medium would stall the ring, and a subclass (fault injection, a cluster leg) puts
        logic between the caller and the fd that the lane must not skip -- a subclass is
        refused unless it overrides this on purpose.  A frozen image is
        never offered for writing (``write``): the freeze that guards a split copy holds for
        the lane too.
        """
        if type(self) is not Image or not self.fast or self._closed or (write and self.frozen):
            return None
        return self.fd

    def freeze(self) -> None:
        """Refuse every write from now on (A after a split: it must never change again).

        Enforced here, at the lowest layer, so no bug above can quietly modify a point-in-time
        copy: a write to a frozen image raises :class:`FrozenImageError` (a StoreError).
        """
        self.frozen = True

    def thaw(self) -> None:
        """Allow writes again (a rejoin brings A back into the mirror)."""
        self.frozen = False

    def _check_writable(self, what: str) -> None:
        if self.frozen:
            raise FrozenImageError(f"{what} refused: image {self.path} is frozen (split copy)",
                                   path=self.path)

    # -- data ------------------------------------------------------------------------------
    def readv(self, offset: int, iov: Sequence[memoryview]) -> None:
        """Fill ``iov`` from the image at ``offset``; past the end of a file reads as zeros."""
        want = sum(len(v) for v in iov)
        pending: Sequence[memoryview] = iov
        pos = offset
        while want > 0:
            try:
                n = os.preadv(self.fd, pending, pos)
            except InterruptedError:
                continue
            except OSError as exc:
                raise StoreError(f"read of {want} bytes at {pos} from {self.path} failed: "
                                 f"{exc.strerror}", kind="read", path=self.path,
                                 errno=exc.errno) from exc
            if n == 0:  # end of file: a sparse tail reads as zeros
                for view in pending:
                    view[:] = _ZERO_CHUNK[: len(view)] if len(view) <= len(_ZERO_CHUNK) else \
                        bytes(len(view))
                return
            want -= n
            pos += n
            if want:
                pending = _advance(pending, n)

    def writev(self, offset: int, iov: Sequence[memoryview]) -> None:
        """Write all of ``iov`` to the image at ``offset``."""
        if self.frozen:
            self._check_writable("write")
        want = len(iov[0]) if len(iov) == 1 else sum(len(v) for v in iov)
        pending: Sequence[memoryview] = iov
        pos = offset
        while want > 0:
            try:
                n = os.pwritev(self.fd, pending, pos)
            except InterruptedError:
                continue
            except OSError as exc:
                raise StoreError(f"write of {want} bytes at {pos} to {self.path} failed: "
                                 f"{exc.strerror}", kind="write", path=self.path,
                                 errno=exc.errno) from exc
            if n == 0:
                raise StoreError(f"write at {pos} to {self.path} made no progress",
                                 kind="write", path=self.path, errno=errno_mod.EIO)
            want -= n
            pos += n
            if want:
                pending = _advance(pending, n)

    def flush(self) -> None:
        """Make every write so far durable (fdatasync)."""
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise StoreError(f"fdatasync of {self.path} failed: {exc.strerror}", kind="flush",
                             path=self.path, errno=exc.errno) from exc

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read back as zeros, deallocating where possible.

        Files get a punched hole (space comes back, reads return zeros); block devices get
        BLKZEROOUT (which the kernel turns into WRITE ZEROES or UNMAP where the device can).
        Where neither works, zeros are written in 1 MiB chunks.
        """
        if length <= 0:
            return
        self._check_writable("zeroing")
        try:
            if self.is_block_device:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("<QQ", offset, length))
                return
            if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                          length) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno_mod.EOPNOTSUPP, errno_mod.ENOSYS, errno_mod.EINVAL):
                raise OSError(err, os.strerror(err))
        except OSError as exc:
            if exc.errno not in (errno_mod.EOPNOTSUPP, errno_mod.ENOTTY, errno_mod.EINVAL):
                raise StoreError(f"zeroing {length} bytes at {offset} of {self.path} failed: "
                                 f"{exc.strerror}", kind="write", path=self.path,
                                 errno=exc.errno) from exc
        self.fill_zeroes(offset, length)

    def fill_zeroes(self, offset: int, length: int) -> None:
        """Write zeros over ``[offset, offset+length)``, 1 MiB at a time: the fallback when a
        discard or a hole punch fails (the range must still read back as zeros)."""
        zero = memoryview(_ZERO_CHUNK)
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(zero), end - pos)
            self.writev(pos, [zero[:n]])
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads back as zeros afterwards (we report LBPRZ)."""
        self.write_zeroes(offset, length)

    @classmethod
    def open(cls, name: str, access: Any = None, *, readonly: bool = False,
             direct: bool = False) -> Image:
        """Open a leg of this kind (see :func:`open_image`); a file or block device needs no
        ``access``."""
        del access
        return cls(name, readonly=readonly, direct=direct)

    def reopen(self, path: str | None = None) -> Image:
        """A new handle on ``path`` (default: this image), opened the way this one was.

        The mirror's repair reopens a failed leg (or its replacement) through this, so it need
        not know whether a leg is a file, a block device or an RBD image: the registry picks
        the class for the name (:func:`open_image`).
        """
        return open_image(path or self.path, self.access, readonly=self.readonly,
                          direct=self.direct)

    def close(self) -> None:
        """Close the image; safe to call twice."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            os.close(self.fd)

    def __repr__(self) -> str:
        return f"Image({self.path!r}, size={self.size})"


#: Which class opens a leg name, like rtslib-fb's ``so_mapping``: (name prefix, module, class).
#: A name no prefix matches is a file or block device (:class:`Image`).  The module is imported
#: when a name of its kind is first opened, so this module imports none of the kinds it lists
#: (they import it: each derives from :class:`Image`) and hosts without librbd never load it.
IMAGE_KINDS: tuple[tuple[str, str, str], ...] = (
    ("rbd/", "targetmirror.store.rbd", "RbdImage"),
)


def image_class(name: str) -> type[Image]:
    """The class that opens leg ``name``."""
    for prefix, module, cls_name in IMAGE_KINDS:
        if name.startswith(prefix):
            cls: type[Image] = getattr(importlib.import_module(module), cls_name)
            return cls
    return Image


def open_image(name: str, access: Any = None, *, readonly: bool = False,
               direct: bool = False) -> Image:
    """Open a leg by name: an RBD image for ``rbd/...`` (``access`` says how to reach its
    cluster), else a file or block device (``direct``: O_DIRECT)."""
    return image_class(name).open(name, access, readonly=readonly, direct=direct)
