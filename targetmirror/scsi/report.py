"""REPORT SUPPORTED OPERATION CODES, generated from the dispatch table.

Because the reply is computed from :data:`targetmirror.scsi.cdb.COMMANDS` -- the same table that
routes and validates CDBs -- it cannot claim a command or a CDB bit the handler does not honour.
Reporting options 000b (all commands), 001b (one opcode) and 010b (opcode + service action) are
implemented, with or without command timeout descriptors (RCTD); we report timeouts as 0,
"not specified", since they depend on the images underneath.
"""

from __future__ import annotations

from collections.abc import Sequence

from targetmirror.scsi.cdb import COMMANDS, CommandSpec, ReportOpcodesCdb
from targetmirror.scsi.sense import invalid_cdb_field

_SUPPORT_NOT_SUPPORTED = 0x1
_SUPPORT_STANDARD = 0x3
_CTDP_ALL = 0x02
_SERVACTV = 0x01
_CTDP_ONE = 0x80


def _timeouts() -> bytes:
    # Descriptor length 0Ah, then nominal and recommended timeouts of 0 ("not specified").
    return b"\x00\x0a" + bytes(10)


def _all_commands(rctd: bool, commands: Sequence[CommandSpec]) -> bytes:
    body = bytearray()
    for spec in commands:
        flags = (_CTDP_ALL if rctd else 0) | (_SERVACTV if spec.service_action is not None else 0)
        body += bytes([spec.opcode, 0])
        body += (spec.service_action or 0).to_bytes(2, "big")
        body += bytes([0, flags])
        body += spec.length.to_bytes(2, "big")
        if rctd:
            body += _timeouts()
    return len(body).to_bytes(4, "big") + bytes(body)


def _one_command(spec: CommandSpec | None, rctd: bool) -> bytes:
    if spec is None:
        return bytes([0, _SUPPORT_NOT_SUPPORTED, 0, 0])
    head = bytes([0, (_CTDP_ONE if rctd else 0) | _SUPPORT_STANDARD])
    return head + spec.length.to_bytes(2, "big") + spec.usage + (_timeouts() if rctd else b"")


def report_supported_opcodes(
    cdb: ReportOpcodesCdb, commands: Sequence[CommandSpec] = COMMANDS
) -> bytes:
    """The untruncated reply.  Asking for one opcode in the wrong form -- without a service
    action for an opcode that has them (option 1), or with one for an opcode that has none
    (option 2) -- is INVALID FIELD IN CDB, as SPC-4 requires."""
    if cdb.options == 0:
        return _all_commands(cdb.rctd, commands)
    same_opcode = [c for c in commands if c.opcode == cdb.opcode]
    has_sa = any(c.service_action is not None for c in same_opcode)
    if cdb.options == 1:
        if has_sa:
            raise invalid_cdb_field(2, 2)
        return _one_command(same_opcode[0] if same_opcode else None, cdb.rctd)
    if same_opcode and not has_sa:
        raise invalid_cdb_field(2, 2)
    match = [c for c in same_opcode if c.service_action == cdb.service_action]
    return _one_command(match[0] if match else None, cdb.rctd)
