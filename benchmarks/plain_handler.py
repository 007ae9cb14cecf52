"""The simplest correct mirroring TCMU handler we could write: the benchmark's yardstick.

What it is for: ``benchmarks/lab_fio.py`` serves a fourth LUN with it, so every lab run shows
what targetmirror's machinery (range locks, write-intent bitmap, split boundary, workers,
metrics, the express lane) costs or gains against the smallest thing that mirrors writes to two
files.  It is not part of the product and is never imported by it.

How it is built, and why:

* **stdlib only** (``mmap``, ``os``, ``struct``, ``select``), and **none of targetmirror's
  code**, the ring included: reusing ``targetmirror.tcmu.ring`` would measure our ring code
  twice, and the point is the distance from our stack to the plainest loop a person would write.
* **One thread, in ring order.**  Every command is served as soon as it is read, so each
  answer goes into the command's own slot (no out-of-order completion needed), ``cmd_tail``
  is stored once per batch and the kernel is notified once per batch (one 4-byte ``write``).
* **Zero copy.**  ``preadv``/``pwritev`` take memoryview slices of the map: the data area goes
  straight to the page cache, as in the product.  A write goes to image A, then image B; a
  read comes from A.  FUA and SYNCHRONIZE CACHE ``fdatasync`` both images.
* **No bitmap, no range lock, no split, no lane**: there is nothing to coordinate with, because
  nothing runs beside the ring loop.
* Enough SCSI for the Linux initiator and fio: TEST UNIT READY, INQUIRY (standard, VPD 00h,
  80h, 83h), READ CAPACITY(10)/(16), MODE SENSE(6)/(10) (caching and control pages),
  REPORT LUNS, READ/WRITE(6/10/12/16), SYNCHRONIZE CACHE(10/16).  Every other CDB gets CHECK
  CONDITION, ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE; a bad field, an LBA out of range
  or a failed I/O gets its own sense.  Data-area memory is touched only through the iovecs of
  the command being served, each checked to lie inside the data area.

Run (inside the lab guest, as root, after creating a ``user:plain`` backstore; the kernel
must not expect netlink replies, i.e. ``nl_reply_supported=-1``):

    python3 benchmarks/plain_handler.py --device b_plain --image-a /tmp/pa.img \\
        --image-b /tmp/pb.img

It waits for the backstore's ``/dev/uioN`` to appear, serves it until SIGTERM or until the
device goes away, and prints how many commands and batches it served.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import select
import signal
import struct
import sys
import time
from pathlib import Path

# -- the TCMU mailbox and entry layout (include/uapi/linux/target_core_user.h, x86_64) ------
_MAILBOX = struct.Struct("<HHIII")  # version, flags, cmdr_off, cmdr_size, cmd_head
_U32 = struct.Struct("<I")
_CMD_TAIL_OFF = 64
_REQ = struct.Struct("<III4xQ")  # iov_cnt, iov_bidi_cnt, iov_dif_cnt, cdb_off (entry + 8)
_IOV = struct.Struct("<QQ")
_REQ_IOV_OFF = 48
_ENTRY_MIN = 112
_OP_PAD, _OP_CMD = 0, 1
_RSP = struct.Struct("<BBB3xI")  # kflags, uflags | scsi_status, pad, read_len (entry + 6)
_SENSE_OFF = 16

# -- SCSI ------------------------------------------------------------------------------------
GOOD, CHECK_CONDITION = 0x00, 0x02
ILLEGAL_REQUEST, MEDIUM_ERROR, HARDWARE_ERROR = 0x05, 0x03, 0x04
INVALID_OPCODE = (0x20, 0x00)
INVALID_FIELD = (0x24, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
SAVING_NOT_SUPPORTED = (0x39, 0x00)
WRITE_ERROR = (0x0C, 0x00)
READ_ERROR = (0x11, 0x00)
INTERNAL_FAILURE = (0x44, 0x00)

VENDOR = b"TMBENCH "
PRODUCT = b"plain mirror    "


def sense(key: int, ascq: tuple[int, int]) -> bytes:
    """Fixed-format sense data (SPC-4 4.5.3), current error."""
    return bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, ascq[0], ascq[1], 0, 0, 0, 0))


class Check(Exception):
    """A command answered CHECK CONDITION with this sense."""

    def __init__(self, key: int, ascq: tuple[int, int]) -> None:
        super().__init__(key, ascq)
        self.sense = sense(key, ascq)


def _be(b: bytes, start: int, n: int) -> int:
    return int.from_bytes(b[start:start + n], "big")


class PlainMirror:
    """The SCSI side: two image fds, a size, and one method per opcode."""

    def __init__(self, a: int, b: int, size: int, block_size: int, serial: str) -> None:
        self.a, self.b = a, b
        self.bs = block_size
        self.nblocks = size // block_size
        self.serial = serial.encode()[:32] or b"plain"

    # -- data-in replies ----------------------------------------------------------------
    def inquiry(self, cdb: bytes) -> bytes:
        evpd, page, alloc = cdb[1] & 1, cdb[2], _be(cdb, 3, 2)
        if cdb[1] & 0xFE:
            raise Check(ILLEGAL_REQUEST, INVALID_FIELD)
        if not evpd:
            if page:
                raise Check(ILLEGAL_REQUEST, INVALID_FIELD)
            # disk, SPC-4, response format 2, CmdQue
            data = bytes((0, 0, 0x06, 0x02, 31, 0, 0, 0x02)) + VENDOR + PRODUCT + b"0001"
        elif page == 0x00:
            data = bytes((0, 0x00, 0, 3, 0x00, 0x80, 0x83))
        elif page == 0x80:
            data = bytes((0, 0x80, 0, len(self.serial))) + self.serial
        elif page == 0x83:  # one T10 vendor ID designator, ASCII, for the logical unit
            ident = VENDOR + self.serial
            data = (bytes((0, 0x83)) + struct.pack(">H", 4 + len(ident))
                    + bytes((0x02, 0x01, 0, len(ident))) + ident)
        else:
            raise Check(ILLEGAL_REQUEST, INVALID_FIELD)
        return data[:alloc]

    def read_capacity10(self, cdb: bytes) -> bytes:
        return struct.pack(">II", min(self.nblocks - 1, 0xFFFFFFFF), self.bs)

    def read_capacity16(self, cdb: bytes) -> bytes:
        if cdb[1] & 0x1F != 0x10:  # SERVICE ACTION IN(16): only READ CAPACITY(16)
            raise Check(ILLEGAL_REQUEST, INVALID_OPCODE)
        return struct.pack(">QI", self.nblocks - 1, self.bs).ljust(32, b"\0")[:_be(cdb, 10, 4)]

    def mode_sense(self, cdb: bytes) -> bytes:
        ten = cdb[0] == 0x5A
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        alloc = _be(cdb, 7, 2) if ten else cdb[4]
        if pc == 3:
            raise Check(ILLEGAL_REQUEST, SAVING_NOT_SUPPORTED)
        if subpage not in (0, 0xFF):
            raise Check(ILLEGAL_REQUEST, INVALID_FIELD)
        changeable = pc == 1
        caching = bytearray(20)
        caching[0:2] = b"\x08\x12"
        caching[2] = 0x04  # WCE: answers leave the page cache; a flush makes them durable
        control = bytearray(12)
        control[0:2] = b"\x0a\x0a"
        if changeable:
            caching[2] = 0
        else:
            control[3] = 0x10  # unrestricted reordering
        pages = {0x08: bytes(caching), 0x0A: bytes(control)}
        if page == 0x3F:
            body = pages[0x08] + pages[0x0A]
        elif page in pages:
            body = pages[page]
        else:
            raise Check(ILLEGAL_REQUEST, INVALID_FIELD)
        dev_specific = 0x10  # DPOFUA: FUA honoured
        if ten:
            head = struct.pack(">HBBxxH", 6 + len(body), 0, dev_specific, 0)
        else:
            head = bytes((3 + len(body), 0, dev_specific, 0))
        return (head + body)[:alloc]

    def report_luns(self, cdb: bytes) -> bytes:
        return (struct.pack(">I4x", 8) + bytes(8))[:_be(cdb, 6, 4)]

    # -- commands -----------------------------------------------------------------------
    def rw(self, cdb: bytes, views: list[memoryview], total: int) -> None:
        op = cdb[0]
        if op in (0x08, 0x0A):
            lba, blocks, fua = _be(cdb, 1, 3) & 0x1FFFFF, cdb[4] or 256, False
        else:
            if op in (0x28, 0x2A):
                lba, blocks = _be(cdb, 2, 4), _be(cdb, 7, 2)
            elif op in (0xA8, 0xAA):
                lba, blocks = _be(cdb, 2, 4), _be(cdb, 6, 4)
            else:
                lba, blocks = _be(cdb, 2, 8), _be(cdb, 10, 4)
            if cdb[1] & 0xE7:  # RDPROTECT/WRPROTECT, RARC, obsolete bits: not supported
                raise Check(ILLEGAL_REQUEST, INVALID_FIELD)
            fua = bool(cdb[1] & 0x08)
        if lba + blocks > self.nblocks:
            raise Check(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
        if not blocks:
            return
        length = blocks * self.bs
        if total != length:  # the kernel sized the buffer from the CDB; a mismatch is a bug
            raise Check(HARDWARE_ERROR, INTERNAL_FAILURE)
        off = lba * self.bs
        write = op & 0x02 != 0
        try:
            if write:
                for fd in (self.a, self.b):
                    _full(os.pwritev, fd, views, off, length)
                if fua:
                    os.fdatasync(self.a)
                    os.fdatasync(self.b)
            else:
                _full(os.preadv, self.a, views, off, length)
        except OSError:
            raise Check(MEDIUM_ERROR, WRITE_ERROR if write else READ_ERROR) from None

    def sync(self, cdb: bytes) -> None:
        try:
            os.fdatasync(self.a)
            os.fdatasync(self.b)
        except OSError:
            raise Check(MEDIUM_ERROR, WRITE_ERROR) from None


def _full(call, fd: int, views: list[memoryview], off: int, length: int) -> None:
    """``pwritev``/``preadv`` the whole transfer: a short one goes on from where it ended."""
    n = call(fd, views, off)
    while n < length:
        if n <= 0:
            raise OSError(errno.EIO, "transfer made no progress")
        done, rest = 0, []
        for v in views:  # the views not yet (fully) transferred
            if done + len(v) > n:
                rest.append(v[max(0, n - done):])
            done += len(v)
        got = call(fd, rest, off + n)
        if got <= 0:
            raise OSError(errno.EIO, "transfer made no progress")
        n += got


_DATA_IN = {0x12: PlainMirror.inquiry, 0x25: PlainMirror.read_capacity10,
            0x9E: PlainMirror.read_capacity16, 0x1A: PlainMirror.mode_sense,
            0x5A: PlainMirror.mode_sense, 0xA0: PlainMirror.report_luns}
_RW = frozenset((0x08, 0x0A, 0x28, 0x2A, 0xA8, 0xAA, 0x88, 0x8A))
_CDB_LEN = (6, 10, 10, 12, 16, 12, 10, 10)


def find_uio(device: str) -> Path | None:
    """/sys/class/uio/uioN of the TCMU backstore named ``device``."""
    for entry in Path("/sys/class/uio").glob("uio*"):
        try:
            parts = (entry / "name").read_text().split("/", 3)
        except OSError:
            continue
        if len(parts) >= 3 and parts[0] == "tcm-user" and parts[2] == device:
            return entry
    return None


def configfs_info(entry: Path) -> tuple[int, int, str]:
    """(size, block size, unit serial) from the backstore's configfs directory."""
    hba, dev = entry.joinpath("name").read_text().split("/")[1:3]
    base = Path("/sys/kernel/config/target/core") / f"user_{hba}" / dev
    info = (base / "info").read_text()
    size = int(info.split(" Size: ")[1].split()[0]) if " Size: " in info else 0
    bs = int((base / "attrib/hw_block_size").read_text())
    serial = (base / "wwn/vpd_unit_serial").read_text().rpartition(":")[2].strip()
    return size, bs, serial


class Served:
    """Counters the loop keeps (printed at exit)."""

    commands = 0
    batches = 0


class Ring:
    """The consumer side of the command ring, in ring order (each answer in its own slot)."""

    def __init__(self, mm: mmap.mmap | memoryview, scsi: PlainMirror) -> None:
        self.mv = memoryview(mm)
        _version, flags, self.cmdr_off, self.cmdr_size, _head = _MAILBOX.unpack_from(self.mv, 0)
        self.data_off, self.map_size = self.cmdr_off + self.cmdr_size, len(self.mv)
        self.read_len_ok = bool(flags & 2)  # TCMU_MAILBOX_FLAG_CAP_READ_LEN
        self.rp = _U32.unpack_from(self.mv, _CMD_TAIL_OFF)[0]
        self.scsi = scsi

    def batch(self) -> int:
        """Serve every entry up to ``cmd_head`` and store ``cmd_tail`` once.  Returns -1 when
        nothing moved (no notify needed), else how many commands were answered."""
        mv, scsi = self.mv, self.scsi
        cmdr_off, cmdr_size, data_off, map_size = (self.cmdr_off, self.cmdr_size,
                                                   self.data_off, self.map_size)
        rp = self.rp
        head = _U32.unpack_from(mv, 12)[0]
        if head == rp:
            return -1
        served = 0
        while rp != head:
            eoff = cmdr_off + rp
            len_op = _U32.unpack_from(mv, eoff)[0]
            length = len_op & ~7
            if not length or rp + length > cmdr_size:
                raise RuntimeError(f"corrupt ring entry at {rp}")
            if len_op & 7 == _OP_CMD:
                status, snse, read_len = run(mv, eoff, length, data_off, map_size, scsi)
                if read_len is not None and not self.read_len_ok:
                    read_len = None  # the kernel then assumes the whole buffer was filled
                # kflags 0, uflags (READ_LEN for a short reply), status, read_len
                _RSP.pack_into(mv, eoff + 6, 0, 2 if read_len is not None else 0, status,
                               read_len or 0)
                if snse is not None:
                    mv[eoff + _SENSE_OFF:eoff + _SENSE_OFF + 96] = snse.ljust(96, b"\0")
                served += 1
            # anything else is a PAD, or a TMR (tmr_notification is off): nothing to answer
            rp += length
            if rp == cmdr_size:
                rp = 0
        self.rp = rp
        _U32.pack_into(mv, _CMD_TAIL_OFF, rp)
        return served


def serve(fd: int, ring: Ring, stop: list[bool], counts: Served) -> None:
    """The loop: poll, read the event count, serve the batch, notify once."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    notify = bytes(4)
    while not stop[0]:
        if not poller.poll(1000):
            continue
        try:
            os.read(fd, 4)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return  # the backstore was deleted
            raise
        served = ring.batch()
        if served >= 0:
            os.write(fd, notify)
            counts.commands += served
            counts.batches += 1


def run(mv: memoryview, eoff: int, length: int, data_off: int, map_size: int,
        scsi: PlainMirror) -> tuple[int, bytes | None, int | None]:
    """Serve one command entry; (status, sense or None, read_len or None)."""
    iov_cnt, bidi, dif, cdb_off = _REQ.unpack_from(mv, eoff + 8)
    end = eoff + length
    iov_end = eoff + _REQ_IOV_OFF + 16 * (iov_cnt + bidi)
    if length < _ENTRY_MIN or dif or bidi or iov_end > end or not iov_end <= cdb_off < end:
        return CHECK_CONDITION, sense(ILLEGAL_REQUEST, INVALID_FIELD), None
    op = mv[cdb_off]
    cdb_len = _CDB_LEN[op >> 5]
    if cdb_off + cdb_len > end:
        return CHECK_CONDITION, sense(ILLEGAL_REQUEST, INVALID_FIELD), None
    cdb = bytes(mv[cdb_off:cdb_off + cdb_len])
    views = []
    total = 0
    for i in range(iov_cnt):
        base, n = _IOV.unpack_from(mv, eoff + _REQ_IOV_OFF + 16 * i)
        if base < data_off or base + n > map_size:
            return CHECK_CONDITION, sense(ILLEGAL_REQUEST, INVALID_FIELD), None
        views.append(mv[base:base + n])
        total += n
    try:
        if op in _RW:
            scsi.rw(cdb, views, total)
        elif op == 0x00:  # TEST UNIT READY
            pass
        elif op in (0x35, 0x91):
            scsi.sync(cdb)
        elif op in _DATA_IN:
            data = _DATA_IN[op](scsi, cdb)
            pos = 0
            for v in views:
                chunk = data[pos:pos + len(v)]
                v[:len(chunk)] = chunk
                pos += len(chunk)
            if len(data) < total:
                return GOOD, None, len(data)
        else:
            raise Check(ILLEGAL_REQUEST, INVALID_OPCODE)
    except Check as exc:
        return CHECK_CONDITION, exc.sense, None
    finally:
        for v in views:
            v.release()
    return GOOD, None, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", required=True, help="name of the user:plain backstore")
    ap.add_argument("--image-a", required=True)
    ap.add_argument("--image-b", required=True)
    ap.add_argument("--wait", type=float, default=60.0,
                    help="seconds to wait for the backstore's uio device")
    args = ap.parse_args()
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__(0, True))
    deadline = time.monotonic() + args.wait
    while (entry := find_uio(args.device)) is None:
        if time.monotonic() > deadline or stop[0]:
            print(f"plain_handler: no uio device for backstore {args.device}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    size, bs, serial = configfs_info(entry)
    a = os.open(args.image_a, os.O_RDWR | os.O_CREAT, 0o600)
    b = os.open(args.image_b, os.O_RDWR | os.O_CREAT, 0o600)
    for fd in (a, b):
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    map_size = int((entry / "maps/map0/size").read_text(), 0)
    fd = os.open(f"/dev/{entry.name}", os.O_RDWR | os.O_CLOEXEC)
    mm = mmap.mmap(fd, map_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    counts = Served()
    print(f"plain_handler: serving {args.device} ({entry.name}, {size} bytes, block {bs})",
          flush=True)
    ring = Ring(mm, PlainMirror(a, b, size, bs, serial))
    try:
        serve(fd, ring, stop, counts)
    finally:
        ring.mv.release()
        mm.close()
        os.close(fd)
        os.close(a)
        os.close(b)
    print(f"plain_handler: {counts.commands} commands in {counts.batches} batches", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
