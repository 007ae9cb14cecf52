"""``targetmirror``: the admin's command line.

* ``create`` / ``delete`` / ``check-config``: ``user:mirror`` backstores through rtslib-fb
  (optionally creating the image files and an iSCSI export).
* ``apply``: makes LIO match the YAML configuration (:mod:`targetmirror.config.plan`);
  ``list``: the ``user:mirror`` backstores LIO has, with exports and ownership.
* ``split``, ``status``, ``group``, ``cancel``, ``backup``: talk to ``targetmirrord`` over its
  control socket; the daemon does the work, the CLI only asks and shows.

Every failure prints one line ``targetmirror: <code>: <message>`` and exits non-zero; nothing is
left half made.  ``--json`` prints the daemon's machine-readable answer instead of a table.

Exit codes: 0 success, 1 a targetmirror error (bad input, refused operation, daemon
unreachable), 2 usage error, 3 the backup command run by ``backup --exec`` failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from targetmirror import __version__, selftest
from targetmirror.client import (
    BackupCommandFailed,
    Client,
    describe_backup,
    describe_rejoin,
    describe_schedule,
    describe_sync,
    describe_verify,
    status_rows,
    when,
)
from targetmirror.config.cfgstring import MirrorSpec, VolumeSpec, check_images, parse, parse_any
from targetmirror.daemon.control import DEFAULT_SOCKET
from targetmirror.errors import ConfigError, MirrorError, TargetMirrorError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``512M``, ``1G``, ``2TiB`` -> bytes (binary units, like LVM and targetcli)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 4096, 512M or 1G, got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _create_image(path: str, size: int) -> None:
    """Make a sparse image file of ``size`` bytes unless it exists (never truncate data)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def cmd_create(args: argparse.Namespace) -> int:
    from targetmirror.config.cfgstring import ceph_items
    from targetmirror.lio import backstore
    from targetmirror.store.rbd import CephAccess, is_rbd

    def leg(text: str) -> str:
        return text if is_rbd(text) else os.path.abspath(text)

    spec = MirrorSpec(leg(args.image_a), leg(args.image_b))
    acc = CephAccess(args.ceph_conf, args.ceph_id, args.ceph_keyring, args.ceph_timeout)
    text = spec.to_cfgstring() + "".join(ceph_items(acc, f"{k}_") for k, img in
                                         (("a", spec.image_a), ("b", spec.image_b))
                                         if is_rbd(img))
    spec = parse(text)  # validate before touching anything
    if args.create_images:
        for path in (spec.image_a, spec.image_b):
            if not is_rbd(path):  # an RBD image is made with `rbd create` (docs/rbd.md)
                _create_image(path, args.size)
    check_images(spec, args.size)
    so = backstore.create_backstore(args.name, args.size, spec.to_cfgstring(),
                                    hw_max_sectors=args.hw_max_sectors, check=False)
    if args.initial_sync:
        # Start the sync before any initiator can see the LUN: until then reads would come
        # from the still empty B.
        try:
            _start_initial_sync(args)
        except TargetMirrorError:
            so.delete()
            raise
    if args.iqn:
        _export_or_delete(so, args)
    print(f"created user:mirror {args.name} ({args.size} bytes) a={spec.image_a} "
          f"b={spec.image_b}" + (f" exported as {args.iqn} LUN {args.lun}" if args.iqn else ""))
    return 0


def _export_or_delete(so: Any, args: argparse.Namespace) -> None:
    """Export a new backstore as ``--iqn``; if that fails, delete the backstore again, so a
    failed create leaves nothing behind (rtslib-fb's roll back on failed construction)."""
    from targetmirror.lio import iscsi

    host, _, port = args.portal.rpartition(":")
    try:
        iscsi.export(so, args.iqn, portal=(host, int(port)), lun=args.lun,
                     initiators=args.initiator or ())
    except TargetMirrorError:
        so.delete()
        raise


def _start_initial_sync(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            _call(args, "status", names=[args.name])
            break
        except TargetMirrorError as exc:
            if time.monotonic() > deadline:
                raise MirrorError(f"targetmirrord did not pick up {args.name} within 60 s: "
                                  f"{exc}") from exc
            time.sleep(0.2)  # polling the daemon until it serves the new device
    rate = None if args.sync_rate is None else args.sync_rate * 1e6
    _call(args, "sync", name=args.name, rate=rate, wait=False)


def cmd_create_volume2(args: argparse.Namespace) -> int:
    """A second LUN of an existing mirror (``mirror=NAME;volume=2``), for one-way cut-over."""
    from targetmirror.lio import backstore

    spec = VolumeSpec(args.of)
    parse_any(spec.to_cfgstring())  # validate before touching anything
    owner = backstore.find_backstore(args.of)
    if owner is None:
        raise MirrorError(f"no user:mirror backstore named {args.of!r} to add a volume 2 to")
    so = backstore.create_backstore(args.name, int(owner.size), spec.to_cfgstring(),
                                    hw_max_sectors=args.hw_max_sectors, check=False)
    if args.iqn:
        _export_or_delete(so, args)
    print(f"created volume 2 {args.name} of mirror {args.of}"
          + (f" exported as {args.iqn} LUN {args.lun}" if args.iqn else ""))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from targetmirror.lio import backstore, iscsi

    backstore.delete_backstore(args.name)
    if args.iqn:
        iscsi.unexport(args.iqn)
    print(f"deleted user:mirror {args.name}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    spec = parse(args.cfgstring)
    check_images(spec, args.size)
    print(f"ok: a={spec.image_a} b={spec.image_b}")
    return 0


def _lio_seam() -> Any:
    """The rtslib seam apply and list use (tests replace this function with a fake)."""
    from targetmirror.lio.live import RtslibLio

    return RtslibLio()


class _DaemonGroups:
    """Consistency groups through targetmirrord's control API."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def all(self) -> dict[str, list[str]]:
        from targetmirror.daemon.control import call

        return dict(call(self.socket, "status")["groups"])

    def create(self, group: str, names: list[str]) -> None:
        from targetmirror.daemon.control import call

        call(self.socket, "group-create", group=group, names=names)

    def delete(self, group: str) -> None:
        from targetmirror.daemon.control import call

        call(self.socket, "group-delete", group=group)


class _NoGroups:
    """Stands in when the daemon is down and neither the file nor the manifest has groups."""

    def all(self) -> dict[str, list[str]]:
        return {}

    def create(self, group: str, names: list[str]) -> None:
        raise MirrorError("consistency groups need targetmirrord running")

    delete = create


def cmd_apply(args: argparse.Namespace) -> int:
    """Make LIO (and the daemon's groups) match the YAML file; see targetmirror.config.plan."""
    from targetmirror.config import apply as ap
    from targetmirror.config import loader
    from targetmirror.config.plan import Manifest, manifest_path

    config = loader.load(args.config)
    socket = args.socket or config.daemon.control_socket
    groups: Any = _DaemonGroups(socket)
    try:
        groups.all()
    except TargetMirrorError as exc:
        if config.groups or Manifest.load(manifest_path(config)).groups:
            raise MirrorError(f"the file's consistency groups live in targetmirrord, which "
                              f"does not answer on {socket} ({exc}); start it first") from exc
        groups = _NoGroups()
    lines: list[str] = []
    result = ap.apply(config, _lio_seam(), groups, dry_run=args.dry_run,
                      out=lines.append if args.json else print)
    if args.json:
        print(json.dumps({"config": config.path, "dry_run": args.dry_run,
                          "plan": [a.text for a in result.actions],
                          "applied": [a.text for a in result.done]}, indent=1))
    return 0


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _human(size: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def cmd_list(args: argparse.Namespace) -> int:
    """Every user:mirror backstore in LIO: images, exports, who made it, the daemon's view."""
    from targetmirror.config import loader
    from targetmirror.config.cfgstring import parse_any
    from targetmirror.config.plan import Manifest, manifest_path

    state = _lio_seam().read_state()
    owned: dict[str, str] = {}
    socket = args.socket
    try:
        config = loader.load(args.config)
        owned = Manifest.load(manifest_path(config)).backstores
        socket = socket or config.daemon.control_socket
    except TargetMirrorError:
        config = None  # no (valid) file: ownership is unknown, list LIO as it is
    try:
        st = _call(argparse.Namespace(socket=socket or DEFAULT_SOCKET), "status")
        daemon: dict[str, Any] = {m["name"]: m for m in st["mirrors"]}
        group_of = {n: g for g, names in st.get("groups", {}).items() for n in names}
    except TargetMirrorError:
        daemon, group_of = {}, {}
    out = []
    for name, bs in sorted(state.backstores.items()):
        try:
            spec: Any = parse_any(bs.config)
        except TargetMirrorError:
            spec = None
        exports = [{"target": iqn, "lun": lun} for iqn, t in sorted(state.targets.items())
                   for lun, so in sorted(t.luns.items()) if so == name]
        m = daemon.get(name)
        out.append({
            "name": name, "size": bs.size, "cfgstring": bs.config, "wwn": bs.wwn,
            "image_a": getattr(spec, "image_a", None), "image_b": getattr(spec, "image_b", None),
            "snapshot_of": getattr(spec, "image", None),
            "exports": exports, "group": group_of.get(name),
            "managed_by_apply": owned.get(name) == bs.wwn and bool(bs.wwn),
            "state": m["state"] if m else ("unknown" if not daemon else "not-served")})
    if args.json:
        print(json.dumps({"config": config.path if config else None, "mirrors": out},
                         indent=1))
        return 0
    rows = [("NAME", "SIZE", "STATE", "GROUP", "EXPORTED AS", "MADE BY", "IMAGE A", "IMAGE B")]
    for r in out:
        rows.append((r["name"], _human(r["size"]), r["state"], r["group"] or "-",
                     ", ".join(f"{e['target']} LUN {e['lun']}" for e in r["exports"]) or "-",
                     "apply" if r["managed_by_apply"] else "hand",
                     r["image_a"] or (f"snapshot {r['snapshot_of']}" if r["snapshot_of"]
                                      else "-"),
                     r["image_b"] or "-"))
    _table(rows)
    return 0
def _client(args: argparse.Namespace) -> Client:
    return Client(args.socket)


def _call(args: argparse.Namespace, op: str, **kw: Any) -> dict[str, Any]:
    return _client(args).call(op, **kw)


def _print_status(mirrors: list[dict[str, Any]]) -> None:
    for row in status_rows(mirrors):
        print(row)


def cmd_status(args: argparse.Namespace) -> int:
    res = _client(args).status(args.names)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    _print_status(res["mirrors"])
    for s in res.get("scheduled", []):
        print(describe_schedule(s))
    return 0


def _parse_at(text: str) -> float:
    """``--at``: seconds since the epoch, ``+SECONDS`` from now, or an ISO 8601 local time."""
    if text.startswith("+"):
        return time.time() + float(text[1:])
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected +SECONDS, epoch seconds or an ISO time, got {text!r}") from exc


def cmd_split(args: argparse.Namespace) -> int:
    if args.one_way and (args.group or args.at is not None):
        raise MirrorError("--one-way splits named mirrors now (no --group, no --at)")
    res = _client(args).split(args.names, group=args.group, at=args.at, wait=not args.no_wait,
                              timeout=args.timeout, one_way=args.one_way)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    if "scheduled" in res:
        s = res["scheduled"]
        print(f"split {s['id']} of {', '.join(s['names'])} scheduled at {when(s['at'])}")
        return 0
    _print_status(res["split"])
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    _client(args).cancel(args.id)
    print(f"cancelled scheduled split {args.id}")
    return 0


def cmd_group(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "create":
        groups = client.group_create(args.group, args.names)
    elif args.action == "delete":
        groups = client.group_delete(args.group)
    else:
        groups = client.status()["groups"]
    if args.json:
        print(json.dumps(groups, indent=1))
    else:
        for g, names in sorted(groups.items()):
            print(f"{g}: {' '.join(names)}")
    return 0


def _rbd_leg_a(name: str) -> tuple[str, Any]:
    """(image A, its CephAccess) from mirror ``name``'s backstore cfgstring in LIO (what the
    daemon itself opened)."""
    from targetmirror.config.cfgstring import MirrorSpec

    bs = _lio_seam().read_state().backstores.get(name)
    if bs is None:
        raise MirrorError(f"no user:mirror backstore named {name} in LIO")
    spec = parse_any(bs.config)
    access = spec.access("a") if isinstance(spec, MirrorSpec) else None
    if not isinstance(spec, MirrorSpec) or access is None:
        raise MirrorError(f"image A of {name} is not an RBD image ({bs.config}): "
                          "--rbd-snapshot needs image_a rbd/POOL/IMAGE")
    return spec.image_a, access


def _snapshots_keep(args: argparse.Namespace) -> int:
    """--keep, else the mirror's rbd_snapshots_keep in the config file, else 0 (keep all)."""
    from targetmirror.config import loader

    if args.keep is not None:
        return int(args.keep)
    try:
        return int(loader.load(args.config).mirror(args.name).rbd_snapshots_keep)
    except (TargetMirrorError, KeyError):
        return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """Split (unless already split), then back up image A: copy it, hand it to a command, or
    snapshot it in its Ceph cluster."""
    rbd_access = None
    keep = 0
    if args.rbd_snapshot:
        _, rbd_access = _rbd_leg_a(args.name)
        keep = _snapshots_keep(args)
    try:
        result = _client(args).backup(args.name, to=args.to, command=args.exec,
                                      rejoin=args.rejoin, timeout=args.timeout,
                                      rbd_access=rbd_access, keep=keep)
    except BackupCommandFailed as exc:
        print(f"targetmirror: {exc}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(describe_backup(result))
    return 0


def _follow_rejoin(args: argparse.Namespace, names: list[str]) -> None:
    """A progress bar (bytes copied, ETA) until every named mirror is mirrored again."""
    from tqdm import tqdm

    client = _client(args)
    bar = None
    try:
        while True:
            mirrors = client.status(names)["mirrors"]
            pending = [m for m in mirrors if m["state"] == "rejoining"]
            failed = [m for m in pending if (m.get("resync") or {}).get("error")]
            if failed:
                raise MirrorError(f"rejoin of {failed[0]['name']} failed: "
                                  f"{failed[0]['resync']['error']}")
            total = sum(((m.get("resync") or {}).get("regions_total") or 0)
                        * m["bitmap"]["region_size"] for m in pending)
            done = sum((m.get("resync") or {}).get("bytes_copied", 0) for m in pending)
            if bar is None and total:
                bar = tqdm(total=total, unit="B", unit_scale=True, desc="rejoin")
            if bar is not None:
                bar.update(max(0, done - bar.n))
            if not pending:
                return
            time.sleep(0.5)  # polling the daemon for progress display
    finally:
        if bar is not None:
            bar.close()


def cmd_rejoin(args: argparse.Namespace) -> int:
    """Copy what changed since the split back to A, online; mirrored again afterwards."""
    client = _client(args)
    attached = not args.json and sys.stderr.isatty() and not args.no_wait
    res = client.rejoin(args.names, group=args.group, full=args.full, rate_mbps=args.rate,
                        wait=not args.no_wait and not attached, timeout=args.timeout)
    if attached:
        _follow_rejoin(args, args.names or [m["name"] for m in res["rejoin"]])
        res = {"rejoin": client.status([m["name"] for m in res["rejoin"]])["mirrors"]}
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    for m in res["rejoin"]:
        print(describe_rejoin(m))
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    """Bring a failed leg back: copy to it what changed while it was failed (or everything,
    for a new image given by --replace), online."""
    rate = None if args.rate is None else args.rate * 1e6
    replace = None if args.replace is None else os.path.abspath(args.replace)
    res = _call(args, "repair", name=args.name, leg=args.leg, replace=replace, rate=rate,
                wait=not args.no_wait, timeout=args.timeout)["repair"]
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    rep = res.get("last_repair") or {}
    if res["state"] == "mirrored" and res.get("health") == "ok":
        print(f"{res['name']}: repaired, mirrored again: {rep.get('bytes_copied', 0)} bytes "
              f"copied of {rep.get('image_size', res.get('size'))} in "
              f"{rep.get('seconds', 0):.3f} s")
    else:
        print(f"{res['name']}: {res['state']}, {res.get('health')} (repair running in the "
              "background)")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Initial sync (claim 2): fill B from A online, for a mirror made from an existing A."""
    res = _client(args).sync(args.name, rate_mbps=args.rate, wait=not args.no_wait,
                             timeout=args.timeout)
    print(json.dumps(res, indent=1) if args.json else describe_sync(res))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Compare A and B online; exit 1 when they differ where they should not."""
    res = _client(args).verify(args.name, repair=args.repair, offset=args.offset,
                               length=args.length, rate_mbps=args.rate, timeout=args.timeout)
    print(json.dumps(res, indent=1) if args.json else describe_verify(res))
    return 1 if res["mismatches"] and not res["repaired"] else 0


def cmd_rbd_snapshots(args: argparse.Namespace) -> int:
    """List the RBD snapshots backup --rbd-snapshot took of a mirror's A (recorded in the
    image's metadata in the cluster), oldest first."""
    from targetmirror import rbdbackup

    image, access = _rbd_leg_a(args.name)
    snaps = rbdbackup.list_snapshots(image, access)
    if args.json:
        print(json.dumps({"name": args.name, "image_a": image, "snapshots": snaps}, indent=1))
        return 0
    print(f"{'SNAPSHOT':40} {'EPOCH':>5}  SPLIT INSTANT")
    for s in snaps:
        print(f"{s['snapshot']:40} {s.get('epoch', '?'):>5}  {when(s.get('instant_wall'))}")
    return 0


def cmd_export_snapshot(args: argparse.Namespace) -> int:
    """Export a split mirror's image A (or an RBD snapshot of it) as a read-only iSCSI LUN."""
    from targetmirror.config.cfgstring import SnapshotSpec
    from targetmirror.lio import backstore

    st = _call(args, "status", names=[args.name])["mirrors"][0]
    if args.rbd_snapshot:
        # an RBD snapshot never changes: it may be exported whatever the mirror does now
        image, access = _rbd_leg_a(args.name)
        spec = SnapshotSpec(f"{image}@{args.rbd_snapshot}", access)
    elif st["state"] != "split":
        raise MirrorError(f"mirror {args.name} is {st['state']}: only a split copy can be "
                          "exported (run 'targetmirror split' first)")
    else:
        spec = SnapshotSpec(st["image_a"])
    snap = args.snapshot_name or f"{args.name}_snap"
    so = backstore.create_backstore(snap, st["size"], spec.to_cfgstring(), check=False)
    _export_or_delete(so, args)
    print(f"exported split copy of {args.name} (epoch {st['epoch']}) read-only as {snap}, "
          f"{args.iqn} LUN {args.lun}")
    return 0


EXIT_CODES = """\
exit status:
  0  success (apply: LIO matches the file, whether or not something changed)
  1  targetmirror error: bad input or configuration, refused operation, daemon
     unreachable, LIO failure (stderr: 'targetmirror: CODE: WHY', a config error
     lists every problem of the file on its own line;
     CODE is the error's stable code: config, mirror, lio, store, protocol, ...)
  2  usage error (unknown command or option)
  3  the command run by 'backup --exec' failed (the mirror stays split)

The configuration file is $TARGETMIRROR_CONFIG or /etc/targetmirror/targetmirror.yaml
unless --config is given; see docs/operations.md."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also the source of the man page)."""
    p = argparse.ArgumentParser(prog="targetmirror",
                                description="Split-mirror block service for LIO (TCMU).",
                                epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("create", help="create a user:mirror backstore and export it")
    c.add_argument("name")
    c.add_argument("--size", type=parse_size, required=True, help="LUN size, e.g. 1G")
    c.add_argument("--image-a", required=True,
                   help="image A (the split-off copy): a path or rbd/POOL[/NAMESPACE]/IMAGE")
    c.add_argument("--image-b", required=True,
                   help="image B (the live leg): a path or rbd/POOL[/NAMESPACE]/IMAGE")
    c.add_argument("--ceph-conf", default="/etc/ceph/ceph.conf",
                   help="for RBD legs: the cluster's ceph.conf (default %(default)s)")
    c.add_argument("--ceph-id", default="admin",
                   help="for RBD legs: cephx user without 'client.' (default %(default)s)")
    c.add_argument("--ceph-keyring", default="", help="for RBD legs: that user's keyring")
    c.add_argument("--ceph-timeout", type=int, default=10,
                   help="for RBD legs: seconds before an operation fails the leg")
    c.add_argument("--create-images", action="store_true",
                   help="create missing image files (sparse) of --size")
    c.add_argument("--iqn", help="export over iSCSI as this target IQN")
    c.add_argument("--portal", default="127.0.0.1:3260", help="IP:PORT (default %(default)s)")
    c.add_argument("--lun", type=int, default=0)
    c.add_argument("--initiator", action="append",
                   help="allowed initiator IQN (repeatable); none = demo mode, lab only")
    c.add_argument("--hw-max-sectors", type=int, default=2048,
                   help="largest command in 512-byte sectors (default %(default)s = 1 MiB)")
    c.add_argument("--initial-sync", action="store_true",
                   help="image A holds data: copy it to B online before exporting "
                        "(needs targetmirrord running)")
    c.add_argument("--sync-rate", type=float, default=None, help="initial sync limit, MB/s")
    c.add_argument("--socket", default=DEFAULT_SOCKET,
                   help="targetmirrord's control socket (default %(default)s)")
    c.set_defaults(func=cmd_create)

    v2 = sub.add_parser("create-volume2",
                        help="export an existing mirror a second time, as volume 2 (one-way "
                        "cut-over: see 'split --one-way')")
    v2.add_argument("name", help="the new backstore")
    v2.add_argument("--of", required=True, help="the mirror (its backstore name)")
    v2.add_argument("--iqn", help="export over iSCSI as this target IQN")
    v2.add_argument("--portal", default="127.0.0.1:3260", help="IP:PORT (default %(default)s)")
    v2.add_argument("--lun", type=int, default=0)
    v2.add_argument("--initiator", action="append",
                    help="allowed initiator IQN (repeatable); none = demo mode, lab only")
    v2.add_argument("--hw-max-sectors", type=int, default=2048)
    v2.set_defaults(func=cmd_create_volume2)

    d = sub.add_parser("delete", help="delete a user:mirror backstore (and its iSCSI target)")
    d.add_argument("name")
    d.add_argument("--iqn", help="also delete this iSCSI target")
    d.set_defaults(func=cmd_delete)

    ap = sub.add_parser("apply", help="make LIO match the YAML configuration file",
                        description="Create, change and remove LIO objects (user:mirror "
                        "backstores, iSCSI targets, LUNs, ACLs, CHAP) and consistency groups "
                        "so that they match the file. Idempotent; removes only what an earlier "
                        "apply created (see docs/operations.md).")
    ap.add_argument("--config", default=None,
                    help="the YAML file (default $TARGETMIRROR_CONFIG or "
                         "/etc/targetmirror/targetmirror.yaml)")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate and print the plan; change nothing")
    ap.add_argument("--socket", default=None,
                    help="targetmirrord's control socket (default: daemon.control_socket "
                         "of the file)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.set_defaults(func=cmd_apply)

    ls = sub.add_parser("list", help="list user:mirror backstores: exports, group, state, "
                        "and whether apply made them")
    ls.add_argument("--config", default=None,
                    help="the YAML file whose state directory records what apply made")
    ls.add_argument("--socket", default=None, help="targetmirrord's control socket")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)

    k = sub.add_parser("check-config", help="check a cfgstring (a=PATH;b=PATH) on this host")
    k.add_argument("cfgstring")
    k.add_argument("--size", type=parse_size, default=None)
    k.set_defaults(func=cmd_check)

    def daemon_cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--socket", default=DEFAULT_SOCKET,
                        help="targetmirrord's control socket (default %(default)s)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    st = daemon_cmd("status", "show mirrors: state, epoch, in-flight writes, last split")
    st.add_argument("names", nargs="*")
    st.set_defaults(func=cmd_status)

    sp = daemon_cmd("split", "split mirrors (or a consistency group) at one instant")
    sp.add_argument("names", nargs="*", help="mirrors to split together")
    sp.add_argument("--group", help="a consistency group (see 'targetmirror group')")
    sp.add_argument("--at", type=_parse_at, default=None,
                    help="split at a time: +SECONDS, epoch seconds or ISO 8601")
    sp.add_argument("--no-wait", action="store_true",
                    help="return at the instant instead of when A is complete")
    sp.add_argument("--timeout", type=float, default=300.0)
    sp.add_argument("--one-way", action="store_true",
                    help="one-way cut-over (claim 4): volume 1 keeps writing A and B, "
                    "volume 2 writes B only; ended by 'rejoin'")
    sp.set_defaults(func=cmd_split)

    ca = daemon_cmd("cancel", "cancel a scheduled split")
    ca.add_argument("id", type=int)
    ca.set_defaults(func=cmd_cancel)

    gr = daemon_cmd("group", "consistency groups: create, delete, list")
    gr.add_argument("action", choices=["create", "delete", "list"])
    gr.add_argument("group", nargs="?")
    gr.add_argument("names", nargs="*")
    gr.set_defaults(func=cmd_group)

    bk = daemon_cmd("backup", "split and back up image A (copy it, or run a command on it)")
    bk.add_argument("name")
    dest = bk.add_mutually_exclusive_group(required=True)
    dest.add_argument("--to", help="copy A to this new file (sparse)")
    dest.add_argument("--exec", nargs=argparse.REMAINDER,
                      help="run this command (no shell) with TARGETMIRROR_IMAGE=<A>")
    bk.add_argument("--rejoin", action="store_true",
                    help="rejoin the mirror after a successful backup")
    dest.add_argument("--rbd-snapshot", action="store_true",
                      help="take a snapshot of A (an RBD image) in its Ceph cluster")
    bk.add_argument("--keep", type=int, default=None,
                    help="with --rbd-snapshot: keep this many of our snapshots, pruning the "
                         "oldest (default: mirrors[].rbd_snapshots_keep, 0 keeps all)")
    bk.add_argument("--config", default=None, help="configuration file (for the keep count)")
    bk.add_argument("--timeout", type=float, default=300.0)
    bk.set_defaults(func=cmd_backup)

    rs = daemon_cmd("rbd-snapshots", "list backup --rbd-snapshot's snapshots of a mirror's A")
    rs.add_argument("name")
    rs.set_defaults(func=cmd_rbd_snapshots)

    rj = daemon_cmd("rejoin", "copy what changed since the split back to A (online)")
    rj.add_argument("names", nargs="*")
    rj.add_argument("--group", help="rejoin every mirror of a consistency group")
    rj.add_argument("--full", action="store_true",
                    help="copy every region (A was replaced or the bitmap is not trusted)")
    rj.add_argument("--rate", type=float, default=None, help="limit in MB/s")
    rj.add_argument("--no-wait", action="store_true", help="return once the copy has started")
    rj.add_argument("--timeout", type=float, default=3600.0)
    rj.set_defaults(func=cmd_rejoin)

    rp = daemon_cmd("repair", "bring a failed leg back (incremental resync, or full with "
                    "--replace)")
    rp.add_argument("name")
    rp.add_argument("--leg", choices=["a", "b"], default=None,
                    help="the leg to repair (default: the failed one)")
    rp.add_argument("--replace", metavar="PATH", default=None,
                    help="a new image for the leg: every region is copied to it")
    rp.add_argument("--rate", type=float, default=None, help="limit in MB/s")
    rp.add_argument("--no-wait", action="store_true", help="return once the copy has started")
    rp.add_argument("--timeout", type=float, default=3600.0)
    rp.set_defaults(func=cmd_repair)

    sy = daemon_cmd("sync", "initial sync: copy A to B online (A has data, B is new)")
    sy.add_argument("name")
    sy.add_argument("--rate", type=float, default=None, help="limit in MB/s")
    sy.add_argument("--no-wait", action="store_true", help="return once the copy has started")
    sy.add_argument("--timeout", type=float, default=3600.0)
    sy.set_defaults(func=cmd_sync)

    vf = daemon_cmd("verify", "compare A and B online (exit 1 on an unexpected mismatch)")
    vf.add_argument("name")
    vf.add_argument("--repair", action="store_true",
                    help="copy B over A where they differ (mirrored mirrors only)")
    vf.add_argument("--offset", type=parse_size, default=0)
    vf.add_argument("--length", type=parse_size, default=None)
    vf.add_argument("--rate", type=float, default=None, help="limit in MB/s")
    vf.add_argument("--timeout", type=float, default=3600.0)
    vf.set_defaults(func=cmd_verify)

    stt = daemon_cmd("selftest", "prove the split on this host: a scratch mirror through "
                     "tcm_loop, a writer, a split under load, A and B checked (PASS/FAIL)")
    selftest.add_arguments(stt)
    stt.set_defaults(func=selftest.main)

    ex = daemon_cmd("export-snapshot", "export a split mirror's A read-only over iSCSI")
    ex.add_argument("name")
    ex.add_argument("--snapshot-name", help="backstore name (default NAME_snap)")
    ex.add_argument("--iqn", required=True)
    ex.add_argument("--portal", default="127.0.0.1:3260")
    ex.add_argument("--lun", type=int, default=0)
    ex.add_argument("--initiator", action="append", help="allowed initiator IQN (repeatable)")
    ex.add_argument("--rbd-snapshot", metavar="SNAP",
                    help="export this RBD snapshot of A (see rbd-snapshots) instead of A")
    ex.set_defaults(func=cmd_export_snapshot)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``targetmirror``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (TargetMirrorError, ConfigError) as exc:
        print(f"targetmirror: {exc.code}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
