"""MODE SENSE replies and MODE SELECT parsing.

The only mode parameter a targetmirror device can change is WCE in the caching page, and its
current value lives in the backend (``BlockBackend.write_cache``), so these functions take the
write-cache state as arguments and return the new one: no state of their own.

Pages: 01h read-write error recovery, 08h caching, 0Ah control, and 3Fh for all of them (our pages
have no subpages, so subpage FFh is accepted and means the same).  PC=saved is SAVING PARAMETERS
NOT SUPPORTED, since nothing survives a restart except what the daemon configures.
"""

from __future__ import annotations

from targetmirror.scsi.cdb import ModeSelectCdb, ModeSenseCdb
from targetmirror.scsi.constants import (
    CACHING_WCE,
    DEVICE_SPECIFIC_DPOFUA,
    DEVICE_SPECIFIC_WP,
    MODE_PAGE_ALL,
    MODE_PAGE_CACHING,
    MODE_PAGE_CONTROL,
    MODE_PAGE_RW_ERROR_RECOVERY,
    MODE_SUBPAGE_ALL,
    PC_CHANGEABLE,
    PC_DEFAULT,
)
from targetmirror.scsi.sense import (
    invalid_cdb_field,
    invalid_param_field,
    param_list_length_error,
)

MODE_PAGES: tuple[int, ...] = (
    MODE_PAGE_RW_ERROR_RECOVERY,
    MODE_PAGE_CACHING,
    MODE_PAGE_CONTROL,
)
_PAGE_LENGTH = {
    MODE_PAGE_RW_ERROR_RECOVERY: 0x0A,
    MODE_PAGE_CACHING: 0x12,
    MODE_PAGE_CONTROL: 0x0A,
}
_QAM_UNRESTRICTED = 0x10  # control page byte 3: commands may be reordered freely
_LONGLBA = 0x01


def mode_page(page: int, pc: int, *, write_cache: bool, default_write_cache: bool) -> bytes:
    """One mode page for page control ``pc`` (current, changeable or default)."""
    buf = bytearray(2 + _PAGE_LENGTH[page])
    buf[0] = page
    buf[1] = _PAGE_LENGTH[page]
    if pc == PC_CHANGEABLE:
        if page == MODE_PAGE_CACHING:
            buf[2] = CACHING_WCE
        return bytes(buf)
    if page == MODE_PAGE_CACHING:
        wce = default_write_cache if pc == PC_DEFAULT else write_cache
        buf[2] = CACHING_WCE if wce else 0
    elif page == MODE_PAGE_CONTROL:
        buf[3] = _QAM_UNRESTRICTED
    return bytes(buf)


def _block_descriptor(long_lba: bool, block_size: int, num_blocks: int) -> bytes:
    if long_lba:
        return num_blocks.to_bytes(8, "big") + bytes(4) + block_size.to_bytes(4, "big")
    # SBC-3: a capacity that does not fit is reported as FFFFFFFFh (READ CAPACITY(16) has it).
    short = min(num_blocks, 0xFFFF_FFFF)
    return short.to_bytes(4, "big") + b"\x00" + block_size.to_bytes(3, "big")


def _selected_pages(cdb: ModeSenseCdb) -> tuple[int, ...]:
    if cdb.subpage not in (0x00, MODE_SUBPAGE_ALL):
        raise invalid_cdb_field(3)
    if cdb.page == MODE_PAGE_ALL:
        return MODE_PAGES
    if cdb.page in MODE_PAGES:
        return (cdb.page,)
    raise invalid_cdb_field(2, 5)


def mode_sense(
    cdb: ModeSenseCdb,
    *,
    block_size: int,
    num_blocks: int,
    write_cache: bool,
    default_write_cache: bool,
    write_protect: bool = False,
) -> bytes:
    """The untruncated MODE SENSE(6)/(10) reply: header, block descriptor unless DBD, pages.

    The device-specific parameter has DPOFUA set (we honour FUA on writes) and WP set only for
    a write-protected unit (an exported split copy).  The
    block descriptor is the same for every page control value: it describes the medium and none
    of it is changeable (MODE SELECT accepts it only unchanged).
    """
    pages = b"".join(
        mode_page(p, cdb.pc, write_cache=write_cache, default_write_cache=default_write_cache)
        for p in _selected_pages(cdb)
    )
    dsp = DEVICE_SPECIFIC_DPOFUA | (DEVICE_SPECIFIC_WP if write_protect else 0)
    long_lba = cdb.llbaa
    bd = b"" if cdb.dbd else _block_descriptor(long_lba, block_size, num_blocks)
    if cdb.ten:
        header_len = 8
        total = header_len + len(bd) + len(pages)
        header = (
            (total - 2).to_bytes(2, "big")
            + bytes([0, dsp, _LONGLBA if long_lba and bd else 0, 0])
            + len(bd).to_bytes(2, "big")
        )
    else:
        header_len = 4
        total = header_len + len(bd) + len(pages)
        header = bytes([total - 1, 0, dsp, len(bd)])
    return header + bd + pages


def _check_block_descriptor(
    data: bytes, pos: int, long_lba: bool, block_size: int, num_blocks: int
) -> None:
    """A descriptor may only restate the current format (number of blocks 0 = unchanged)."""
    if long_lba:
        count = int.from_bytes(data[pos : pos + 8], "big")
        length = int.from_bytes(data[pos + 12 : pos + 16], "big")
        current = num_blocks
        length_at = pos + 12
    else:
        count = int.from_bytes(data[pos : pos + 4], "big")
        length = int.from_bytes(data[pos + 5 : pos + 8], "big")
        current = min(num_blocks, 0xFFFF_FFFF)
        length_at = pos + 5
    if count not in (0, current):
        raise invalid_param_field(pos)
    if length != block_size:
        raise invalid_param_field(length_at)


def mode_select(
    cdb: ModeSelectCdb,
    data: bytes,
    *,
    block_size: int,
    num_blocks: int,
    write_cache: bool,
) -> bool:
    """Validate a MODE SELECT parameter list and return the new write-cache (WCE) state.

    ``data`` is the parameter list, exactly ``cdb.param_len`` bytes.  Anything that is not a
    restatement of the current values, except WCE, is INVALID FIELD IN PARAMETER LIST with a
    pointer to the byte; a list cut short inside its header, block descriptor or a page is
    PARAMETER LIST LENGTH ERROR.  Nothing is applied unless the whole list is valid.  The header's
    mode data length, medium type and device-specific parameter are ignored (reserved or not
    settable, and initiators commonly echo back what MODE SENSE gave them).  The PS bit of each
    page is ignored for the same reason.
    """
    header_len = 8 if cdb.ten else 4
    if len(data) < header_len:
        raise param_list_length_error()
    if cdb.ten:
        long_lba = bool(data[4] & _LONGLBA)
        bd_len = int.from_bytes(data[6:8], "big")
        bd_len_at = 6
    else:
        long_lba = False
        bd_len = data[3]
        bd_len_at = 3
    if bd_len not in (0, 16 if long_lba else 8):
        raise invalid_param_field(bd_len_at)
    if header_len + bd_len > len(data):
        raise param_list_length_error()
    if bd_len:
        _check_block_descriptor(data, header_len, long_lba, block_size, num_blocks)

    new_write_cache = write_cache
    pos = header_len + bd_len
    while pos < len(data):
        if len(data) - pos < 2:
            raise param_list_length_error()
        if data[pos] & 0x40:  # SPF: sub_page format; none of our pages has subpages
            raise invalid_param_field(pos, 6)
        page = data[pos] & 0x3F
        if page not in _PAGE_LENGTH:
            raise invalid_param_field(pos, 5)
        if data[pos + 1] != _PAGE_LENGTH[page]:
            raise invalid_param_field(pos + 1)
        end = pos + 2 + _PAGE_LENGTH[page]
        if end > len(data):
            raise param_list_length_error()
        current = mode_page(page, 0, write_cache=write_cache, default_write_cache=write_cache)
        changeable = mode_page(page, PC_CHANGEABLE, write_cache=False, default_write_cache=False)
        for i in range(2, end - pos):
            diff = (data[pos + i] ^ current[i]) & ~changeable[i]
            if diff:
                raise invalid_param_field(pos + i, diff.bit_length() - 1)
        if page == MODE_PAGE_CACHING:
            new_write_cache = bool(data[pos + 2] & CACHING_WCE)
        pos = end
    return new_write_cache
