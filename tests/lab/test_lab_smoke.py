"""Lab smoke test: the real kernel's LIO exports a kernel fileio LUN and a tcmu-runner user:file
LUN over iSCSI on 127.0.0.1; data written through the initiator lands in the backing files.

Needs no targetmirror code: it proves the lab itself (image, modules, configfs, rtslib,
tcmu-runner and its file handler, iscsid, sysfs device lookup) before our handler shows up.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.lab import guest

pytestmark = pytest.mark.lab

SIZE = 64 * guest.MiB
BLOCK = 4096
#: (offset, length) pairs: start, a 1 MiB run crossing no particular boundary, the last block.
WRITES = ((0, BLOCK), (5 * guest.MiB + 8 * BLOCK, guest.MiB), (SIZE - BLOCK, BLOCK))


def _roundtrip(dev: str) -> dict[int, bytes]:
    """Write random data at each offset, read it back through the disk, return what was sent."""
    sent = {}
    for offset, length in WRITES:
        data = os.urandom(length)
        guest.dd_write(dev, offset, data)
        sent[offset] = data
    for offset, data in sent.items():
        assert guest.dd_read(dev, offset, len(data)) == data, f"read-back at {offset} differs"
    return sent


def _check_file(path: Path, sent: dict[int, bytes]) -> None:
    with path.open("rb") as fh:
        for offset, data in sent.items():
            fh.seek(offset)
            assert fh.read(len(data)) == data, f"{path} at {offset} differs from what was written"


def test_kernel_fileio_over_iscsi(lio: object, tmp_path: Path) -> None:
    backing = tmp_path / "fileio.img"
    so = guest.create_fileio("smoke_fileio", backing, SIZE)
    with guest.iscsi_disk(so) as dev:
        assert int(Path("/sys/block", Path(dev).name, "size").read_text()) * 512 == SIZE
        sent = _roundtrip(dev)
    _check_file(backing, sent)


def test_tcmu_runner_user_file_over_iscsi(lio: object, tcmu_runner: guest.TcmuRunner,
                                          tmp_path: Path) -> None:
    backing = tmp_path / "user-file.img"
    so = guest.create_user_file("smoke_userfile", backing, SIZE)
    tcmu_runner.wait_for_device(so.name)
    with guest.iscsi_disk(so) as dev:
        max_kb = int(Path("/sys/block", Path(dev).name, "queue/max_hw_sectors_kb").read_text())
        assert max_kb >= 1024, "hw_max_sectors=2048 should allow 1 MiB commands"
        sent = _roundtrip(dev)
    so.delete()  # let the handler close (and flush) the file before we read it
    _check_file(backing, sent)
