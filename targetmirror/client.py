"""The one client of ``targetmirrord``'s control API, shared by ``targetmirror`` (the CLI) and
``targetmirror-shell``.

Every operation an admin can ask for is here exactly once -- what to send to the daemon, in what
order (``backup`` splits first unless the mirror is split already, refuses an unusable A, copies
or runs a command, optionally rejoins) -- together with the one-line descriptions both front ends
print.  The front ends only parse their own syntax and display; neither talks to the socket
itself, so the shell can never drift from the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from targetmirror.errors import MirrorError
from targetmirror.protocol import DEFAULT_SOCKET, call
from targetmirror.store.rbd import CephAccess


def when(ts: float | None) -> str:
    """Local time with milliseconds, or ``-``."""
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + \
        f".{int(ts * 1000) % 1000:03d}"


def copy_progress(m: dict[str, Any]) -> tuple[int, int] | None:
    """(bytes done, bytes in all) of the copy a mirror is running (sync, rejoin, repair,
    recovery, verify: its ``resync`` status), or None when nothing is copying or the total is
    not known yet (a rejoin counts its regions first)."""
    rs = m.get("resync") or {}
    if not rs:
        return None
    total = rs.get("bytes_total")
    if total:
        done = rs.get("cursor")
        return int(done if done is not None else rs.get("bytes_copied", 0)), int(total)
    regions = rs.get("regions_total")
    region_size = (m.get("bitmap") or {}).get("region_size") or 0
    if regions and region_size:
        return int(rs.get("regions_done", 0)) * region_size, int(regions) * region_size
    return None


def copy_percent(m: dict[str, Any]) -> str:
    """``Cpy%`` (as lvs shows it): how far the running copy is, ``-`` when none runs."""
    rs = m.get("resync") or {}
    if not rs:
        return "-"
    if rs.get("error"):
        return "failed"
    progress = copy_progress(m)
    if progress is None:
        return "0.0"
    done, total = progress
    return f"{100.0 * min(done, total) / total:.1f}"


def eta_text(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``12s``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def status_rows(mirrors: Sequence[dict[str, Any]],
                config: dict[str, Any] | None = None) -> list[str]:
    """The ``status`` table, header first, columns aligned; under it, loudly, every mirror that
    is not healthy (a failed leg, a failed copy, a LUN answered NOT READY) and the problems of
    the configuration file."""
    rows = [("NAME", "STATE", "EPOCH", "WRITES", "PRE-SPLIT", "SPLIT INSTANT", "DRAIN", "A",
             "COPY", "CPY%", "ETA")]
    for m in mirrors:
        sp = m.get("split") or {}
        rs = m.get("resync") or {}
        drain = sp.get("drain_seconds")
        rows.append((
            m["name"], m["state"], str(m.get("epoch", "-")), str(m.get("writes_in_flight", "-")),
            str(m.get("pre_split_in_flight", "-")), when(sp.get("instant_wall")),
            "-" if drain is None else f"{drain * 1000:.3f} ms", sp.get("a_status", "-"),
            str(rs.get("kind", "-")), copy_percent(m),
            "-" if rs.get("error") else eta_text(rs.get("eta_seconds"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    for m in mirrors:  # a failed leg is said loudly, under the table
        health = m.get("health", "ok")
        if m["state"] == "not-ready":
            lines.append(f"{m['name']}: NOT READY ({m.get('reason_code') or 'error'}): "
                         f"{m.get('reason')}")
        elif health != "ok":
            word = "DEGRADED" if health == "degraded" else "FAILED (no complete leg)"
            lines.append(f"{m['name']}: {word}")
            for leg, f in sorted((m.get("failed_legs") or {}).items()):
                lines.append(f"  leg {leg.upper()} failed at {when(f.get('wall'))}: "
                             f"{f.get('reason')}")
        rs = m.get("resync") or {}
        if rs.get("error"):
            lines.append(f"{m['name']}: {rs.get('kind')} failed: {rs['error']}")
    if config and config.get("problems"):
        n = len(config["problems"])
        lines.append(f"configuration {config['path']}: {n} problem{'s' if n != 1 else ''}"
                     + (f", refusing {', '.join(config['refused'])}" if config.get("refused")
                        else "") + f" (targetmirror validate {config['path']})")
    return lines


def unhealthy(mirrors: Sequence[dict[str, Any]]) -> list[str]:
    """Names of the mirrors ``status --check`` reports: degraded, failed, a leg failed, a
    copy failed, or answered NOT READY."""
    return [m["name"] for m in mirrors
            if m.get("health", "ok") != "ok" or m.get("failed_legs")
            or m["state"] == "not-ready" or (m.get("resync") or {}).get("error")]
def describe_schedule(s: dict[str, Any]) -> str:
    """One line of ``status`` for a scheduled split (daemon/schedule.py): a missed or failed
    one says why and how to clear it."""
    line = f"scheduled split {s['id']}: {', '.join(s['names'])} at {when(s['at'])}"
    state = s.get("state", "pending")
    if state in ("missed", "failed"):
        line += (f" -- {state.upper()}: {s.get('note')} (clear with 'targetmirror cancel "
                 f"{s['id']}')")
    elif state != "pending":
        line += f" ({state})"
    return line


def describe_rejoin(m: dict[str, Any]) -> str:
    lr = m.get("last_rejoin") or {}
    if m["state"] == "mirrored":
        return (f"{m['name']}: mirrored again (epoch {m['epoch']}), "
                f"{lr.get('bytes_copied', 0)} bytes copied in {lr.get('seconds', 0):.3f} s")
    return f"{m['name']}: {m['state']} (rejoin running in the background)"


def describe_sync(res: dict[str, Any]) -> str:
    if res["state"] == "mirrored":
        ls = res.get("last_sync") or {}
        return (f"{res['name']}: initial sync complete, {ls.get('bytes_copied', 0)} bytes in "
                f"{ls.get('seconds', 0):.2f} s")
    return (f"{res['name']}: initial sync running in the background "
            "(see 'targetmirror status')")


def describe_verify(res: dict[str, Any]) -> str:
    return (f"{res['name']} ({res['state']}): {res['regions_checked']} regions compared "
            f"({res['bytes_compared']} bytes, {res['seconds']:.2f} s), "
            f"{res['regions_skipped_changed']} skipped as changed since the split, "
            f"{res['mismatches']} mismatching"
            + (f" (first at LBA {', '.join(map(str, res['first_mismatch_lbas']))})"
               if res["mismatches"] else "")
            + (f", {res['repaired']} repaired" if res["repaired"] else ""))


def describe_backup(result: dict[str, Any]) -> str:
    return (f"backed up {result['name']} epoch {result['epoch']} (split at "
            f"{when(result['instant_wall'])}, A {result['a_status']})"
            + (f" to {result['to']}" if result.get("to") else "")
            + ("; rejoined" if result.get("rejoin") is not None else
               "; the mirror stays split"))


def copy_image(src: str, dst: str, size: int) -> int:
    """Copy ``size`` bytes of ``src`` to the new file ``dst``, leaving all-zero chunks as holes;
    returns the bytes written.  Shows a progress bar when stderr is a terminal."""
    from tqdm import tqdm

    chunk = 4 << 20
    copied = 0
    fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd_out, size)
            buf = bytearray(chunk)
            view = memoryview(buf)
            with tqdm(total=size, unit="B", unit_scale=True, desc="backup",
                      disable=not sys.stderr.isatty()) as bar:
                pos = 0
                while pos < size:
                    n = os.preadv(fd_in, [view[: min(chunk, size - pos)]], pos)
                    if n <= 0:
                        break
                    if buf.count(0, 0, n) != n:
                        os.pwritev(fd_out, [view[:n]], pos)
                        copied += n
                    pos += n
                    bar.update(n)
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    return copied


class BackupCommandFailed(MirrorError):
    """``backup --exec``: the admin's command exited non-zero (the mirror stays split)."""

    code = "backup-exec"

    def __init__(self, status: int, result: dict[str, Any]) -> None:
        super().__init__(f"backup command exited with {status}; the mirror stays split")
        self.status = status
        self.result = result


class Client:
    """Typed calls to one daemon's control socket."""

    def __init__(self, socket: str = DEFAULT_SOCKET,
                 call_fn: Callable[..., dict[str, Any]] = call) -> None:
        self.socket = socket
        self._call = call_fn

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        return self._call(self.socket, op, **kw)

    def status(self, names: Sequence[str] = ()) -> dict[str, Any]:
        return self.call("status", names=list(names))

    def mirror(self, name: str) -> dict[str, Any]:
        m: dict[str, Any] = self.status([name])["mirrors"][0]
        return m

    def split(self, names: Sequence[str] = (), *, group: str | None = None,
              at: float | None = None, wait: bool = True,
              timeout: float = 300.0, one_way: bool = False) -> dict[str, Any]:
        return self.call("split", names=list(names), group=group, at=at, wait=wait,
                         timeout=timeout, one_way=one_way)

    def cancel(self, split_id: int) -> dict[str, Any]:
        return self.call("cancel", id=split_id)

    def rejoin(self, names: Sequence[str] = (), *, group: str | None = None,
               full: bool = False, rate_mbps: float | None = None, wait: bool = True,
               timeout: float = 3600.0) -> dict[str, Any]:
        rate = None if rate_mbps is None else rate_mbps * 1e6
        return self.call("rejoin", names=list(names), group=group, full=full, rate=rate,
                         wait=wait, timeout=timeout)

    def sync(self, name: str, *, rate_mbps: float | None = None, wait: bool = True,
             timeout: float = 3600.0) -> dict[str, Any]:
        rate = None if rate_mbps is None else rate_mbps * 1e6
        res: dict[str, Any] = self.call("sync", name=name, rate=rate, wait=wait,
                                        timeout=timeout)["sync"]
        return res

    def verify(self, name: str, *, repair: bool = False, offset: int = 0,
               length: int | None = None, rate_mbps: float | None = None,
               timeout: float = 3600.0) -> dict[str, Any]:
        rate = None if rate_mbps is None else rate_mbps * 1e6
        return self.call("verify", name=name, repair=repair, offset=offset, length=length,
                         rate=rate, timeout=timeout)

    def group_create(self, group: str, names: Sequence[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = self.call("group-create", group=group,
                                                 names=list(names))["groups"]
        return groups

    def group_delete(self, group: str) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = self.call("group-delete", group=group)["groups"]
        return groups

    def backup(self, name: str, *, to: str | None = None, command: Sequence[str] | None = None,
               rejoin: bool = False, timeout: float = 300.0,
               rbd_access: CephAccess | None = None, keep: int = 0) -> dict[str, Any]:
        """Split (unless already split), then back up image A: copy it to the new file ``to``,
        run ``command`` (no shell) with ``TARGETMIRROR_IMAGE=<A>``, or (``rbd_access``) take an
        RBD snapshot of A in its cluster, pruned to ``keep``; rejoin if asked.
        Raises :class:`BackupCommandFailed` when the command fails (nothing is rejoined)."""
        if [to is None, command is None, rbd_access is None].count(False) != 1:
            raise MirrorError("backup needs exactly one of a destination file, a command or "
                              "--rbd-snapshot")
        st = self.mirror(name)
        if st["state"] == "mirrored":
            st = self.split([name], wait=True, timeout=timeout)["split"][0]
        elif st["state"] != "split":
            raise MirrorError(f"mirror {name} is {st['state']}; wait for the split to finish")
        sp = st["split"]
        if sp["a_status"] not in ("consistent", "crash-consistent"):
            raise MirrorError(f"image A of {name} is not a usable copy: {sp['a_status']}")
        result: dict[str, Any] = {"name": name, "epoch": sp["epoch"], "image_a": st["image_a"],
                                  "instant_wall": sp["instant_wall"],
                                  "a_status": sp["a_status"]}
        if rbd_access is not None:
            from targetmirror import rbdbackup

            result.update(rbdbackup.take(st["image_a"], rbd_access, mirror=name, split=sp,
                                         keep=keep))
        elif to is not None:
            result["copied_bytes"] = copy_image(st["image_a"], to, st["size"])
            result["to"] = to
        else:
            assert command is not None
            env = dict(os.environ, TARGETMIRROR_MIRROR=name, TARGETMIRROR_IMAGE=st["image_a"],
                       TARGETMIRROR_EPOCH=str(sp["epoch"]),
                       TARGETMIRROR_INSTANT=str(sp["instant_wall"]))
            rc = subprocess.run(list(command), env=env, check=False).returncode
            result["exec_status"] = rc
            if rc != 0:
                raise BackupCommandFailed(rc, result)
        if rejoin:
            done = self.rejoin([name], wait=True, timeout=timeout)["rejoin"][0]
            result["rejoin"] = done.get("last_rejoin") or {}
        return result
