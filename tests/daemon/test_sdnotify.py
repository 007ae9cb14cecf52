"""sd_notify: the datagram systemd expects, and silence outside systemd."""

from __future__ import annotations

import socket

from targetmirror.daemon.sdnotify import notify


def test_ready_datagram(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify("READY=1\nSTATUS=serving 2 device(s)")
        assert server.recv(4096) == b"READY=1\nSTATUS=serving 2 device(s)"


def test_no_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
