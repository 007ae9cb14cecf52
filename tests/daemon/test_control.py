"""The control API: protocol errors change nothing, a real socket answers, permissions hold."""

from __future__ import annotations

import json
import os
import socket
import stat
import time

import pytest

from targetmirror.daemon.control import MAX_REQUEST, ControlServer, handle_line
from targetmirror.errors import MirrorError, TargetMirrorError
from targetmirror.protocol import call


def handlers():
    calls = []

    def split(names: list[str], wait: bool = True) -> dict:
        calls.append({"names": names, "wait": wait})
        if names == ["bad"]:
            raise MirrorError("mirror bad is split, not mirrored")
        return {"split": names}

    return {"split": split, "ping": lambda: {"pong": True}}, calls


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


def _server(tmp_path, **kw):
    table, calls = handlers()
    server = ControlServer(str(tmp_path / "control.sock"), table, **kw)
    server.start()
    return server, calls


def _raw(path: str, payload: bytes, *, shut: bool = True) -> bytes:
    """Send raw bytes, optionally half-close, and read until the daemon closes or answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while b"\n" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def test_garbage_on_the_socket_is_answered_and_runs_nothing(tmp_path):
    server, calls = _server(tmp_path)
    try:
        for junk in (b"\x00\xff\xfe garbage\n", b"{" * 5000 + b"\n", b'{"v": 1, "op": 7}\n',
                     b'{"v": 1, "op": "split"}\n'):
            resp = json.loads(_raw(server.path, junk))
            assert resp["ok"] is False and resp["error"]["code"] == "protocol", resp
        assert calls == []  # lacked its names: refused before the handler
        assert call(server.path, "ping") == {"pong": True}
    finally:
        server.close()


def test_huge_request_is_refused_unrun_and_the_connection_closed(tmp_path):
    server, calls = _server(tmp_path)
    try:
        big = b'{"v": 1, "op": "split", "names": ["' + b"x" * (2 * MAX_REQUEST) + b'"]}\n'
        resp = json.loads(_raw(server.path, big, shut=False))
        assert resp["error"]["code"] == "protocol" and "larger than" in resp["error"]["message"]
        assert calls == []
    finally:
        server.close()


def test_truncated_request_is_never_run(tmp_path):
    server, calls = _server(tmp_path, idle_timeout=0.5)
    try:
        # the client closes half-way through its request: nothing runs, nothing answers
        assert _raw(server.path, b'{"v": 1, "op": "split", "names": ["m1"]') == b""
        # the client stalls half-way: the daemon gives up on it (answering why)
        resp = json.loads(_raw(server.path, b'{"v": 1, "op": "split"', shut=False))
        assert resp["error"]["code"] == "protocol" and "not finished" in resp["error"]["message"]
        assert calls == []
    finally:
        server.close()


def test_many_connections_are_bounded_and_the_daemon_stays_usable(tmp_path):
    server, calls = _server(tmp_path, max_connections=4)
    idle = []
    try:
        for _ in range(4):  # hold every slot with a connection that says nothing
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(server.path)
            s.sendall(b'{"v": 1')
            idle.append(s)
        # the fifth is told so and closed, without its request being run
        with pytest.raises(TargetMirrorError) as err:
            call(server.path, "split", names=["m1"])
        assert err.value.code == "busy"
        assert calls == []
        for s in idle:
            s.close()
        # slots come back when clients go away
        deadline = time.monotonic() + 10
        while True:
            try:
                assert call(server.path, "ping") == {"pong": True}
                break
            except TargetMirrorError as exc:
                assert exc.code == "busy" and time.monotonic() < deadline
    finally:
        for s in idle:
            s.close()
        server.close()


def test_an_unforeseen_handler_failure_is_answered_internal(tmp_path):
    def broken():
        raise AttributeError("'int' object has no attribute 'lower'")

    resp = handle_line(b'{"v": 1, "op": "x"}', {"x": broken})
    assert resp["ok"] is False and resp["error"]["code"] == "internal"


def test_a_bug_inside_a_handler_is_internal_not_bad_arguments():
    """A KeyError/TypeError raised *inside* a handler is a bug of the daemon: it is answered
    ``internal`` (and logged), never passed off as the client's bad arguments."""
    def op(name: str) -> dict:
        return {}["missing" + name]

    def op2(name: str) -> dict:
        return len(5)  # type: ignore[arg-type]

    for fn in (op, op2):
        resp = handle_line(b'{"v": 1, "op": "x", "name": "m"}', {"x": fn})
        assert resp["error"]["code"] == "internal", resp


@pytest.mark.parametrize("args, why", [
    ({"name": "m", "colour": "red"}, "unknown argument 'colour'"),
    ({}, "missing argument 'name'"),
    ({"name": 5}, "name: expected a string, got 5"),
    ({"name": "m", "rate": "fast"}, 'rate: expected a number or null, got "fast"'),
    ({"name": "m", "rate": True}, "rate: expected a number or null, got true"),
    ({"name": "m", "names": ["a", 1]}, 'names: expected a list of strings or null, got ["a", 1]'),
    ({"name": "m", "wait": "yes"}, "wait: expected true or false"),
    ({"name": "m", "count": 1.5}, "count: expected an integer"),
])
def test_arguments_are_checked_against_the_handler_before_it_runs(args, why):
    """configshell-fb's assert_params, for the control API: every request's arguments against
    the handler's signature and annotations; the handler is not called when they do not fit."""
    calls = []

    def op(name: str, rate: float | None = None, names: list[str] | None = None,
           wait: bool = False, count: int = 0) -> dict:
        calls.append(name)
        return {"ok": name}

    resp = handle_line(json.dumps({"v": 1, "op": "x", **args}).encode(), {"x": op})
    assert resp["ok"] is False and resp["error"]["code"] == "protocol", resp
    assert why in resp["error"]["message"] and "bad arguments for x" in resp["error"]["message"]
    assert calls == []
    ok = handle_line(json.dumps({"v": 1, "op": "x", "name": "m", "rate": 3, "names": None,
                                 "wait": True, "count": 2}).encode(), {"x": op})
    assert ok == {"v": 1, "ok": True, "result": {"ok": "m"}} and calls == ["m"]


def test_every_daemon_error_is_the_same_class_on_the_client(tmp_path):
    """``except MirrorError`` (or ConfigError, StoreError, ...) works in a client: each code
    the daemon answers with is raised as the class that has it."""
    from targetmirror import errors
    from targetmirror.protocol import ERROR_CLASSES

    raised = [errors.ConfigError("c"), errors.ConfigFileError("/f", ["/f: x: expected y"]),
              errors.MirrorError("m"), errors.LioError("l"), errors.StoreError("s", kind="read"),
              errors.FrozenImageError("frozen"), errors.DeviceError("d"), errors.RingError("r"),
              errors.ProtocolError("p"), errors.InternalError("i")]

    def boom(i: int) -> dict:
        raise raised[i]

    path = str(tmp_path / "control.sock")
    server = ControlServer(path, {"boom": boom}, allowed_uids=(os.getuid(),))
    server.start()
    try:
        for i, exc in enumerate(raised):
            with pytest.raises(TargetMirrorError) as err:
                call(path, "boom", i=i)
            want = ERROR_CLASSES[exc.code]
            assert isinstance(exc, want)  # the class the client raises is the daemon's (base)
            assert type(err.value) is want and err.value.code == exc.code
            assert str(err.value) == str(exc)
        with pytest.raises(errors.ProtocolError, match="unknown argument 'j'"):
            call(path, "boom", j=1)
    finally:
        server.close()
    assert set(ERROR_CLASSES) >= {"config", "mirror", "lio", "store", "device", "ring",
                                  "protocol", "permission", "busy", "internal"}
