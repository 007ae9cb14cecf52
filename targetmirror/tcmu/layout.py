"""Constants and byte offsets of the TCMU shared-memory protocol (mailbox version 2).

Everything the kernel and the handler agree on about the *shape* of the mapping lives here, so
that the ring code, the UIO code and the test producer read one definition and cannot drift
apart.  The values come from ``include/uapi/linux/target_core_user.h``; the offsets were checked
with ``offsetof()`` on x86_64 (see docs/architecture.md and the project's protocol notes).  All
integers in the map are native little-endian: TCMU only exists on little-endian hosts we run on,
and the formats below spell ``<`` so a big-endian build fails loudly instead of silently.

The ``struct.Struct`` objects are compiled once at import time: the ring's hot path only calls
``unpack_from``/``pack_into`` on them, which avoids re-parsing format strings per command.
"""

from __future__ import annotations

import struct
from typing import Final

# --------------------------------------------------------------------------------------------
# Versions and capability flags (mailbox.flags)

MAILBOX_VERSION: Final = 2
"""The only mailbox layout we understand; anything else means a kernel we were not written for."""

FLAG_CAP_OOOC: Final = 1 << 0
"""The kernel accepts completions in any order (we rely on it: workers finish out of order)."""
FLAG_CAP_READ_LEN: Final = 1 << 1
"""The kernel honours ``rsp.read_len`` when ``UFLAG_READ_LEN`` is set (short data-in replies)."""
FLAG_CAP_TMR: Final = 1 << 2
"""The kernel may queue TMR entries (only if the device attribute ``tmr_notification=1``)."""
FLAG_CAP_KEEP_BUF: Final = 1 << 3
"""The kernel can keep a command's data buffer after completion (``UFLAG_KEEP_BUF``)."""

# --------------------------------------------------------------------------------------------
# Entry opcodes (low 3 bits of hdr.len_op) and user flags (hdr.uflags)

OP_PAD: Final = 0
OP_CMD: Final = 1
OP_TMR: Final = 2
OP_MASK: Final = 0x7
"""``len_op & OP_MASK`` is the opcode, ``len_op & ~OP_MASK`` the entry length (8-byte aligned)."""
OP_ALIGN: Final = 8

UFLAG_UNKNOWN_OP: Final = 0x1
"""Set by us on an entry whose opcode we do not know; the kernel fails the command."""
UFLAG_READ_LEN: Final = 0x2
"""Set by us when ``rsp.read_len`` carries the real amount of data-in."""
UFLAG_KEEP_BUF: Final = 0x4

# --------------------------------------------------------------------------------------------
# TMR types (tcmu_tmr_entry.tmr_type)

TMR_UNKNOWN: Final = 0
TMR_ABORT_TASK: Final = 1
TMR_ABORT_TASK_SET: Final = 2
TMR_CLEAR_ACA: Final = 3
TMR_CLEAR_TASK_SET: Final = 4
TMR_LUN_RESET: Final = 5
TMR_TARGET_WARM_RESET: Final = 6
TMR_TARGET_COLD_RESET: Final = 7
TMR_LUN_RESET_PRO: Final = 128
"""A pseudo LUN reset the core raises when a PERSISTENT RESERVE OUT preempts other nexuses."""

# --------------------------------------------------------------------------------------------
# SCSI status values the ring itself must recognise (it copies sense only on CHECK CONDITION).

SAM_STAT_GOOD: Final = 0x00
SAM_STAT_CHECK_CONDITION: Final = 0x02

SENSE_BUFFERSIZE: Final = 96

# --------------------------------------------------------------------------------------------
# struct tcmu_mailbox (packed, 128 bytes; cmd_tail sits on its own 64-byte cache line)

MB_VERSION_OFF: Final = 0
MB_FLAGS_OFF: Final = 2
MB_CMDR_OFF_OFF: Final = 4
MB_CMDR_SIZE_OFF: Final = 8
MB_CMD_HEAD_OFF: Final = 12
MB_CMD_TAIL_OFF: Final = 64
MAILBOX_SIZE: Final = 128
"""sizeof(struct tcmu_mailbox); the kernel also uses it as the command ring's offset (CMDR_OFF)."""

MAILBOX: Final = struct.Struct("<HHIII")
"""version, flags, cmdr_off, cmdr_size, cmd_head: the first 16 bytes, read in one call."""
U32: Final = struct.Struct("<I")
"""For cmd_head (kernel-written) and cmd_tail (ours)."""

# --------------------------------------------------------------------------------------------
# struct tcmu_cmd_entry_hdr (8 bytes) and struct tcmu_cmd_entry (112 bytes)
#
# req and rsp are a union starting at byte 8: the request must be copied out before any byte
# of the response is written.

HDR: Final = struct.Struct("<IHBB")
"""len_op, cmd_id, kflags, uflags."""
HDR_SIZE: Final = 8
HDR_ID_FLAGS: Final = struct.Struct("<HBB")
"""cmd_id, kflags, uflags at entry offset 4: rewritten when a completion steals an entry."""
HDR_ID_FLAGS_OFF: Final = 4

REQ: Final = struct.Struct("<III4xQQQ")
"""iov_cnt, iov_bidi_cnt, iov_dif_cnt, (pad), cdb_off, __pad1, __pad2 at entry offset 8."""
REQ_OFF: Final = 8
REQ_IOV_OFF: Final = 48
"""offsetof(struct tcmu_cmd_entry, req.iov[0])."""
IOV: Final = struct.Struct("<QQ")
"""iov_base (offset from the start of the map, not a pointer), iov_len."""
IOV_SIZE: Final = 16

RSP: Final = struct.Struct("<BBHI")
"""scsi_status, __pad1, __pad2, read_len at entry offset 8."""
RSP_OFF: Final = 8
RSP_SENSE_OFF: Final = 16
CMD_ENTRY_SIZE: Final = 112
"""sizeof(struct tcmu_cmd_entry): the minimum base of a command entry, before the CDB."""

# --------------------------------------------------------------------------------------------
# struct tcmu_tmr_entry (32 bytes + u16 cmd_ids[cmd_cnt], rounded up to 8)

TMR: Final = struct.Struct("<BxHI")
"""tmr_type, (pad1), __pad2, cmd_cnt at entry offset 8."""
TMR_OFF: Final = 8
TMR_IDS_OFF: Final = 32
TMR_ENTRY_SIZE: Final = 32

# --------------------------------------------------------------------------------------------
# Generic netlink family "TCM-USER"

GENL_FAMILY: Final = "TCM-USER"
GENL_VERSION: Final = 2
GENL_MCGRP_CONFIG: Final = "config"

CMD_UNSPEC: Final = 0
CMD_ADDED_DEVICE: Final = 1
CMD_REMOVED_DEVICE: Final = 2
CMD_RECONFIG_DEVICE: Final = 3
CMD_ADDED_DEVICE_DONE: Final = 4
CMD_REMOVED_DEVICE_DONE: Final = 5
CMD_RECONFIG_DEVICE_DONE: Final = 6
CMD_SET_FEATURES: Final = 7

ATTR_UNSPEC: Final = 0
ATTR_DEVICE: Final = 1
ATTR_MINOR: Final = 2
ATTR_PAD: Final = 3
ATTR_DEV_CFG: Final = 4
ATTR_DEV_SIZE: Final = 5
ATTR_WRITECACHE: Final = 6
ATTR_CMD_STATUS: Final = 7
ATTR_DEVICE_ID: Final = 8
ATTR_SUPP_KERN_CMD_REPLY: Final = 9


def entry_len(len_op: int) -> int:
    """Length in bytes of the entry whose header word is *len_op*."""
    return len_op & ~OP_MASK


def entry_op(len_op: int) -> int:
    """Opcode (OP_PAD / OP_CMD / OP_TMR / other) of the entry whose header word is *len_op*."""
    return len_op & OP_MASK


def round_up(value: int, align: int) -> int:
    """Round *value* up to a multiple of *align* (a power of two)."""
    return (value + align - 1) & ~(align - 1)


def cmd_entry_size(iov_cnt: int, cdb_len: int) -> tuple[int, int]:
    """Return ``(cdb_rel_off, total_len)`` of a command entry as the kernel lays it out.

    The fixed part is at least ``sizeof(struct tcmu_cmd_entry)``; with many iovecs it grows to
    hold them, and the CDB follows right after, padded to 8 bytes.  Used by the test producer and
    handy for sanity checks; the ring itself trusts ``cdb_off`` and validates it instead.
    """
    base = max(REQ_IOV_OFF + IOV_SIZE * iov_cnt, CMD_ENTRY_SIZE)
    return base, base + round_up(cdb_len, OP_ALIGN)


def tmr_entry_size(cmd_cnt: int) -> int:
    """Length of a TMR entry carrying *cmd_cnt* command ids."""
    return round_up(TMR_ENTRY_SIZE + 2 * cmd_cnt, OP_ALIGN)


_CDB_GROUP_LEN: Final = (6, 10, 10, 12, 16, 12, 10, 10)
"""CDB length by opcode group (opcode >> 5), the SCSI convention the kernel also sizes with."""

VARIABLE_LENGTH_CMD: Final = 0x7F


def cdb_length(opcode: int, byte7: int | None) -> int | None:
    """Length of a CDB from its opcode (and byte 7 for variable-length CDBs).

    Returns ``None`` when the opcode is 0x7F and *byte7* is unknown (the caller has not got 8
    bytes to look at), so the caller can report a truncated entry instead of guessing.
    """
    if opcode == VARIABLE_LENGTH_CMD:
        if byte7 is None:
            return None
        return 8 + byte7
    return _CDB_GROUP_LEN[opcode >> 5]
