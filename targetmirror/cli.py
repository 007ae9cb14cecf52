"""``targetmirror``: the admin's command line.

For now it covers what the data path needs: create a ``user:mirror`` backstore (optionally
creating the two image files) and export it over iSCSI, delete it again, and check a cfgstring.
Every failure prints one line naming what was wrong and exits non-zero; nothing is left half
made (the LIO layer rolls back).

Exit codes: 0 success, 1 a targetmirror error (bad input, LIO refused), 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from targetmirror import __version__
from targetmirror.config.cfgstring import MirrorSpec, check_images, parse
from targetmirror.errors import ConfigError, TargetMirrorError

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
    from targetmirror.lio import backstore, iscsi

    spec = MirrorSpec(os.path.abspath(args.image_a), os.path.abspath(args.image_b))
    spec = parse(spec.to_cfgstring())  # validate before touching anything
    if args.create_images:
        for path in (spec.image_a, spec.image_b):
            _create_image(path, args.size)
    check_images(spec, args.size)
    so = backstore.create_backstore(args.name, args.size, spec.to_cfgstring(),
                                    hw_max_sectors=args.hw_max_sectors, check=False)
    if args.iqn:
        host, _, port = args.portal.rpartition(":")
        try:
            iscsi.export(so, args.iqn, portal=(host, int(port)), lun=args.lun,
                         initiators=args.initiator or ())
        except TargetMirrorError:
            so.delete()
            raise
    print(f"created user:mirror {args.name} ({args.size} bytes) a={spec.image_a} "
          f"b={spec.image_b}" + (f" exported as {args.iqn} LUN {args.lun}" if args.iqn else ""))
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also the source of the man page)."""
    p = argparse.ArgumentParser(prog="targetmirror",
                                description="Split-mirror block service for LIO (TCMU).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("create", help="create a user:mirror backstore and export it")
    c.add_argument("name")
    c.add_argument("--size", type=parse_size, required=True, help="LUN size, e.g. 1G")
    c.add_argument("--image-a", required=True, help="image A (the split-off copy)")
    c.add_argument("--image-b", required=True, help="image B (the live leg)")
    c.add_argument("--create-images", action="store_true",
                   help="create missing image files (sparse) of --size")
    c.add_argument("--iqn", help="export over iSCSI as this target IQN")
    c.add_argument("--portal", default="127.0.0.1:3260", help="IP:PORT (default %(default)s)")
    c.add_argument("--lun", type=int, default=0)
    c.add_argument("--initiator", action="append",
                   help="allowed initiator IQN (repeatable); none = demo mode, lab only")
    c.add_argument("--hw-max-sectors", type=int, default=2048,
                   help="largest command in 512-byte sectors (default %(default)s = 1 MiB)")
    c.set_defaults(func=cmd_create)

    d = sub.add_parser("delete", help="delete a user:mirror backstore (and its iSCSI target)")
    d.add_argument("name")
    d.add_argument("--iqn", help="also delete this iSCSI target")
    d.set_defaults(func=cmd_delete)

    k = sub.add_parser("check-config", help="check a cfgstring (a=PATH;b=PATH) on this host")
    k.add_argument("cfgstring")
    k.add_argument("--size", type=parse_size, default=None)
    k.set_defaults(func=cmd_check)
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
