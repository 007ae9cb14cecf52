"""Image: zero-copy vectored I/O, short transfers, zeroing, errors."""

from __future__ import annotations

import os

import pytest

from targetmirror.errors import StoreError
from targetmirror.store.image import Image, _advance


def make(tmp_path, size=1 << 20, name="img"):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def test_write_then_read_vectored(tmp_path):
    img = Image(make(tmp_path))
    data = [memoryview(bytearray(os.urandom(n))) for n in (512, 4096, 1000)]
    img.writev(8192, data)
    out = [memoryview(bytearray(len(v))) for v in data]
    img.readv(8192, out)
    assert b"".join(bytes(v) for v in out) == b"".join(bytes(v) for v in data)
    with open(img.path, "rb") as f:
        f.seek(8192)
        assert f.read(5608) == b"".join(bytes(v) for v in data)
    img.close()
    img.close()  # idempotent


def test_read_past_end_of_file_is_zeros(tmp_path):
    img = Image(make(tmp_path, size=4096))
    buf = bytearray(b"\xff" * 8192)
    img.readv(0, [memoryview(buf)[:4096], memoryview(buf)[4096:]])
    assert buf == bytes(8192)


def test_advance_splits_views():
    a, b = memoryview(b"abcd"), memoryview(b"efgh")
    assert [bytes(v) for v in _advance([a, b], 0)] == [b"abcd", b"efgh"]
    assert [bytes(v) for v in _advance([a, b], 3)] == [b"d", b"efgh"]
    assert [bytes(v) for v in _advance([a, b], 4)] == [b"efgh"]
    assert [bytes(v) for v in _advance([a, b], 6)] == [b"gh"]


def test_write_zeroes_punches_hole(tmp_path):
    img = Image(make(tmp_path))
    img.writev(0, [memoryview(b"\x55" * 65536)])
    img.write_zeroes(4096, 8192)
    with open(img.path, "rb") as f:
        content = f.read(65536)
    assert content[:4096] == b"\x55" * 4096
    assert content[4096:12288] == bytes(8192)
    assert content[12288:] == b"\x55" * (65536 - 12288)


def test_open_missing_names_path(tmp_path):
    with pytest.raises(StoreError) as err:
        Image(str(tmp_path / "nope"))
    assert err.value.kind == "open"
    assert "nope" in str(err.value)


def test_directory_is_refused(tmp_path):
    with pytest.raises(StoreError, match="neither a regular file"):
        Image(str(tmp_path), readonly=True)


def test_write_error_is_store_error(tmp_path):
    img = Image(make(tmp_path), readonly=True)
    with pytest.raises(StoreError) as err:
        img.writev(0, [memoryview(b"x" * 512)])
    assert err.value.kind == "write"


def test_direct_falls_back_where_unsupported(tmp_path):
    img = Image(make(tmp_path), direct=True)
    # Either the filesystem took O_DIRECT or we fell back; both must still do I/O.
    buf = memoryview(bytearray(4096))
    img.readv(0, [buf])
    assert bytes(buf) == bytes(4096)
