"""``backup`` and ``rbd-snapshots``: a split copy of image A, copied, handed to a command, or
snapshotted in its Ceph cluster."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from targetmirror.cli import common
from targetmirror.client import BackupCommandFailed, describe_backup, when
from targetmirror.config.cfgstring import parse_any
from targetmirror.errors import MirrorError, TargetMirrorError


def rbd_leg_a(name: str) -> tuple[str, Any]:
    """(image A, its CephAccess) from mirror ``name``'s backstore cfgstring in LIO (what the
    daemon itself opened)."""
    from targetmirror.config.cfgstring import MirrorSpec

    bs = common.lio_seam().read_state().backstores.get(name)
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
        _, rbd_access = rbd_leg_a(args.name)
        keep = _snapshots_keep(args)
    try:
        result = common.client(args).backup(args.name, to=args.to, command=args.exec,
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


def cmd_rbd_snapshots(args: argparse.Namespace) -> int:
    """List the RBD snapshots backup --rbd-snapshot took of a mirror's A (recorded in the
    image's metadata in the cluster), oldest first."""
    from targetmirror import rbdbackup

    image, access = rbd_leg_a(args.name)
    snaps = rbdbackup.list_snapshots(image, access)
    if args.json:
        print(json.dumps({"name": args.name, "image_a": image, "snapshots": snaps}, indent=1))
        return 0
    print(f"{'SNAPSHOT':40} {'EPOCH':>5}  SPLIT INSTANT")
    for s in snaps:
        print(f"{s['snapshot']:40} {s.get('epoch', '?'):>5}  {when(s.get('instant_wall'))}")
    return 0


def register(sub: Any) -> None:
    """The backup commands' parsers."""
    bk = common.daemon_command(sub, "backup",
                               "split and back up image A (copy it, or run a command on it)")
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

    rs = common.daemon_command(sub, "rbd-snapshots",
                               "list backup --rbd-snapshot's snapshots of a mirror's A")
    rs.add_argument("name")
    rs.set_defaults(func=cmd_rbd_snapshots)
