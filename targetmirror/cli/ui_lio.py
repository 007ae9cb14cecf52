"""``create``, ``create-volume2``, ``delete``, ``export-snapshot``, ``check-config``: LIO
objects through rtslib-fb (``user:mirror`` backstores, their image files and iSCSI exports)."""

from __future__ import annotations

import argparse
import functools
import os
import stat
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from targetmirror.cli import common
from targetmirror.config.cfgstring import MirrorSpec, VolumeSpec, check_images, parse, parse_any
from targetmirror.deadline import retry
from targetmirror.errors import (
    ArgumentsError,
    ConfigError,
    LioError,
    MirrorError,
)
from targetmirror.names import IQN_EXPECTED, NAME_EXPECTED, valid_iscsi_name, valid_name
from targetmirror.netaddr import EXPECTED as NETADDR_EXPECTED
from targetmirror.netaddr import parse_hostport
from targetmirror.protocol import DEFAULT_SOCKET
from targetmirror.units import size_arg as parse_size

SECTOR = 512
MAX_HW_SECTORS = 65535


class Undo:
    """What a command made so far, removed again in reverse order if a later step fails
    (rtslib-fb's rule for a failed construction: nothing is left half made).  A removal that
    fails itself is reported on stderr and does not hide the first error."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def add(self, what: str, undo: Callable[[], None]) -> None:
        self._steps.append((what, undo))

    def __enter__(self) -> Undo:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            return
        for what, undo in reversed(self._steps):
            try:
                undo()
            except Exception as err:  # keep undoing the rest; the first error is raised
                print(f"targetmirror: could not remove {what} again: {err}", file=sys.stderr)


def _create_image(path: str, size: int) -> bool:
    """Make a sparse image file of ``size`` bytes unless a file is there; True if this call
    made it (an existing file is never touched: it is checked like any other image)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return True


def _leg(text: str) -> str:
    from targetmirror.store.rbd import is_rbd

    return text if is_rbd(text) else os.path.abspath(text)


def check_images_args(images: list[tuple[str, str]], size: int, create: bool) -> list[str]:
    """Problems with ``(option, path)`` image arguments, read from the host (nothing made)."""
    from targetmirror.store.rbd import is_rbd, parse_name

    problems = []
    if len(images) == 2 and images[0][1] == images[1][1]:
        problems.append(f"--image-b {images[1][1]}: expected an image other than --image-a")
        images = images[:1]
    for opt, path in images:
        if is_rbd(path):
            try:
                parse_name(path, opt)
            except ConfigError as exc:
                problems.append(str(exc))
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if not create:
                problems.append(f"{opt} {path}: expected an existing image file or block "
                                "device (or --create-images)")
            elif not os.path.isdir(os.path.dirname(path)):
                problems.append(f"{opt} {path}: expected a file in an existing directory "
                                "(--create-images makes files, not directories)")
            continue
        except OSError as exc:
            problems.append(f"{opt} {path}: expected an accessible image, got {exc.strerror}")
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            problems.append(f"{opt} {path}: expected a regular file or block device")
        elif stat.S_ISREG(st.st_mode) and st.st_size < size:
            problems.append(f"{opt} {path}: expected an image of at least {size} bytes "
                            f"(--size), got {st.st_size}")
    return problems


def check_export_args(args: argparse.Namespace) -> list[str]:
    """Problems with ``--iqn``, ``--portal``, ``--lun``, ``--initiator``, ``--demo-mode``."""
    problems = []
    initiators = args.initiator or []
    if not args.iqn:
        if initiators or args.demo_mode:
            problems.append("--initiator/--demo-mode: expected --iqn as well (they say who "
                            "may use the export)")
        return problems
    if not valid_iscsi_name(args.iqn):
        problems.append(f"--iqn {args.iqn}: expected {IQN_EXPECTED}")
    if parse_hostport(args.portal) is None:
        problems.append(f"--portal {args.portal}: expected {NETADDR_EXPECTED}")
    if not 0 <= args.lun <= 255:
        problems.append(f"--lun {args.lun}: expected a LUN number 0-255")
    for name in initiators:
        if not valid_iscsi_name(name):
            problems.append(f"--initiator {name}: expected {IQN_EXPECTED}")
    if len(set(initiators)) != len(initiators):
        problems.append("--initiator: expected each initiator once")
    if initiators and args.demo_mode:
        problems.append("--demo-mode: expected --initiator or --demo-mode, not both")
    if not initiators and not args.demo_mode:
        problems.append(f"--iqn {args.iqn}: expected --initiator IQN (repeatable: who may log "
                        "in) or --demo-mode (any initiator may write; lab only)")
    return problems


def _check_hw_max_sectors(args: argparse.Namespace, problems: list[str]) -> None:
    if not 1 <= args.hw_max_sectors <= MAX_HW_SECTORS:
        problems.append(f"--hw-max-sectors {args.hw_max_sectors}: expected 1-{MAX_HW_SECTORS} "
                        "(512-byte sectors)")


def _refuse_existing(name: str) -> None:
    from targetmirror.lio import backstore

    if backstore.find_backstore(name) is not None:
        raise LioError(f"a user:mirror backstore named {name!r} exists already; choose "
                       "another name or delete it first (targetmirror delete)")


def _export(so: Any, args: argparse.Namespace) -> None:
    """The export of a new backstore (iscsi.export removes what it made if it fails; the
    caller's Undo removes the backstore)."""
    from targetmirror.lio import iscsi

    portal = parse_hostport(args.portal)
    if portal is None:  # checked with the other arguments already
        raise ArgumentsError([f"--portal {args.portal}: expected {NETADDR_EXPECTED}"])
    iscsi.export(so, args.iqn, portal=portal, lun=args.lun, initiators=args.initiator or (),
                 demo_mode=args.demo_mode)


def _precheck_export(args: argparse.Namespace) -> None:
    """Read LIO (change nothing) for what would refuse the export, before anything is made."""
    if args.iqn:
        from targetmirror.lio import iscsi

        iscsi.check_export(args.iqn, lun=args.lun, initiators=args.initiator or (),
                           demo_mode=args.demo_mode)


def cmd_create(args: argparse.Namespace) -> int:
    """Every argument is checked first, then LIO is read for a name or LUN already taken;
    only then are images and LIO objects made, and all of them removed again if a later step
    fails (images this command created, the backstore, the export)."""
    from targetmirror.config.cfgstring import ceph_items
    from targetmirror.lio import backstore
    from targetmirror.store.rbd import CephAccess, is_rbd

    spec = MirrorSpec(_leg(args.image_a), _leg(args.image_b))
    problems = []
    if not valid_name(args.name):
        problems.append(f"name {args.name!r}: expected {NAME_EXPECTED}")
    if args.size <= 0 or args.size % SECTOR:
        problems.append(f"--size {args.size}: expected a positive size, a multiple of {SECTOR}")
    problems += check_images_args([("--image-a", spec.image_a), ("--image-b", spec.image_b)],
                                  args.size, args.create_images)
    if not 1 <= args.ceph_timeout <= 300:
        problems.append(f"--ceph-timeout {args.ceph_timeout}: expected 1-300 seconds")
    if args.sync_rate is not None and args.sync_rate <= 0:
        problems.append(f"--sync-rate {args.sync_rate}: expected a positive MB/s")
    _check_hw_max_sectors(args, problems)
    problems += check_export_args(args)
    if problems:
        raise ArgumentsError(problems)
    acc = CephAccess(args.ceph_conf, args.ceph_id, args.ceph_keyring, args.ceph_timeout)
    text = spec.to_cfgstring() + "".join(ceph_items(acc, f"{k}_") for k, img in
                                         (("a", spec.image_a), ("b", spec.image_b))
                                         if is_rbd(img))
    spec = parse(text)  # what the kernel's dev_config can carry (';' in a path, ...)
    _refuse_existing(args.name)  # reads LIO: also where "LIO is not there" is said
    _precheck_export(args)
    with Undo() as undo:
        if args.create_images:
            for path in (spec.image_a, spec.image_b):
                # an RBD image is made with `rbd create` (docs/rbd.md)
                if not is_rbd(path) and _create_image(path, args.size):
                    undo.add(f"image {path}", functools.partial(os.unlink, path))
        check_images(spec, args.size)
        so = backstore.create_backstore(args.name, args.size, spec.to_cfgstring(),
                                        hw_max_sectors=args.hw_max_sectors, check=False)
        undo.add(f"backstore {args.name}", functools.partial(backstore.delete_backstore,
                                                             args.name))
        if args.initial_sync:
            # Start the sync before any initiator can see the LUN: until then reads would
            # come from the still empty B.
            _start_initial_sync(args)
        if args.iqn:
            _export(so, args)
    print(f"created user:mirror {args.name} ({args.size} bytes) a={spec.image_a} "
          f"b={spec.image_b}" + (f" exported as {args.iqn} LUN {args.lun}" if args.iqn else ""))
    return 0


def _start_initial_sync(args: argparse.Namespace) -> None:
    """Wait (60 s at most) until the daemon serves the new backstore, then start the sync.
    A daemon that does not answer at all fails at once."""
    try:
        retry(lambda: common.call(args, "status", names=[args.name]), 60, MirrorError)
    except MirrorError as exc:
        raise MirrorError(f"targetmirrord did not pick up {args.name} within 60 s: "
                          f"{exc}") from exc
    rate = None if args.sync_rate is None else args.sync_rate * 1e6
    common.call(args, "sync", name=args.name, rate=rate, wait=False)


def cmd_create_volume2(args: argparse.Namespace) -> int:
    """A second LUN of an existing mirror (``mirror=NAME;volume=2``), for one-way cut-over."""
    from targetmirror.lio import backstore

    spec = VolumeSpec(args.of)
    problems = []
    if not valid_name(args.name):
        problems.append(f"name {args.name!r}: expected {NAME_EXPECTED}")
    try:
        parse_any(spec.to_cfgstring())
    except ConfigError as exc:
        problems.append(f"--of {args.of}: {exc}")
    _check_hw_max_sectors(args, problems)
    problems += check_export_args(args)
    if problems:
        raise ArgumentsError(problems)
    owner = backstore.find_backstore(args.of)
    if owner is None:
        raise MirrorError(f"no user:mirror backstore named {args.of!r} to add a volume 2 to")
    _refuse_existing(args.name)
    _precheck_export(args)
    with Undo() as undo:
        so = backstore.create_backstore(args.name, int(owner.size), spec.to_cfgstring(),
                                        hw_max_sectors=args.hw_max_sectors, check=False)
        undo.add(f"backstore {args.name}", functools.partial(backstore.delete_backstore,
                                                             args.name))
        if args.iqn:
            _export(so, args)
    print(f"created volume 2 {args.name} of mirror {args.of}"
          + (f" exported as {args.iqn} LUN {args.lun}" if args.iqn else ""))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from targetmirror.lio import backstore, iscsi

    if args.iqn and not valid_iscsi_name(args.iqn):
        raise ArgumentsError([f"--iqn {args.iqn}: expected {IQN_EXPECTED}"])
    if backstore.find_backstore(args.name) is None:
        raise LioError(f"no user:mirror backstore named {args.name!r}")
    if args.iqn and iscsi.find_target(args.iqn) is None:
        raise LioError(f"no iSCSI target {args.iqn} (nothing was deleted)")
    backstore.delete_backstore(args.name)
    if args.iqn:
        iscsi.unexport(args.iqn)
    print(f"deleted user:mirror {args.name}" + (f" and target {args.iqn}" if args.iqn else ""))
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

    snap = args.snapshot_name or f"{args.name}_snap"
    problems = []
    if not valid_name(snap):
        problems.append(f"--snapshot-name {snap!r}: expected {NAME_EXPECTED}")
    problems += check_export_args(args)
    if problems:
        raise ArgumentsError(problems)
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
    _refuse_existing(snap)
    _precheck_export(args)
    with Undo() as undo:
        so = backstore.create_backstore(snap, st["size"], spec.to_cfgstring(), check=False)
        undo.add(f"backstore {snap}", functools.partial(backstore.delete_backstore, snap))
        _export(so, args)
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
    c.add_argument("--portal", default="127.0.0.1:3260",
                   help="IP:PORT, [IPv6]:PORT (default %(default)s)")
    c.add_argument("--lun", type=int, default=0)
    c.add_argument("--initiator", action="append",
                   help="allowed initiator IQN (repeatable); --iqn needs this or --demo-mode")
    c.add_argument("--demo-mode", action="store_true",
                   help="with --iqn and no --initiator: any initiator may log in and write "
                        "(lab only; refused on a TPG that has ACLs)")
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
                    help="allowed initiator IQN (repeatable); --iqn needs this or --demo-mode")
    v2.add_argument("--demo-mode", action="store_true",
                    help="any initiator may log in and write (lab only)")
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
    ex.add_argument("--initiator", action="append",
                    help="allowed initiator IQN (repeatable); this or --demo-mode")
    ex.add_argument("--demo-mode", action="store_true",
                    help="any initiator may log in (lab only; refused on a TPG with ACLs)")
    ex.add_argument("--rbd-snapshot", metavar="SNAP",
                    help="export this RBD snapshot of A (see rbd-snapshots) instead of A")
    ex.set_defaults(func=cmd_export_snapshot)
