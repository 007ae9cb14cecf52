"""A mirror leg on a Ceph RBD image, behind the same interface as :class:`Image`.

A leg is named ``rbd/POOL/IMAGE`` or ``rbd/POOL/NAMESPACE/IMAGE`` (``@SNAP`` appended for a
read-only snapshot); how to reach the cluster -- its ceph.conf, the cephx client name and
keyring, the per-operation timeout -- is a :class:`CephAccess`.  The mirror, the SCSI layer and
the daemon see an :class:`Image` (this class derives from it and overrides every call that
touches data), so split, range locks, bitmaps, rejoin and verify do not know what a leg is.

I/O goes through librbd (Debian's python3-rbd; the binding exists only for /usr/bin/python3) with
its aio calls: a transfer is cut into pieces of at most :data:`PIECE` bytes, all issued at once,
and the calling thread waits for every completion.  librbd's callbacks run on its own finisher
thread; they only record the result and set an event, and the *calling* thread copies read data
into the command's iovecs.  So a completion that arrives late (after a timeout was reported) can
never write into a TCMU data area the kernel has since reused.

Failures become :class:`StoreError`: librados is told ``rados_osd_op_timeout`` /
``rados_mon_op_timeout`` / ``client_mount_timeout`` = ``timeout``, so an unreachable cluster
answers ETIMEDOUT instead of blocking forever, and the wait here has its own deadline a little
later as a second guard.  The mirror then fails the leg (degraded mode) and the survivor serves.
librbd's write-back cache is switched off: a write is acknowledged only once the OSDs have it,
and a cache would hide a dead cluster until the next flush.

Mapping of the SCSI operations: FUA and SYNCHRONIZE CACHE -> ``aio_flush``; UNMAP ->
``aio_discard``; WRITE SAME with UNMAP / zeroing -> ``aio_write_zeroes`` (the image reads back
zeros afterwards, as LBPRZ promises).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import functools
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from targetmirror.errors import ConfigError, StoreError
from targetmirror.store.image import Image, open_image

PREFIX = "rbd/"
PIECE = 1 << 20
"""Largest single librbd request; a bigger transfer becomes several requests in flight."""
GRACE = 5.0
"""Seconds past ``timeout`` the waiting thread allows before it gives up on its own."""
DEFAULT_CONF = "/etc/ceph/ceph.conf"
DEFAULT_CLIENT = "admin"
DEFAULT_TIMEOUT = 10
"""Seconds; below the mirror's leg timeout (20 s) and LIO's command timeout (30 s)."""
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,96}")


@dataclass(frozen=True, slots=True)
class CephAccess:
    """How to reach a cluster: conf file, cephx client name (without ``client.``), keyring."""

    conf: str = DEFAULT_CONF
    client: str = DEFAULT_CLIENT
    keyring: str = ""
    """Empty: whatever ceph.conf says (by default /etc/ceph/ceph.client.NAME.keyring)."""
    timeout: int = DEFAULT_TIMEOUT


@dataclass(frozen=True, slots=True)
class RbdName:
    """``rbd/POOL[/NAMESPACE]/IMAGE[@SNAP]`` taken apart."""

    pool: str
    namespace: str
    image: str
    snapshot: str = ""

    def __str__(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        snap = f"@{self.snapshot}" if self.snapshot else ""
        return f"{PREFIX}{self.pool}/{ns}{self.image}{snap}"

    def at(self, snapshot: str) -> RbdName:
        """The same image at ``snapshot`` ("" for the head)."""
        return RbdName(self.pool, self.namespace, self.image, snapshot)


def is_rbd(name: str) -> bool:
    """Does this leg name an RBD image (rather than a file or block device path)?"""
    return name.startswith(PREFIX)


def parse_name(text: str, what: str = "leg") -> RbdName:
    """Parse ``rbd/POOL[/NAMESPACE]/IMAGE[@SNAP]``; :class:`ConfigError` names what is wrong."""
    if not is_rbd(text):
        raise ConfigError(f"{what}: expected rbd/POOL/IMAGE or rbd/POOL/NAMESPACE/IMAGE, "
                          f"got {text!r}")
    body, _, snap = text[len(PREFIX):].partition("@")
    parts = body.split("/")
    if len(parts) not in (2, 3):
        raise ConfigError(f"{what}: expected rbd/POOL/IMAGE or rbd/POOL/NAMESPACE/IMAGE, "
                          f"got {text!r}")
    for part in [*parts, *([snap] if snap or "@" in text else [])]:
        if not _NAME.fullmatch(part):
            raise ConfigError(f"{what}: {part!r} in {text!r} is not a valid pool, namespace, "
                              "image or snapshot name (1-96 letters, digits, '_', '.', '-')")
    if len(parts) == 2:
        return RbdName(parts[0], "", parts[1], snap)
    return RbdName(parts[0], parts[1], parts[2], snap)


class _Waiter:
    """Collects the completions of one call's librbd requests (runs on librbd's thread)."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.results: list[int] = []
        self.data: dict[int, bytes] = {}
        self.done = threading.Event()
        self._mu = threading.Lock()

    def callback(self, index: int) -> Callable[..., None]:
        def cb(completion: Any, data: bytes | None = None) -> None:
            rv = int(completion.get_return_value())
            with self._mu:
                self.results.append(rv)
                if data is not None:
                    self.data[index] = data
                self.left -= 1
                if self.left == 0:
                    self.done.set()
        return cb


def _connect(access: CephAccess, what: str) -> Any:
    import rados

    try:
        cluster = rados.Rados(conffile=access.conf, rados_id=access.client)
        t = str(access.timeout)
        for key, value in (("rados_osd_op_timeout", t), ("rados_mon_op_timeout", t),
                           ("client_mount_timeout", t), ("rbd_cache", "false")):
            cluster.conf_set(key, value)
        if access.keyring:
            cluster.conf_set("keyring", access.keyring)
        cluster.connect(timeout=access.timeout)
    except rados.Error as exc:
        raise StoreError(f"cannot connect to the Ceph cluster of {what} (conf {access.conf}, "
                         f"client.{access.client}): {exc}", kind="open", path=what,
                         errno=getattr(exc, "errno", None) or errno_mod.EIO) from exc
    return cluster


class RbdImage(Image):
    """One RBD image (or a snapshot of it, read-only) opened through librbd."""

    def __init__(self, name: str, access: CephAccess | None = None, *,
                 readonly: bool = False, direct: bool = False) -> None:
        import rados
        import rbd

        self.rbd_name = parse_name(name)
        self.access = access or CephAccess()
        self.path = str(self.rbd_name)
        self.readonly = readonly or bool(self.rbd_name.snapshot)
        self.direct = False
        self.is_block_device = False
        self.fd = -1
        self._cluster = _connect(self.access, self.path)
        try:
            self._ioctx = self._cluster.open_ioctx(self.rbd_name.pool)
            if self.rbd_name.namespace:
                self._ioctx.set_namespace(self.rbd_name.namespace)
            self._image = rbd.Image(self._ioctx, self.rbd_name.image,
                                    snapshot=self.rbd_name.snapshot or None,
                                    read_only=self.readonly)
            self.size = int(self._image.size())
        except (rados.Error, rbd.Error) as exc:
            self._cluster.shutdown()
            raise StoreError(f"cannot open RBD image {self.path}: {exc}", kind="open",
                             path=self.path,
                             errno=getattr(exc, "errno", None) or errno_mod.EIO) from exc
        self._closed = False
        self._close_lock = threading.Lock()
        self.frozen = False
        self.fast = False
        """Every call is a network round trip: never run on the ring thread."""

    @classmethod
    def open(cls, name: str, access: Any = None, *, readonly: bool = False,
             direct: bool = False) -> Image:
        """Open an RBD leg (see :func:`targetmirror.store.image.open_image`); librbd has no
        O_DIRECT: ``direct`` is ignored."""
        del direct
        return cls(name, access, readonly=readonly)

    # -- plumbing ------------------------------------------------------------------------------
    def _wait(self, w: _Waiter, kind: str, what: str) -> None:
        if not w.done.wait(self.access.timeout + GRACE):
            raise StoreError(f"{what} on {self.path}: no answer from the cluster within "
                             f"{self.access.timeout + GRACE:.0f} s", kind=kind, path=self.path,
                             errno=errno_mod.ETIMEDOUT)
        bad = [rv for rv in w.results if rv < 0]
        if bad:
            code = -bad[0]
            raise StoreError(f"{what} on {self.path} failed: "
                             f"{errno_mod.errorcode.get(code, str(code))}", kind=kind,
                             path=self.path, errno=code)

    def _issue(self, kind: str, what: str, calls: Sequence[Callable[..., Any]]) -> _Waiter:
        """Start every call (each gets its completion callback last), wait for them all."""
        import rbd

        w = _Waiter(len(calls))
        for i, call in enumerate(calls):
            try:
                call(w.callback(i))
            except rbd.Error as exc:
                # already-issued pieces still complete into w; nobody waits for them
                raise StoreError(f"{what} on {self.path} failed: {exc}", kind=kind,
                                 path=self.path,
                                 errno=getattr(exc, "errno", None) or errno_mod.EIO) from exc
        self._wait(w, kind, what)
        return w

    # -- data ----------------------------------------------------------------------------------
    def readv(self, offset: int, iov: Sequence[memoryview]) -> None:
        """Fill ``iov`` from the image at ``offset`` (pieces read in parallel)."""
        want = sum(len(v) for v in iov)
        if want == 0:
            return
        pieces = [(pos, min(PIECE, offset + want - pos)) for pos in range(offset, offset + want,
                                                                          PIECE)]
        img = self._image
        calls = [functools.partial(img.aio_read, p, n) for p, n in pieces]
        w = self._issue("read", f"read of {want} bytes at {offset}", calls)
        data = b"".join(w.data[i] for i in range(len(pieces)))
        if len(data) < want:  # past the end: zeros, as for a file
            data += bytes(want - len(data))
        pos = 0
        for view in iov:
            n = len(view)
            view[:] = data[pos:pos + n]
            pos += n

    def writev(self, offset: int, iov: Sequence[memoryview]) -> None:
        """Write all of ``iov`` at ``offset``; returns when the OSDs have every piece."""
        if self.frozen:
            self._check_writable("write")
        data = bytes(iov[0]) if len(iov) == 1 else b"".join(iov)
        if not data:
            return
        img = self._image
        calls = [functools.partial(img.aio_write, data[p:p + PIECE], offset + p)
                 for p in range(0, len(data), PIECE)]
        self._issue("write", f"write of {len(data)} bytes at {offset}", calls)

    def flush(self) -> None:
        """FUA and SYNCHRONIZE CACHE: everything written so far is durable in the cluster."""
        img = self._image
        self._issue("flush", "flush", [lambda cb: img.aio_flush(cb)])

    def write_zeroes(self, offset: int, length: int) -> None:
        """WRITE SAME with UNMAP: the range reads back zeros (librbd may deallocate it)."""
        if length <= 0:
            return
        self._check_writable("zeroing")
        img = self._image
        self._issue("write", f"zeroing {length} bytes at {offset}",
                    [lambda cb: img.aio_write_zeroes(offset, length, cb)])

    def discard(self, offset: int, length: int) -> None:
        """UNMAP.  librbd's discard may leave partial objects unzeroed (it only promises to
        drop whole objects), so to keep LBPRZ true this zeroes with write_zeroes, which
        deallocates whole objects and zeroes the edges."""
        self.write_zeroes(offset, length)

    # -- snapshots (claim 5's point-in-time copy, kept in the cluster) --------------------------
    def create_snapshot(self, snap: str) -> None:
        """Take snapshot ``snap`` of this image (A after a split: it is frozen, so the
        snapshot holds exactly the split instant's data)."""
        self._snap_call("create snapshot", lambda: self._image.create_snap(snap))

    def remove_snapshot(self, snap: str) -> None:
        self._snap_call("remove snapshot", lambda: self._image.remove_snap(snap))

    def snapshots(self) -> list[dict[str, Any]]:
        """Snapshots of this image, oldest first: ``{"name", "id", "size"}``."""
        out: list[dict[str, Any]] = []

        def collect() -> None:
            for s in self._image.list_snaps():
                out.append({"name": s["name"], "id": int(s["id"]), "size": int(s["size"])})
        self._snap_call("list snapshots", collect)
        return sorted(out, key=lambda s: int(s["id"]))

    def metadata(self) -> dict[str, str]:
        """The image's key/value metadata (RBD image-meta), kept in the cluster."""
        out: dict[str, str] = {}

        def collect() -> None:
            out.update(dict(self._image.metadata_list()))
        self._snap_call("list metadata", collect)
        return out

    def set_metadata(self, key: str, value: str) -> None:
        self._snap_call("set metadata", lambda: self._image.metadata_set(key, value))

    def remove_metadata(self, key: str) -> None:
        self._snap_call("remove metadata", lambda: self._image.metadata_remove(key))

    def _snap_call(self, what: str, fn: Callable[[], None]) -> None:
        import rbd

        try:
            fn()
        except rbd.Error as exc:
            raise StoreError(f"{what} on {self.path} failed: {exc}", kind="snapshot",
                             path=self.path,
                             errno=getattr(exc, "errno", None) or errno_mod.EIO) from exc

    def close(self) -> None:
        """Close image, pool context and cluster connection; safe to call twice."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        for fn in (self._image.close, self._ioctx.close, self._cluster.shutdown):
            with contextlib.suppress(Exception):  # closing after a failure: nothing to do
                fn()

    def __repr__(self) -> str:
        return f"RbdImage({self.path!r}, size={self.size})"


__all__ = ["CephAccess", "RbdImage", "RbdName", "is_rbd", "open_image", "parse_name"]
