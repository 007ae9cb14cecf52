"""``create``, ``create-volume2``, ``delete``, ``export-snapshot``, ``check-config``: LIO
objects through rtslib-fb (``user:mirror`` backstores, their image files and iSCSI exports)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from targetmirror.cli import common
from targetmirror.config.cfgstring import MirrorSpec, VolumeSpec, check_images, parse, parse_any
from targetmirror.errors import MirrorError, TargetMirrorError
from targetmirror.protocol import DEFAULT_SOCKET
from targetmirror.units import size_arg as parse_size


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
            common.call(args, "status", names=[args.name])
            break
        except TargetMirrorError as exc:
            if time.monotonic() > deadline:
                raise MirrorError(f"targetmirrord did not pick up {args.name} within 60 s: "
                                  f"{exc}") from exc
            time.sleep(0.2)  # polling the daemon until it serves the new device
    rate = None if args.sync_rate is None else args.sync_rate * 1e6
    common.call(args, "sync", name=args.name, rate=rate, wait=False)


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
    if looks_like_a_file(args.cfgstring):
        # the YAML file, given where a cfgstring goes: check it as 'validate' does
        from targetmirror.cli.ui_config import validate_file

        print(f"check-config: {args.cfgstring} is a file, not a cfgstring (a=PATH;b=PATH): "
              "checking it as a YAML configuration file (targetmirror validate)",
              file=sys.stderr)
        return validate_file(args.cfgstring)
    spec = parse(args.cfgstring)
    check_images(spec, args.size)
    print(f"ok: a={spec.image_a} b={spec.image_b}")
    return 0


def looks_like_a_file(text: str) -> bool:
    """A YAML file's path rather than a cfgstring (which always has ``key=value``)."""
    return "=" not in text and (text.endswith((".yaml", ".yml")) or os.path.isfile(text))


def cmd_export_snapshot(args: argparse.Namespace) -> int:
    """Export a split mirror's image A (or an RBD snapshot of it) as a read-only iSCSI LUN."""
    from targetmirror.cli.ui_backup import rbd_leg_a
    from targetmirror.config.cfgstring import SnapshotSpec
    from targetmirror.lio import backstore

    st = common.call(args, "status", names=[args.name])["mirrors"][0]
    if args.rbd_snapshot:
        # an RBD snapshot never changes: it may be exported whatever the mirror does now
        image, access = rbd_leg_a(args.name)
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


def register(sub: Any) -> None:
    """The LIO commands' parsers."""
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

    k = sub.add_parser("check-config", help="check a cfgstring (a=PATH;b=PATH) on this host "
                       "(a YAML file is checked as 'validate' does)")
    k.add_argument("cfgstring", help="a=PATH;b=PATH[;...], or the path of a YAML file")
    k.add_argument("--size", type=parse_size, default=None)
    k.set_defaults(func=cmd_check)

    ex = common.daemon_command(sub, "export-snapshot",
                               "export a split mirror's A read-only over iSCSI")
    ex.add_argument("name")
    ex.add_argument("--snapshot-name", help="backstore name (default NAME_snap)")
    ex.add_argument("--iqn", required=True)
    ex.add_argument("--portal", default="127.0.0.1:3260")
    ex.add_argument("--lun", type=int, default=0)
    ex.add_argument("--initiator", action="append", help="allowed initiator IQN (repeatable)")
    ex.add_argument("--rbd-snapshot", metavar="SNAP",
                    help="export this RBD snapshot of A (see rbd-snapshots) instead of A")
    ex.set_defaults(func=cmd_export_snapshot)
