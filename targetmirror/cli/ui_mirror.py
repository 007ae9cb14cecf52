"""``status``, ``split``, ``cancel``, ``group``, ``rejoin``, ``repair``, ``sync``, ``verify``:
mirror operations, asked of targetmirrord over its control socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from targetmirror.cli import common
from targetmirror.client import describe_rejoin, describe_sync, describe_verify, when
from targetmirror.errors import MirrorError
from targetmirror.units import size_arg as parse_size


def cmd_status(args: argparse.Namespace) -> int:
    res = common.client(args).status(args.names)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    common.print_status(res["mirrors"])
    for s in res.get("scheduled", []):
        print(f"scheduled split {s['id']}: {', '.join(s['names'])} at {when(s['at'])}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    if args.one_way and (args.group or args.at is not None):
        raise MirrorError("--one-way splits named mirrors now (no --group, no --at)")
    res = common.client(args).split(args.names, group=args.group, at=args.at,
                                    wait=not args.no_wait, timeout=args.timeout,
                                    one_way=args.one_way)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    if "scheduled" in res:
        s = res["scheduled"]
        print(f"split {s['id']} of {', '.join(s['names'])} scheduled at {when(s['at'])}")
        return 0
    common.print_status(res["split"])
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    common.client(args).cancel(args.id)
    print(f"cancelled scheduled split {args.id}")
    return 0


def cmd_group(args: argparse.Namespace) -> int:
    client = common.client(args)
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


def _follow_rejoin(args: argparse.Namespace, names: list[str]) -> None:
    """A progress bar (bytes copied, ETA) until every named mirror is mirrored again."""
    from tqdm import tqdm

    client = common.client(args)
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
    client = common.client(args)
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
    res = common.call(args, "repair", name=args.name, leg=args.leg, replace=replace,
                      rate=rate, wait=not args.no_wait, timeout=args.timeout)["repair"]
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
    res = common.client(args).sync(args.name, rate_mbps=args.rate, wait=not args.no_wait,
                                   timeout=args.timeout)
    print(json.dumps(res, indent=1) if args.json else describe_sync(res))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Compare A and B online; exit 1 when they differ where they should not."""
    res = common.client(args).verify(args.name, repair=args.repair, offset=args.offset,
                                     length=args.length, rate_mbps=args.rate,
                                     timeout=args.timeout)
    print(json.dumps(res, indent=1) if args.json else describe_verify(res))
    return 1 if res["mismatches"] and not res["repaired"] else 0


def register(sub: Any) -> None:
    """The mirror operations' parsers."""
    st = common.daemon_command(sub, "status",
                               "show mirrors: state, epoch, in-flight writes, last split")
    st.add_argument("names", nargs="*")
    st.set_defaults(func=cmd_status)

    sp = common.daemon_command(sub, "split",
                               "split mirrors (or a consistency group) at one instant")
    sp.add_argument("names", nargs="*", help="mirrors to split together")
    sp.add_argument("--group", help="a consistency group (see 'targetmirror group')")
    sp.add_argument("--at", type=common.parse_at, default=None,
                    help="split at a time: +SECONDS, epoch seconds or ISO 8601")
    sp.add_argument("--no-wait", action="store_true",
                    help="return at the instant instead of when A is complete")
    sp.add_argument("--timeout", type=float, default=300.0)
    sp.add_argument("--one-way", action="store_true",
                    help="one-way cut-over (claim 4): volume 1 keeps writing A and B, "
                    "volume 2 writes B only; ended by 'rejoin'")
    sp.set_defaults(func=cmd_split)

    ca = common.daemon_command(sub, "cancel", "cancel a scheduled split")
    ca.add_argument("id", type=int)
    ca.set_defaults(func=cmd_cancel)

    gr = common.daemon_command(sub, "group", "consistency groups: create, delete, list")
    gr.add_argument("action", choices=["create", "delete", "list"])
    gr.add_argument("group", nargs="?")
    gr.add_argument("names", nargs="*")
    gr.set_defaults(func=cmd_group)

    rj = common.daemon_command(sub, "rejoin",
                               "copy what changed since the split back to A (online)")
    rj.add_argument("names", nargs="*")
    rj.add_argument("--group", help="rejoin every mirror of a consistency group")
    rj.add_argument("--full", action="store_true",
                    help="copy every region (A was replaced or the bitmap is not trusted)")
    rj.add_argument("--rate", type=float, default=None, help="limit in MB/s")
    rj.add_argument("--no-wait", action="store_true", help="return once the copy has started")
    rj.add_argument("--timeout", type=float, default=3600.0)
    rj.set_defaults(func=cmd_rejoin)

    rp = common.daemon_command(sub, "repair", "bring a failed leg back (incremental resync, "
                               "or full with --replace)")
    rp.add_argument("name")
    rp.add_argument("--leg", choices=["a", "b"], default=None,
                    help="the leg to repair (default: the failed one)")
    rp.add_argument("--replace", metavar="PATH", default=None,
                    help="a new image for the leg: every region is copied to it")
    rp.add_argument("--rate", type=float, default=None, help="limit in MB/s")
    rp.add_argument("--no-wait", action="store_true", help="return once the copy has started")
    rp.add_argument("--timeout", type=float, default=3600.0)
    rp.set_defaults(func=cmd_repair)

    sy = common.daemon_command(sub, "sync",
                               "initial sync: copy A to B online (A has data, B is new)")
    sy.add_argument("name")
    sy.add_argument("--rate", type=float, default=None, help="limit in MB/s")
    sy.add_argument("--no-wait", action="store_true", help="return once the copy has started")
    sy.add_argument("--timeout", type=float, default=3600.0)
    sy.set_defaults(func=cmd_sync)

    vf = common.daemon_command(sub, "verify",
                               "compare A and B online (exit 1 on an unexpected mismatch)")
    vf.add_argument("name")
    vf.add_argument("--repair", action="store_true",
                    help="copy B over A where they differ (mirrored mirrors only)")
    vf.add_argument("--offset", type=parse_size, default=0)
    vf.add_argument("--length", type=parse_size, default=None)
    vf.add_argument("--rate", type=float, default=None, help="limit in MB/s")
    vf.add_argument("--timeout", type=float, default=3600.0)
    vf.set_defaults(func=cmd_verify)
