"""journald native-protocol records: structured fields arrive on the socket, binary-safe."""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys

from targetmirror.daemon import logs


def parse(datagram: bytes) -> dict[str, str]:
    out = {}
    pos = 0
    while pos < len(datagram):
        nl = datagram.index(b"\n", pos)
        line = datagram[pos:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out[k.decode()] = v.decode()
            pos = nl + 1
        else:
            (n,) = struct.unpack("<Q", datagram[nl + 1: nl + 9])
            out[line.decode()] = datagram[nl + 9: nl + 9 + n].decode()
            assert datagram[nl + 9 + n: nl + 10 + n] == b"\n"
            pos = nl + 10 + n
    return out


def test_fields_reach_the_journal_socket(tmp_path):
    path = str(tmp_path / "journal.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    handler = logs.JournalHandler(path)
    log = logging.getLogger("targetmirror.test-journal")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        log.warning("split of %s drained", "db", extra={"device": "db", "epoch": 3})
        f = parse(server.recv(65536))
        assert f["MESSAGE"] == "split of db drained" and f["PRIORITY"] == "4"
        assert f["TARGETMIRROR_DEVICE"] == "db" and f["TARGETMIRROR_EPOCH"] == "3"
        assert f["SYSLOG_IDENTIFIER"] == "targetmirrord"
        assert "TARGETMIRROR_LEG" not in f
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("ring loop failed", extra={"device": "db"})
        f = parse(server.recv(65536))
        assert f["PRIORITY"] == "3"
        assert f["MESSAGE"].startswith("ring loop failed\nTraceback")
        assert "second line" in f["MESSAGE"]
    finally:
        log.removeHandler(handler)
        handler.close()
        server.close()


def test_unreachable_journal_falls_back_to_stderr(tmp_path, capsys):
    handler = logs.JournalHandler(str(tmp_path / "absent.sock"))
    handler.fallback.stream = sys.stderr
    rec = logging.LogRecord("targetmirror.x", logging.ERROR, __file__, 1, "lost %s", ("leg",),
                            None)
    rec.leg = "a"
    handler.emit(rec)
    handler.close()
    assert capsys.readouterr().err == "<3>targetmirror.x: lost leg leg=a\n"


def test_journal_stream_detection(monkeypatch, tmp_path):
    f = open(tmp_path / "stderr", "w")  # noqa: SIM115
    monkeypatch.setattr(sys, "stderr", f)
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.journal_stream()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not logs.journal_stream()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not logs.journal_stream()
    f.close()
