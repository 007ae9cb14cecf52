"""The fast path must be the general path, only cheaper.

For random READ/WRITE(10/16) CDBs — flags, group and control bytes, LBAs around the capacity,
transfer lengths around the limit, buffers shorter, equal and longer than the transfer — every
CDB the fast path accepts must give the same status, sense, read_len, backend calls and medium
bytes as ``ScsiDevice.execute``; and the decoder must agree with ``parse_cdb`` about what the
command is.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from targetmirror.errors import StoreError
from targetmirror.scsi.cdb import ReadCdb, WriteCdb, parse_cdb
from targetmirror.scsi.fastpath import decode_rw
from targetmirror.scsi.handler import ScsiDevice
from targetmirror.scsi.identity import DeviceIdentity

from .memory_backend import MemoryBackend

NBLOCKS = 64
BS = 512
MAX_BLOCKS = 16


def _cdb(op: int, flags: int, lba: int, blocks: int, group: int, control: int) -> bytes:
    if op in (0x28, 0x2A):
        return struct.pack(">BBIBHB", op, flags, lba & 0xFFFFFFFF, group, blocks & 0xFFFF,
                           control)
    return struct.pack(">BBQIBB", op, flags, lba, blocks & 0xFFFFFFFF, group, control)


@st.composite
def cdbs(draw: st.DrawFn) -> bytes:
    """Mostly plain fields (the fast path's business), each sometimes anything (the slow's)."""
    def field(plain: st.SearchStrategy[int], wild: st.SearchStrategy[int]) -> int:
        return draw(wild if draw(st.integers(0, 5)) == 0 else plain)

    return _cdb(draw(st.sampled_from([0x28, 0x2A, 0x88, 0x8A])),
                field(st.sampled_from([0, 0x08, 0x10, 0x18]), st.integers(0, 255)),
                field(st.integers(0, NBLOCKS + 2), st.integers(0, 2**32 - 1)),
                field(st.integers(0, MAX_BLOCKS + 2), st.integers(0, 2**16 - 1)),
                field(st.just(0), st.integers(0, 255)),
                field(st.just(0), st.integers(0, 255)))


def _device() -> tuple[ScsiDevice, MemoryBackend]:
    be = MemoryBackend(NBLOCKS, BS)
    be.data[:] = (bytes(range(251)) * (len(be.data) // 251 + 1))[:len(be.data)]
    return ScsiDevice(be, DeviceIdentity(serial="fast", max_transfer_blocks=MAX_BLOCKS)), be


def _iov(sizes: list[int], seed: int) -> list[memoryview]:
    pattern = bytes(range(256)) * (max(sizes) // 256 + 2)
    return [memoryview(bytearray(pattern[seed + i: seed + i + n])) for i, n in enumerate(sizes)]


@settings(max_examples=1000, deadline=None)
@given(cdb=cdbs(), split=st.sampled_from(["exact", "exact2", "short", "long"]),
       seed=st.integers(0, 255), fail=st.booleans())
def test_fast_path_equals_general_path(cdb: bytes, split: str, seed: int, fail: bool) -> None:
    blocks = int.from_bytes(cdb[7:9] if len(cdb) == 10 else cdb[10:14], "big")
    n = min(max(blocks, 1), MAX_BLOCKS + 2) * BS  # larger transfers are refused either way
    sizes = {"exact": [n], "exact2": [BS, n - BS] if n > BS else [n],
             "short": [max(n - BS, BS)], "long": [n + BS]}[split]
    slow_dev, slow_be = _device()
    fast_dev, fast_be = _device()
    if fail:
        for be in (slow_be, fast_be):
            be.fail["write"] = StoreError("injected", kind="write")
            be.fail["read"] = StoreError("injected", kind="read")
    slow_iov, fast_iov = _iov(sizes, seed), _iov(sizes, seed)
    plain = decode_rw(cdb, fast_iov, NBLOCKS, BS, MAX_BLOCKS)
    slow = slow_dev.execute(cdb, slow_iov)
    if plain is None:
        return
    write, offset, length, fua = plain
    _, parsed = parse_cdb(cdb)  # an accepted CDB is one the general parser accepts too
    assert isinstance(parsed, WriteCdb if write else ReadCdb)
    assert (offset, length, fua) == (parsed.lba * BS, parsed.blocks * BS, parsed.fua)
    fast = fast_dev.execute_plain(write, offset, fast_iov, fua, fast_be)
    assert (fast.status, fast.sense, fast.read_len) == (slow.status, slow.sense, slow.read_len)
    assert fast_be.calls == slow_be.calls
    assert fast_be.data == slow_be.data
    assert [bytes(v) for v in fast_iov] == [bytes(v) for v in slow_iov]


def test_plain_commands_are_accepted() -> None:
    """The workload that matters takes the fast path (a test that the decoder is not a no-op)."""
    iov = [memoryview(bytearray(8 * BS))]
    assert decode_rw(_cdb(0x2A, 0, 8, 8, 0, 0), iov, NBLOCKS, BS, MAX_BLOCKS) == \
        (True, 8 * BS, 8 * BS, False)
    assert decode_rw(_cdb(0x88, 0x08, 0, 8, 0, 0), iov, NBLOCKS, BS, MAX_BLOCKS) == \
        (False, 0, 8 * BS, True)
    # what it must leave to the general path
    assert decode_rw(_cdb(0x2A, 0x20, 8, 8, 0, 0), iov, NBLOCKS, BS, MAX_BLOCKS) is None
    assert decode_rw(_cdb(0x2A, 0, 60, 8, 0, 0), iov, NBLOCKS, BS, MAX_BLOCKS) is None
    assert decode_rw(_cdb(0x2A, 0, 8, 0, 0, 0), iov, NBLOCKS, BS, MAX_BLOCKS) is None
    assert decode_rw(_cdb(0x28, 0, 8, 4, 0, 0), iov, NBLOCKS, BS, MAX_BLOCKS) is None
    assert decode_rw(bytes([0x2E]) + bytes(9), iov, NBLOCKS, BS, MAX_BLOCKS) is None


def test_write_protected_device_refuses_a_plain_write() -> None:
    be = MemoryBackend(NBLOCKS, BS)
    dev = ScsiDevice(be, DeviceIdentity(serial="ro"), write_protected=True)
    iov = [memoryview(bytearray(BS))]
    res = dev.execute_plain(True, 0, iov, False, be)
    assert res.status == 0x02 and res.sense is not None and res.sense[2] & 0x0F == 0x07
    assert be.calls == []


def test_an_empty_cdb_takes_the_general_path() -> None:
    """Found by the fuzzer (tests/fuzz): an empty CDB made the decoder raise IndexError instead
    of leaving the answer (INVALID COMMAND OPERATION CODE) to the general path."""
    iov = [memoryview(bytearray(BS))]
    assert decode_rw(b"", iov, NBLOCKS, BS, MAX_BLOCKS) is None
    dev = ScsiDevice(MemoryBackend(NBLOCKS, BS), DeviceIdentity(serial="t"))
    assert dev.execute(b"", iov).status == 0x02


def test_an_empty_segment_takes_the_general_path() -> None:
    """Found by the fuzzer: a buffer of the right total size with an empty segment was accepted,
    and the backend got a zero-length iovec, which its contract excludes (the general path's
    slice_iov drops empty segments)."""
    cdb = _cdb(0x2A, 0, 3, 1, 0, 0)
    data = bytearray(b"\x5a" * BS)
    iov = [memoryview(bytearray()), memoryview(data)]
    assert decode_rw(cdb, iov, NBLOCKS, BS, MAX_BLOCKS) is None
    backend = MemoryBackend(NBLOCKS, BS)  # asserts every iovec it gets is non-empty
    dev = ScsiDevice(backend, DeviceIdentity(serial="t"))
    assert dev.execute(cdb, iov).status == 0x00
    assert backend.block(3) == bytes(data)
