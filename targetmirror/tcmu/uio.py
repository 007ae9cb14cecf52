"""Finding TCMU devices in sysfs, opening ``/dev/uioN``, and the device's configfs directory.

This is the only module of ``targetmirror.tcmu`` that makes syscalls on a device; the ring
itself is pure code (``ring.py``).  The sysfs, ``/dev`` and configfs roots are parameters so the
discovery and configfs parsing can be tested on a fake tree.

Facts this code relies on (see the project's protocol notes):

* A TCMU device appears as ``/sys/class/uio/uioN`` whose ``name`` is
  ``tcm-user/<hba>/<dev>/<subtype>/<cfgstring>`` — the last part is the backstore's
  ``dev_config`` and may itself contain ``/``.
* ``maps/map0/size`` is the exact size to ``mmap`` (hex text); the kernel refuses any other size.
* ``/dev/uioN`` can be opened once.  A 4-byte ``read`` waits for an event (new entries), a
  4-byte ``write`` makes the kernel reap completions.  ``EIO`` means the device is gone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import select
from dataclasses import dataclass
from pathlib import Path

from targetmirror.errors import DeviceError, RingError
from targetmirror.tcmu.ring import Ring, WritableBuffer

__all__ = [
    "ConfigfsDevice",
    "UioDevice",
    "UioInfo",
    "find_device",
    "find_devices",
    "parse_info_size",
    "parse_uio_name",
]

log = logging.getLogger(__name__)

UIO_PREFIX = "tcm-user"
DEFAULT_SUBTYPE = "mirror"

_UIO_DIR = re.compile(r"uio(\d+)")
_NOTIFY = bytes(4)


@dataclass(frozen=True, slots=True)
class UioInfo:
    """One TCMU device as sysfs describes it."""

    name: str
    """The full uio name, ``tcm-user/<hba>/<dev>/<subtype>/<cfgstring>``."""
    minor: int
    hba: int
    """The N of the configfs HBA directory ``user_N``."""
    dev_name: str
    subtype: str
    """Text before the first ``/`` of the dev_config ("" if the device has no dev_config)."""
    cfgstring: str
    """Handler configuration: the rest of dev_config after ``<subtype>/`` (may contain '/')."""
    map_size: int
    dev_path: str


def parse_uio_name(name: str) -> tuple[int, str, str, str] | None:
    """Split a uio name into ``(hba, dev_name, subtype, cfgstring)``; None if not TCMU's.

    Only the first three separators are structural: the device name cannot contain ``/`` (it
    is a configfs directory) but the handler's cfgstring can, e.g. ``mirror/a.img|b.img`` with
    absolute paths.
    """
    parts = name.split("/", 3)
    if len(parts) < 3 or parts[0] != UIO_PREFIX:
        return None
    hba_text, dev_name = parts[1], parts[2]
    if not hba_text.isdigit() or not dev_name:
        return None
    subtype, _, cfgstring = (parts[3] if len(parts) == 4 else "").partition("/")
    return int(hba_text), dev_name, subtype, cfgstring


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="surrogateescape")


def _info_from_dir(entry: Path, subtype: str | None, dev_root: str) -> UioInfo | None:
    match = _UIO_DIR.fullmatch(entry.name)
    if match is None:
        return None
    try:
        name = _read_text(entry / "name").rstrip("\n")
    except OSError:
        return None  # not a uio device, or it vanished while we scanned
    parsed = parse_uio_name(name)
    if parsed is None:
        return None
    hba, dev_name, dev_subtype, cfgstring = parsed
    if subtype is not None and dev_subtype != subtype:
        return None
    try:
        map_size = int(_read_text(entry / "maps" / "map0" / "size").strip(), 0)
    except OSError:
        return None  # removed between reading name and size
    except ValueError as exc:
        raise DeviceError(f"{entry}: unreadable map0 size: {exc}") from exc
    minor = int(match.group(1))
    return UioInfo(
        name=name,
        minor=minor,
        hba=hba,
        dev_name=dev_name,
        subtype=dev_subtype,
        cfgstring=cfgstring,
        map_size=map_size,
        dev_path=os.path.join(dev_root, f"uio{minor}"),
    )


def find_devices(
    subtype: str | None = DEFAULT_SUBTYPE,
    sysfs_root: str | os.PathLike[str] = "/sys",
    dev_root: str = "/dev",
) -> list[UioInfo]:
    """All TCMU devices whose subtype is *subtype* (None: every TCMU device), by minor.

    Devices that disappear during the scan are skipped silently: that is a normal race with
    the administrator deleting a backstore, not an error.
    """
    base = Path(sysfs_root) / "class" / "uio"
    try:
        entries = list(base.iterdir())
    except FileNotFoundError:
        return []  # no uio module loaded: no devices
    except OSError as exc:
        raise DeviceError(f"cannot list {base}: {exc}") from exc
    found = [info for e in entries if (info := _info_from_dir(e, subtype, dev_root)) is not None]
    found.sort(key=lambda i: i.minor)
    return found


def find_device(
    minor: int,
    sysfs_root: str | os.PathLike[str] = "/sys",
    dev_root: str = "/dev",
) -> UioInfo:
    """The TCMU device ``uio<minor>`` (e.g. the MINOR of a netlink ADDED_DEVICE event)."""
    info = _info_from_dir(Path(sysfs_root) / "class" / "uio" / f"uio{minor}", None, dev_root)
    if info is None:
        raise DeviceError(f"uio{minor} is not a TCMU device")
    return info


class UioDevice:
    """An open ``/dev/uioN`` with its map and the :class:`Ring` over it.

    Use :meth:`open`; the constructor takes already-open resources (tests pass a socketpair
    and a bytearray).  ``close`` is idempotent and never raises for a map that is still in use.
    """

    def __init__(self, info: UioInfo, fd: int, buf: WritableBuffer) -> None:
        """Adopt *fd* and *buf*; raises RingError (after closing neither) on a bad mailbox."""
        self.info = info
        self._fd = fd
        self._buf: WritableBuffer | None = buf
        self.ring = Ring(buf)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)

    @classmethod
    def open(cls, info: UioInfo) -> UioDevice:
        """Open and map the device; DeviceError if that fails, RingError on a bad mailbox."""
        try:
            fd = os.open(info.dev_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            hint = " (already opened by another handler?)" if exc.errno == errno.EBUSY else ""
            raise DeviceError(f"cannot open {info.dev_path}: {exc}{hint}") from exc
        try:
            buf = mmap.mmap(
                fd, info.map_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
            )
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise DeviceError(
                f"cannot map {info.map_size} bytes of {info.dev_path}: {exc}"
            ) from exc
        try:
            return cls(info, fd, buf)
        except RingError:
            buf.close()
            os.close(fd)
            raise

    def fileno(self) -> int:
        """The uio fd, for an external poll loop (readable = new entries may be queued)."""
        return self._fd

    def lane_fd(self) -> int:
        """The uio fd for the express lane's wait loop, which polls it, reads the event count
        (4 bytes) and notifies (4 bytes) itself, in C (``targetmirror/express``)."""
        return self._fd

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to *timeout* seconds (None: forever) for a kernel event; True if one came.

        A False return may also be a spurious wake-up; callers just fetch anyway or loop.
        Raises DeviceError when the device has been removed (``EIO``).
        """
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        if not self._poll.poll(ms):  # EINTR is retried by Python (PEP 475)
            return False
        return self.ack()

    def ack(self) -> bool:
        """Consume the event count after a ``poll`` said the fd is readable; True if read.

        The ring loop calls this after its own ``poll``: :meth:`wait` with a zero timeout
        would poll a second time first, one syscall per ring wake-up for nothing, and under
        the lab's emulated CPU a syscall is dear.
        """
        try:
            data = os.read(self._fd, 4)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise DeviceError(f"{self.info.dev_path}: device removed") from exc
            raise DeviceError(f"{self.info.dev_path}: read failed: {exc}") from exc
        if len(data) != 4:
            raise DeviceError(f"{self.info.dev_path}: short event read ({len(data)} bytes)")
        return True

    def notify(self) -> None:
        """Tell the kernel to reap completions (once per batch: it is an expensive syscall)."""
        try:
            n = os.write(self._fd, _NOTIFY)
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise DeviceError(f"{self.info.dev_path}: device removed") from exc
            raise DeviceError(f"{self.info.dev_path}: notify failed: {exc}") from exc
        if n != 4:
            raise DeviceError(f"{self.info.dev_path}: short notify write ({n} bytes)")

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Release the ring's views, unmap, close the fd.  Idempotent.

        If a caller still holds a view derived from a command's iovecs, the map cannot be
        closed now; it is then unmapped when the last view dies, and the kernel keeps the
        device "open" until then (a re-open gets EBUSY), which is logged.
        """
        if self._fd < 0:
            return
        self.ring.release()
        buf, self._buf = self._buf, None
        if isinstance(buf, mmap.mmap):
            try:
                buf.close()
            except BufferError:
                log.warning(
                    "%s: views of the map are still alive; it stays mapped until they are freed",
                    self.info.dev_path,
                )
        with contextlib.suppress(KeyError, ValueError):
            self._poll.unregister(self._fd)
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        except OSError as exc:
            log.warning("%s: close failed: %s", self.info.dev_path, exc)

    def __enter__(self) -> UioDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# configfs

_INFO_SIZE = re.compile(r"(?<![A-Za-z])Size:\s*(\d+)")


def parse_info_size(text: str) -> int:
    """The backstore size from a configfs ``info`` text.

    ``info`` lists ``SectorSize: 512`` before the TCMU part's ``Size: <bytes>``; only a
    ``Size:`` that is a field of its own (not the tail of another name) counts.
    """
    match = _INFO_SIZE.search(text)
    if match is None:
        raise DeviceError("no 'Size:' field in configfs info")
    return int(match.group(1))


class ConfigfsDevice:
    """The configfs directory ``target/core/user_<hba>/<dev>`` of one TCMU backstore."""

    def __init__(
        self, hba: int, dev_name: str, root: str | os.PathLike[str] = "/sys/kernel/config"
    ) -> None:
        self.path = Path(root) / "target" / "core" / f"user_{hba}" / dev_name

    @classmethod
    def for_device(
        cls, info: UioInfo, root: str | os.PathLike[str] = "/sys/kernel/config"
    ) -> ConfigfsDevice:
        return cls(info.hba, info.dev_name, root)

    def _read(self, rel: str) -> str:
        try:
            return _read_text(self.path / rel)
        except OSError as exc:
            raise DeviceError(f"cannot read {self.path / rel}: {exc}") from exc

    def _read_int(self, rel: str) -> int:
        text = self._read(rel).strip()
        try:
            return int(text, 0)
        except ValueError as exc:
            raise DeviceError(f"{self.path / rel}: not a number: {text!r}") from exc

    def _write(self, rel: str, value: str) -> None:
        try:
            (self.path / rel).write_text(value, encoding="ascii")
        except OSError as exc:
            raise DeviceError(f"cannot write {value!r} to {self.path / rel}: {exc}") from exc

    def unit_serial(self) -> str:
        """The T10 unit serial (``wwn/vpd_unit_serial`` reads ``T10 VPD Unit Serial Number: X``)."""
        text = self._read("wwn/vpd_unit_serial").strip()
        head, sep, tail = text.partition(":")
        return tail.strip() if sep and "Serial" in head else text

    def hw_max_sectors(self) -> int:
        return self._read_int("attrib/hw_max_sectors")

    def hw_block_size(self) -> int:
        return self._read_int("attrib/hw_block_size")

    def write_cache(self) -> bool:
        return self._read_int("attrib/emulate_write_cache") != 0

    def size(self) -> int:
        """Backstore size in bytes, from ``info``."""
        return parse_info_size(self._read("info"))

    def block(self, blocked: bool = True) -> None:
        """``action/block_dev``: 1 completes finished I/O and makes new commands wait."""
        self._write("action/block_dev", "1" if blocked else "0")

    def reset_ring(self, mode: int = 1) -> None:
        """``action/reset_ring``: fail in-flight commands (1: retryable BUSY, 2: CHECK
        CONDITION) and reset head and tail to 0.  Only while blocked; then ``Ring.reset()``."""
        if mode not in (1, 2):
            raise ValueError(f"reset_ring mode must be 1 or 2, not {mode}")
        self._write("action/reset_ring", str(mode))
