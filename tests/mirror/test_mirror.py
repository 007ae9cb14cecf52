"""Mirror: both legs get every write, reads come from B, sizes are checked."""

from __future__ import annotations

import os

import pytest

from targetmirror.errors import MirrorError
from targetmirror.mirror.mirror import Mirror
from targetmirror.store.image import Image

SIZE = 1 << 20


def legs(tmp_path, size_a=SIZE, size_b=SIZE):
    paths = []
    for name, size in (("a", size_a), ("b", size_b)):
        p = tmp_path / f"{name}.img"
        with open(p, "wb") as f:
            f.truncate(size)
        paths.append(str(p))
    return Image(paths[0]), Image(paths[1])


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("length", [4096, 256 * 1024])  # below and above the parallel threshold
@pytest.mark.parametrize("fua", [False, True])
def test_write_reaches_both_legs(tmp_path, length, fua):
    a, b = legs(tmp_path)
    m = Mirror("m", a, b, size=SIZE)
    payload = os.urandom(length)
    m.write(4096, [memoryview(payload[: length // 2]), memoryview(payload[length // 2:])], fua)
    m.close()
    for img in (a, b):
        assert read_file(img.path)[4096: 4096 + length] == payload


def test_reads_come_from_b(tmp_path):
    a, b = legs(tmp_path)
    with open(b.path, "r+b") as f:
        f.write(b"B" * 512)
    m = Mirror("m", a, b, size=SIZE)
    buf = bytearray(512)
    m.read(0, [memoryview(buf)])
    assert buf == b"B" * 512
    m.close()


def test_compare_and_write(tmp_path):
    a, b = legs(tmp_path)
    m = Mirror("m", a, b, size=SIZE)
    m.write(0, [memoryview(b"\x01" * 512)], False)
    assert m.compare_and_write(0, memoryview(b"\x01" * 512), memoryview(b"\x02" * 512)) is None
    verify = bytearray(b"\x02" * 512)
    verify[100] = 9
    assert m.compare_and_write(0, memoryview(verify), memoryview(b"\x03" * 512)) == 100
    m.close()
    assert read_file(a.path)[:512] == b"\x02" * 512
    assert read_file(b.path)[:512] == b"\x02" * 512


def test_unmap_zeroes_both(tmp_path):
    a, b = legs(tmp_path)
    m = Mirror("m", a, b, size=SIZE)
    m.write(0, [memoryview(b"\xaa" * 16384)], False)
    m.unmap(4096, 4096)
    m.close()
    for img in (a, b):
        data = read_file(img.path)[:16384]
        assert data[4096:8192] == bytes(4096)
        assert data[:4096] == b"\xaa" * 4096


def test_image_too_small_is_refused(tmp_path):
    a, b = legs(tmp_path, size_b=SIZE // 2)
    with pytest.raises(MirrorError, match="image B"):
        Mirror("m", a, b, size=SIZE)


def test_size_must_be_block_multiple(tmp_path):
    a, b = legs(tmp_path)
    with pytest.raises(MirrorError, match="block size"):
        Mirror("m", a, b, size=1000)


def test_a_write_failure_on_one_leg_degrades_and_completes_on_the_other(tmp_path):
    a, b = legs(tmp_path)
    a.close()
    a = Image(a.path, readonly=True)  # writes to A now fail
    m = Mirror("m", a, b, size=SIZE)
    m.write(0, [memoryview(b"x" * 512)], False)
    assert m.health == "degraded" and "a" in m.st.failed
    with open(b.path, "rb") as f:
        assert f.read(512) == b"x" * 512
    m.close()
