"""TCM-USER netlink messages, checked against byte layouts built by hand (no kernel needed)."""

from __future__ import annotations

import socket
import struct

import pytest

from targetmirror.errors import DeviceError
from targetmirror.tcmu import layout as L
from targetmirror.tcmu import netlink
from targetmirror.tcmu.netlink import NetlinkEvent, TcmuNetlink, decode_events, encode_reply

FAMILY = 0x1E


def nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("<HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def kernel_message(cmd: int, *attrs: bytes, family: int = FAMILY) -> bytes:
    """A message as the kernel's genlmsg_put + nla_put_* would lay it out."""
    body = struct.pack("<BBH", cmd, 2, 0) + b"".join(attrs)
    return struct.pack("<IHHII", 16 + len(body), family, 0, 0, 0) + body


NAME = "tcm-user/3/disk0/mirror//srv/a.img|/srv/b.img"


def added(name: str = NAME, minor: int = 4, dev_id: int = 9) -> bytes:
    return kernel_message(
        L.CMD_ADDED_DEVICE,
        nla(L.ATTR_DEVICE, name.encode() + b"\0"),
        nla(L.ATTR_MINOR, struct.pack("<I", minor)),
        nla(L.ATTR_DEVICE_ID, struct.pack("<I", dev_id)),
    )


def test_decode_added_device() -> None:
    (event,) = decode_events(added(), FAMILY)
    assert event == NetlinkEvent(L.CMD_ADDED_DEVICE, NAME, 4, 9)
    assert event.done_cmd == L.CMD_ADDED_DEVICE_DONE


def test_decode_several_messages_and_skip_foreign_ones() -> None:
    removed = kernel_message(
        L.CMD_REMOVED_DEVICE,
        nla(L.ATTR_DEVICE, b"tcm-user/1/x\0"),
        nla(L.ATTR_MINOR, struct.pack("<I", 0)),
        nla(L.ATTR_DEVICE_ID, struct.pack("<I", 1)),
    )
    foreign = kernel_message(L.CMD_ADDED_DEVICE, family=FAMILY + 1)
    unknown_cmd = kernel_message(L.CMD_SET_FEATURES, family=FAMILY)
    events = decode_events(added() + foreign + unknown_cmd + removed, FAMILY)
    assert [(e.cmd, e.device) for e in events] == [
        (L.CMD_ADDED_DEVICE, NAME),
        (L.CMD_REMOVED_DEVICE, "tcm-user/1/x"),
    ]
    assert events[1].done_cmd == L.CMD_REMOVED_DEVICE_DONE


@pytest.mark.parametrize(
    ("attr", "expected"),
    [
        (nla(L.ATTR_DEV_SIZE, struct.pack("<Q", 1 << 40)), {"dev_size": 1 << 40}),
        (nla(L.ATTR_WRITECACHE, b"\x01"), {"writecache": True}),
        (nla(L.ATTR_DEV_CFG, b"mirror/new|cfg\0"), {"dev_cfg": "mirror/new|cfg"}),
    ],
)
def test_decode_reconfig(attr: bytes, expected: dict[str, object]) -> None:
    msg = kernel_message(
        L.CMD_RECONFIG_DEVICE,
        nla(L.ATTR_DEVICE, NAME.encode() + b"\0"),
        nla(L.ATTR_MINOR, struct.pack("<I", 4)),
        nla(L.ATTR_DEVICE_ID, struct.pack("<I", 9)),
        attr,
    )
    (event,) = decode_events(msg, FAMILY)
    assert event == NetlinkEvent(L.CMD_RECONFIG_DEVICE, NAME, 4, 9, **expected)  # type: ignore[arg-type]
    assert event.done_cmd == L.CMD_RECONFIG_DEVICE_DONE


def test_event_without_minor_is_skipped() -> None:
    msg = kernel_message(L.CMD_ADDED_DEVICE, nla(L.ATTR_DEVICE, b"tcm-user/1/x\0"))
    assert decode_events(msg, FAMILY) == []


def test_truncated_datagram_stops_cleanly() -> None:
    assert decode_events(added()[:-6], FAMILY) == []
    assert decode_events(b"\x01\x02", FAMILY) == []


def test_error_ack_is_not_an_event() -> None:
    err = struct.pack("<IHHII", 36, 2, 0, 1, 0) + struct.pack("<i", -1) + bytes(16)
    assert decode_events(err, FAMILY) == []


def test_encode_reply_layout() -> None:
    data = encode_reply(FAMILY, L.CMD_ADDED_DEVICE_DONE, -2, 9, seq=5)
    expected_body = (
        struct.pack("<BBH", L.CMD_ADDED_DEVICE_DONE, 2, 0)
        + nla(L.ATTR_CMD_STATUS, struct.pack("<i", -2))
        + nla(L.ATTR_DEVICE_ID, struct.pack("<I", 9))
    )
    length, mtype, flags, seq, _pid = struct.unpack_from("<IHHII", data)
    assert (length, mtype, seq) == (len(data), FAMILY, 5)
    assert flags & 1  # NLM_F_REQUEST
    assert data[16:] == expected_body


def test_encode_reply_refuses_event_commands() -> None:
    with pytest.raises(ValueError, match="DONE"):
        encode_reply(FAMILY, L.CMD_ADDED_DEVICE, 0, 1)


def test_encode_event_round_trip() -> None:
    event = NetlinkEvent(L.CMD_RECONFIG_DEVICE, NAME, 2, 3, dev_size=4096, writecache=False)
    assert decode_events(netlink.encode_event(FAMILY, event), FAMILY) == [event]


def test_listener_receives_and_replies_over_a_socketpair() -> None:
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with kernel, TcmuNetlink(ours, FAMILY) as nl:
        assert nl.receive(timeout=0) == []
        kernel.send(added())
        (event,) = nl.receive(timeout=None)
        nl.reply(event, 0)
        reply = kernel.recv(4096)
    assert struct.unpack_from("<H", reply, 4)[0] == FAMILY
    assert reply[16] == L.CMD_ADDED_DEVICE_DONE
    assert reply[20:] == nla(L.ATTR_CMD_STATUS, struct.pack("<i", 0)) + nla(
        L.ATTR_DEVICE_ID, struct.pack("<I", 9)
    )


def test_open_without_the_family_is_a_device_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> tuple[int, int]:
        raise DeviceError("TCM-USER netlink family not available")

    monkeypatch.setattr(netlink, "resolve_family", missing)
    with pytest.raises(DeviceError, match="not available"):
        TcmuNetlink.open()


def test_open_on_this_host() -> None:
    """Where target_core_user is not loaded (CI, this host) open() fails with DeviceError."""
    try:
        nl = TcmuNetlink.open()
    except DeviceError as exc:
        assert "TCM-USER" in str(exc) or "netlink" in str(exc)
    else:  # a machine with the module loaded: the family must have resolved
        assert nl.family_id > 0
        nl.close()
