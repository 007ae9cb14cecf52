"""The control API: protocol errors change nothing, a real socket answers, permissions hold."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest

from targetmirror.daemon.control import ControlServer, call, handle_line
from targetmirror.errors import MirrorError, TargetMirrorError


def handlers():
    calls = []

    def split(req):
        calls.append(req)
        if req.get("names") == ["bad"]:
            raise MirrorError("mirror bad is split, not mirrored")
        return {"split": req["names"]}

    return {"split": split, "ping": lambda req: {"pong": True}}, calls


@pytest.mark.parametrize("line, code", [
    (b"not json", "protocol"),
    (b"[1, 2]", "protocol"),
    (b'{"op": "ping"}', "protocol"),            # no version
    (b'{"v": 2, "op": "ping"}', "protocol"),    # future version
    (b'{"v": 1, "op": "format-disk"}', "protocol"),
    (b'{"v": 1}', "protocol"),
    (b'{"v": 1, "op": "split", "names": ["bad"]}', "mirror"),
    (b"\xff\xfe", "protocol"),
])
def test_bad_requests_get_stable_error_codes(line, code):
    table, calls = handlers()
    resp = handle_line(line, table)
    assert resp["v"] == 1 and resp["ok"] is False
    assert resp["error"]["code"] == code
    assert resp["error"]["message"]
    # only the well-formed split reached its handler
    assert len(calls) == (1 if code == "mirror" else 0)


def test_socket_round_trip_and_permissions(tmp_path):
    path = str(tmp_path / "run" / "control.sock")
    table, _calls = handlers()
    server = ControlServer(path, table, allowed_uids=(os.getuid(),))
    server.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert call(path, "split", names=["m1", "m2"]) == {"split": ["m1", "m2"]}
        with pytest.raises(TargetMirrorError) as err:
            call(path, "split", names=["bad"])
        assert err.value.code == "mirror"
        # garbage then a valid request on the same connection: the garbage is answered with an
        # error and the connection keeps working
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(b"garbage\n" + json.dumps({"v": 1, "op": "ping"}).encode() + b"\n")
            data = b""
            while data.count(b"\n") < 2:
                data += s.recv(4096)
        first, second = (json.loads(x) for x in data.splitlines()[:2])
        assert first["error"]["code"] == "protocol"
        assert second == {"v": 1, "ok": True, "result": {"pong": True}}
        # an oversized request is refused and the connection closed
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(b"x" * (70 * 1024))
            reply = s.recv(4096)
        assert json.loads(reply.splitlines()[0])["error"]["code"] == "protocol"
    finally:
        server.close()
    assert not os.path.exists(path)


def test_other_uids_are_refused(tmp_path):
    path = str(tmp_path / "control.sock")
    table, _calls = handlers()
    server = ControlServer(path, table, allowed_uids=(os.getuid() + 12345,))
    server.start()
    try:
        with pytest.raises(TargetMirrorError) as err:
            call(path, "ping")
        assert err.value.code == "permission"
    finally:
        server.close()


def test_unreachable_daemon_is_named(tmp_path):
    with pytest.raises(TargetMirrorError, match="is it running"):
        call(str(tmp_path / "nope.sock"), "ping")
