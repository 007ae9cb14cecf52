"""The TCM-USER generic netlink family: device added / removed / reconfigured events.

The kernel multicasts an event on the family's ``config`` group when a TCMU backstore is
enabled (ADDED_DEVICE), deleted (REMOVED_DEVICE) or has ``dev_config`` / ``dev_size`` /
``emulate_write_cache`` changed while enabled (RECONFIG_DEVICE).  Once any process has set the
module-global "kernel waits for replies" feature (tcmu-runner does at start-up), the kernel
blocks the configfs writer until it gets the matching ``*_DONE`` with a status, unless the
device was created with ``nl_reply_supported=-1``.  Listening and replying here lets our daemon
coexist with that setting instead of hanging ``enable`` in D state.

Split, sans-I/O where it helps testing:

* :func:`decode_events` and :func:`encode_reply` turn bytes into :class:`NetlinkEvent` and back,
  using pyroute2's generic netlink message class; they need no kernel.
* :class:`TcmuNetlink` resolves the family through pyroute2 (``GenericNetlinkSocket.bind`` — an
  API present from 0.7.x, which the lab guest ships, to today) and then does its own I/O on a
  plain ``AF_NETLINK`` socket, so nothing depends on how a pyroute2 version buffers or threads.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
from dataclasses import dataclass
from typing import Any

from targetmirror.errors import DeviceError
from targetmirror.tcmu import layout as L

try:
    from pyroute2.netlink import NLM_F_REQUEST, genlmsg
except ImportError:  # pragma: no cover - pyroute2 is a dependency; keep the module importable
    genlmsg = object
    NLM_F_REQUEST = 1

__all__ = [
    "NetlinkEvent",
    "TcmuGenlMessage",
    "TcmuNetlink",
    "decode_events",
    "encode_event",
    "encode_reply",
    "resolve_family",
]

log = logging.getLogger(__name__)

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NLMSG_ERROR = 2
_NLMSGHDR = struct.Struct("<IHHII")
_NLMSGERR = struct.Struct("<i")

_EVENT_CMDS = frozenset({L.CMD_ADDED_DEVICE, L.CMD_REMOVED_DEVICE, L.CMD_RECONFIG_DEVICE})
_DONE_OF = {
    L.CMD_ADDED_DEVICE: L.CMD_ADDED_DEVICE_DONE,
    L.CMD_REMOVED_DEVICE: L.CMD_REMOVED_DEVICE_DONE,
    L.CMD_RECONFIG_DEVICE: L.CMD_RECONFIG_DEVICE_DONE,
}


class TcmuGenlMessage(genlmsg):  # type: ignore[misc]
    """pyroute2 description of a TCM-USER message (attribute order = kernel enum order)."""

    nla_map = (
        ("TCMU_ATTR_UNSPEC", "none"),
        ("TCMU_ATTR_DEVICE", "asciiz"),
        ("TCMU_ATTR_MINOR", "uint32"),
        ("TCMU_ATTR_PAD", "none"),
        ("TCMU_ATTR_DEV_CFG", "asciiz"),
        ("TCMU_ATTR_DEV_SIZE", "uint64"),
        ("TCMU_ATTR_WRITECACHE", "uint8"),
        ("TCMU_ATTR_CMD_STATUS", "int32"),
        ("TCMU_ATTR_DEVICE_ID", "uint32"),
        ("TCMU_ATTR_SUPP_KERN_CMD_REPLY", "uint8"),
    )


@dataclass(frozen=True, slots=True)
class NetlinkEvent:
    """One kernel event about a TCMU device."""

    cmd: int
    """``layout.CMD_ADDED_DEVICE``, ``CMD_REMOVED_DEVICE`` or ``CMD_RECONFIG_DEVICE``."""
    device: str
    """The uio name, ``tcm-user/<hba>/<dev>/<subtype>/<cfgstring>``."""
    minor: int
    """The uio minor: the device is ``/dev/uio<minor>``."""
    device_id: int
    """The kernel's se_device index; the reply must carry it back."""
    dev_cfg: str | None = None
    """RECONFIG: the new dev_config."""
    dev_size: int | None = None
    """RECONFIG: the new size in bytes."""
    writecache: bool | None = None
    """RECONFIG: the new emulate_write_cache."""

    @property
    def done_cmd(self) -> int:
        """The ``*_DONE`` command that answers this event."""
        return _DONE_OF[self.cmd]


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.rstrip(b"\0").decode("utf-8", "surrogateescape")
    return str(value)


def decode_events(data: bytes, family_id: int) -> list[NetlinkEvent]:
    """Decode every TCM-USER event in one datagram (which may hold several messages).

    Messages of other families and unknown commands are skipped; an event missing its DEVICE,
    MINOR or DEVICE_ID attribute is logged and skipped (the kernel always sends all three).
    Netlink error messages (answers to our replies) are logged when they carry an error.
    """
    events: list[NetlinkEvent] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            log.warning("truncated netlink message (length %d at %d)", length, off)
            break
        if mtype == NLMSG_ERROR and length >= _NLMSGHDR.size + 4:
            (code,) = _NLMSGERR.unpack_from(data, off + _NLMSGHDR.size)
            if code:
                # Usually the kernel refusing a *_DONE it was not waiting for (the device was
                # made with nl_reply_supported=-1); only worth a debug line.
                log.debug("TCM-USER netlink error reply: %s", errno.errorcode.get(-code, code))
        elif mtype == family_id:
            event = _decode_one(data[off : off + length])
            if event is not None:
                events.append(event)
        off += (length + 3) & ~3
    return events


def _decode_one(raw: bytes) -> NetlinkEvent | None:
    msg = TcmuGenlMessage(raw)
    msg.decode()
    cmd = msg["cmd"]
    if cmd not in _EVENT_CMDS:
        return None
    device = _text(_attr(msg, "TCMU_ATTR_DEVICE"))
    minor = _attr(msg, "TCMU_ATTR_MINOR")
    device_id = _attr(msg, "TCMU_ATTR_DEVICE_ID")
    if device is None or minor is None or device_id is None:
        log.warning("TCM-USER event %d without device/minor/device_id ignored", cmd)
        return None
    writecache = _attr(msg, "TCMU_ATTR_WRITECACHE")
    dev_size = _attr(msg, "TCMU_ATTR_DEV_SIZE")
    return NetlinkEvent(
        cmd=cmd,
        device=device,
        minor=int(minor),
        device_id=int(device_id),
        dev_cfg=_text(_attr(msg, "TCMU_ATTR_DEV_CFG")),
        dev_size=None if dev_size is None else int(dev_size),
        writecache=None if writecache is None else bool(writecache),
    )


def encode_reply(
    family_id: int, done_cmd: int, status: int, device_id: int, seq: int = 0, pid: int = 0
) -> bytes:
    """A ``*_DONE`` message: CMD_STATUS (s32, 0 or -errno) and DEVICE_ID (u32)."""
    if done_cmd not in _DONE_OF.values():
        raise ValueError(f"{done_cmd} is not a *_DONE command")
    msg = TcmuGenlMessage()
    msg["cmd"] = done_cmd
    msg["version"] = L.GENL_VERSION
    msg["attrs"] = [
        ("TCMU_ATTR_CMD_STATUS", status),
        ("TCMU_ATTR_DEVICE_ID", device_id),
    ]
    msg["header"]["type"] = family_id
    msg["header"]["flags"] = NLM_F_REQUEST
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = pid
    msg.encode()
    return bytes(msg.data)


def encode_event(family_id: int, event: NetlinkEvent, seq: int = 0) -> bytes:
    """What the kernel would multicast for *event* (for tests and simulations)."""
    msg = TcmuGenlMessage()
    msg["cmd"] = event.cmd
    msg["version"] = L.GENL_VERSION
    attrs: list[tuple[str, Any]] = [
        ("TCMU_ATTR_DEVICE", event.device),
        ("TCMU_ATTR_MINOR", event.minor),
        ("TCMU_ATTR_DEVICE_ID", event.device_id),
    ]
    if event.dev_cfg is not None:
        attrs.append(("TCMU_ATTR_DEV_CFG", event.dev_cfg))
    if event.dev_size is not None:
        attrs.append(("TCMU_ATTR_DEV_SIZE", event.dev_size))
    if event.writecache is not None:
        attrs.append(("TCMU_ATTR_WRITECACHE", int(event.writecache)))
    msg["attrs"] = attrs
    msg["header"]["type"] = family_id
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def resolve_family() -> tuple[int, int]:
    """``(family_id, config_group_id)`` of TCM-USER, via pyroute2's generic netlink support."""
    try:
        from pyroute2.netlink.generic import GenericNetlinkSocket
    except ImportError as exc:
        raise DeviceError("pyroute2 is not installed; TCM-USER netlink unavailable") from exc
    try:
        gs = GenericNetlinkSocket()
    except OSError as exc:
        raise DeviceError(f"cannot open a generic netlink socket: {exc}") from exc
    try:
        gs.bind(L.GENL_FAMILY, TcmuGenlMessage)
        family_id = int(gs.prid)
        groups = dict(gs.mcast_groups)
    except Exception as exc:  # pyroute2 raises NetlinkError (ENOENT) or version-specific types
        raise DeviceError("TCM-USER netlink family not available") from exc
    finally:
        gs.close()
    group = groups.get(L.GENL_MCGRP_CONFIG)
    if group is None:
        raise DeviceError(f"TCM-USER netlink family has no {L.GENL_MCGRP_CONFIG!r} group")
    return family_id, int(group)


class TcmuNetlink:
    """Listener for TCM-USER events that can answer them.

    ``open()`` raises ``DeviceError("TCM-USER netlink family not available")`` where the
    ``target_core_user`` module is not loaded.  Replies need CAP_NET_ADMIN.
    """

    def __init__(self, sock: socket.socket, family_id: int) -> None:
        """Adopt a socket already subscribed to the config group (tests pass a socketpair)."""
        self._sock = sock
        self.family_id = family_id
        self._seq = 0

    @classmethod
    def open(cls) -> TcmuNetlink:
        family_id, group = resolve_family()
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        except OSError as exc:
            raise DeviceError(f"cannot open a netlink socket: {exc}") from exc
        try:
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except OSError as exc:
            sock.close()
            raise DeviceError(f"cannot join the TCM-USER config group: {exc}") from exc
        return cls(sock, family_id)

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self, timeout: float | None = None) -> list[NetlinkEvent]:
        """Events from one datagram, or [] if none arrived within *timeout* seconds."""
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return []
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # we fell behind; the kernel dropped events
                log.warning("TCM-USER netlink: events lost (ENOBUFS); rescan devices")
                return []
            raise DeviceError(f"netlink receive failed: {exc}") from exc
        return decode_events(data, self.family_id)

    def reply(self, event: NetlinkEvent, status: int = 0) -> None:
        """Send the ``*_DONE`` for *event*: 0 accepts, ``-errno`` makes the configfs write fail."""
        self._seq += 1
        data = encode_reply(self.family_id, event.done_cmd, status, event.device_id, self._seq)
        try:
            self._sock.send(data)
        except OSError as exc:
            raise DeviceError(f"netlink reply failed: {exc}") from exc

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> TcmuNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
