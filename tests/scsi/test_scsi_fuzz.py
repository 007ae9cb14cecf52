"""Property tests: no CDB, however malformed, makes execute raise or answer nonsense."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from targetmirror.scsi.cdb import COMMANDS
from targetmirror.scsi.handler import DeviceIdentity, ScsiDevice
from targetmirror.scsi.sense import parse_fixed_sense

from .memory_backend import MemoryBackend

SUPPORTED_OPCODES = sorted({c.opcode for c in COMMANDS})
SPECS = list(COMMANDS)
# Last byte of the LBA field and of the transfer length field, by CDB length (READ/WRITE shape).
_SMALL_FIELDS = {6: (3, 4), 10: (5, 8), 12: (5, 9), 16: (9, 13)}


def _device() -> tuple[ScsiDevice, MemoryBackend]:
    backend = MemoryBackend(num_blocks=32, block_size=512)
    identity = DeviceIdentity(serial="fuzz", max_transfer_blocks=64, max_compare_and_write_blocks=2)
    return ScsiDevice(backend, identity), backend


def _check(dev: ScsiDevice, backend: MemoryBackend, cdb: bytes, segments: list[bytes]) -> None:
    bufs = [bytearray(s) for s in segments]
    result = dev.execute(cdb, [memoryview(b) for b in bufs])
    assert result.status in (0x00, 0x02)
    if result.status == 0x00:
        assert result.sense is None
    else:
        assert result.sense is not None and len(result.sense) >= 18
        assert result.sense[0] & 0x7F == 0x70
        assert result.sense[7] == len(result.sense) - 8
        info = parse_fixed_sense(result.sense)
        assert info.key in (0x3, 0x5, 0xE)
    total = sum(len(b) for b in bufs)
    if result.read_len is not None:
        assert 0 <= result.read_len < total
    assert len(backend.data) == backend.num_blocks * backend.block_size


_segments = st.lists(st.binary(min_size=0, max_size=2048), min_size=0, max_size=4)


@st.composite
def _cdbs(draw: st.DrawFn) -> bytes:
    """Random bytes of length 0..32 whose opcode is usually one we support, and sometimes a
    CDB from the table with only a few random bits set, which gets past the reserved-bit check
    more often and so reaches the command handlers."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(min_size=0, max_size=32))
    if kind == 1:
        op = draw(st.sampled_from(SUPPORTED_OPCODES))
        rest = draw(st.binary(min_size=0, max_size=31))
        return bytes([op]) + rest
    spec = draw(st.sampled_from(SPECS))
    cdb = bytearray(spec.length)
    for i in range(spec.length):
        cdb[i] = draw(st.integers(0, 255)) & spec.usage[i] if i else spec.opcode
    if spec.service_action is not None:
        cdb[1] = spec.usage[1]
    # Often: a small LBA and a small length, so data commands land inside the 32-block device
    # and within the data-out buffer, and reach the backend.
    if draw(st.booleans()):
        for i in range(2, spec.length - 1):
            cdb[i] = 0
        lba_last, len_last = _SMALL_FIELDS[spec.length]
        cdb[lba_last] = draw(st.integers(0, 40)) & spec.usage[lba_last]
        cdb[len_last] = draw(st.integers(0, 8)) & spec.usage[len_last]
    extra = draw(st.binary(max_size=32 - spec.length))
    return bytes(cdb) + extra


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cdb=_cdbs(), segments=_segments)
def test_execute_never_raises(cdb: bytes, segments: list[bytes]) -> None:
    dev, backend = _device()
    _check(dev, backend, cdb, segments)


@settings(max_examples=300, deadline=None)
@given(cdbs=st.lists(_cdbs(), min_size=1, max_size=20), segments=_segments)
def test_sequences_of_commands_never_raise(cdbs: list[bytes], segments: list[bytes]) -> None:
    """Device state (WCE) carried between commands does not break later ones."""
    dev, backend = _device()
    for cdb in cdbs:
        _check(dev, backend, cdb, segments)
