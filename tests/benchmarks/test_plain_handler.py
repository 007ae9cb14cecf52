"""The benchmark's plain handler (benchmarks/plain_handler.py) against the kernel double: it is a
yardstick only if it is correct, so its answers and the bytes on both images are checked here.
The lab runs it under fio over iSCSI (benchmarks/lab_fio.py)."""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
from pathlib import Path

import pytest

from tests.tcmu.producer import Producer

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "plain_handler.py"
_spec = importlib.util.spec_from_file_location("plain_handler", _PATH)
assert _spec is not None and _spec.loader is not None
ph = importlib.util.module_from_spec(_spec)
sys.modules["plain_handler"] = ph
_spec.loader.exec_module(ph)

BS = 512
SIZE = 1 << 20


@pytest.fixture
def rig(tmp_path):
    fds = []
    for name in ("a", "b"):
        fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, SIZE)
        fds.append(fd)
    producer = Producer(cmdr_size=64 * 1024 - 128, data_size=1 << 20)
    ring = ph.Ring(producer.buf, ph.PlainMirror(fds[0], fds[1], SIZE, BS, "serial1"))
    yield producer, ring, fds
    ring.mv.release()
    for fd in fds:
        os.close(fd)


def answer(producer, ring):
    assert ring.batch() >= 0
    return producer.reap()


def test_mirrored_write_then_read(rig) -> None:
    producer, ring, (a, b) = rig
    data = os.urandom(8 * BS)
    w = producer.queue(struct.pack(">BBIBHB", 0x2A, 0, 16, 0, 8, 0), data_out=data)
    r = producer.queue(struct.pack(">BBQIBB", 0x88, 0, 16, 8, 0, 0), data_in_len=8 * BS)
    got = answer(producer, ring)
    assert got[w].status == 0 and got[r].status == 0
    assert got[r].data_in == data
    assert os.pread(a, 8 * BS, 16 * BS) == data == os.pread(b, 8 * BS, 16 * BS)


def test_out_of_range_and_unknown_opcode(rig) -> None:
    producer, ring, _ = rig
    beyond = producer.queue(struct.pack(">BBIBHB", 0x28, 0, SIZE // BS - 1, 0, 2, 0),
                            data_in_len=2 * BS)
    unknown = producer.queue(bytes((0x42,)) + bytes(9))  # UNMAP: not served by the yardstick
    got = answer(producer, ring)
    assert got[beyond].status == 2 and got[beyond].sense[2] == 0x05
    assert got[beyond].sense[12:14] == b"\x21\x00"
    assert got[unknown].status == 2 and got[unknown].sense[12:14] == b"\x20\x00"


def test_identity_capacity_mode_pages(rig) -> None:
    producer, ring, _ = rig
    inq = producer.queue(bytes((0x12, 0, 0, 0, 96, 0)), data_in_len=96)
    vpd = producer.queue(bytes((0x12, 1, 0x80, 0, 64, 0)), data_in_len=64)
    cap16 = producer.queue(bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + bytes(2),
                           data_in_len=32)
    mode = producer.queue(bytes((0x1A, 0, 0x08, 0, 64, 0)), data_in_len=64)
    saved = producer.queue(bytes((0x1A, 0, 0xC8, 0, 64, 0)), data_in_len=64)
    tur = producer.queue(bytes(6))
    sync = producer.queue(bytes((0x35,)) + bytes(9))
    got = answer(producer, ring)
    assert got[inq].data_in[8:16] == b"TMBENCH " and got[inq].read_len == 36
    assert got[vpd].data_in[4:11] == b"serial1"
    assert struct.unpack(">QI", got[cap16].data_in[:12]) == (SIZE // BS - 1, BS)
    page = got[mode].data_in
    assert page[0] == len(page) - 1 and page[4] == 0x08 and page[6] & 0x04  # WCE
    assert got[saved].status == 2 and got[saved].sense[12] == 0x39
    assert got[tur].status == 0 and got[sync].status == 0


def test_batches_wrap_the_ring(rig) -> None:
    producer, ring, (a, _b) = rig
    wrapped = False
    for rnd in range(40):  # 40 x 16 entries of 128 bytes: the 64 KiB ring wraps
        before = ring.rp
        ids = {}
        for i in range(16):
            lba = (rnd * 16 + i) % (SIZE // BS)
            ids[producer.queue(struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 1, 0),
                               data_out=bytes([rnd]) * BS)] = lba
        got = answer(producer, ring)
        wrapped |= ring.rp < before
        assert all(got[i].status == 0 for i in ids)
        for lba in ids.values():
            assert os.pread(a, BS, lba * BS) == bytes([rnd]) * BS
    assert wrapped
