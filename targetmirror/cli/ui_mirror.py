"""``status``, ``split``, ``cancel``, ``group``, ``rejoin``, ``repair``, ``sync``, ``verify``:
mirror operations, asked of targetmirrord over its control socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from targetmirror import selftest
from targetmirror.cli import common, progress
from targetmirror.client import (
    describe_rejoin,
    describe_schedule,
    describe_sync,
    describe_verify,
    status_rows,
    unhealthy,
    when,
)
from targetmirror.errors import MirrorError
from targetmirror.units import size_arg as parse_size

EXIT_UNHEALTHY = 2
"""``status --check``: a mirror is degraded, failed or NOT READY (like mdadm --detail
--test)."""


def _show_status(res: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(res, indent=1))
        return
    for row in status_rows(res["mirrors"], res.get("config")):
        print(row)
    for s in res.get("scheduled", []):
        print(describe_schedule(s))


def cmd_status(args: argparse.Namespace) -> int:
    client = common.client(args)
    if args.watch is None:
        res = client.status(args.names)
        _show_status(res, args.json)
        return EXIT_UNHEALTHY if args.check and unhealthy(res["mirrors"]) else 0
    # --watch: the table again every interval until Ctrl-C (or --count tables)
    tty = sys.stdout.isatty()
    shown = 0
    try:
        while True:
            res = client.status(args.names)
            if tty:
                print("\x1b[H\x1b[2J", end="")  # home and clear, like watch(1)
            elif shown:
                print()
            print(f"every {args.watch:g} s: targetmirror status   {when(time.time())}")
            _show_status(res, args.json)
            sys.stdout.flush()
            shown += 1
            if args.count and shown >= args.count:
                break
            time.sleep(args.watch)  # the refresh interval the admin asked for
    except KeyboardInterrupt:
        pass  # the way to end --watch
    return EXIT_UNHEALTHY if args.check and unhealthy(res["mirrors"]) else 0


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


def cmd_rejoin(args: argparse.Namespace) -> int:
    """Copy what changed since the split back to A, online; mirrored again afterwards."""
    client = common.client(args)
    attached = progress.wanted(args)
    res = client.rejoin(args.names, group=args.group, full=args.full, rate_mbps=args.rate,
                        wait=not args.no_wait and not attached, timeout=args.timeout)
    if attached:
        names = [m["name"] for m in res["rejoin"]]
        res = {"rejoin": progress.follow(client, names, desc="rejoin", timeout=args.timeout,
                                         busy=lambda m: m["state"] == "rejoining")}
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
    attached = progress.wanted(args)
    res = common.call(args, "repair", name=args.name, leg=args.leg, replace=replace,
                      rate=rate, wait=not args.no_wait and not attached,
                      timeout=args.timeout)["repair"]
    if attached:
        res = progress.follow(common.client(args), [args.name], desc="repair",
                              timeout=args.timeout, busy=lambda m: m.get("resync") is not None
                              or m["state"] in ("syncing", "rejoining"))[0]
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
    client = common.client(args)
    attached = progress.wanted(args)
    res = client.sync(args.name, rate_mbps=args.rate, wait=not args.no_wait and not attached,
                      timeout=args.timeout)
    if attached:
        res = progress.follow(client, [args.name], desc="sync", timeout=args.timeout,
                              busy=lambda m: m["state"] == "syncing")[0]
    print(json.dumps(res, indent=1) if args.json else describe_sync(res))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Compare A and B online; exit 1 when they differ where they should not."""
    client = common.client(args)

    def verify() -> dict[str, Any]:
        return client.verify(args.name, repair=args.repair, offset=args.offset,
                             length=args.length, rate_mbps=args.rate, timeout=args.timeout)

    res = (progress.while_running(verify, client, args.name, desc="verify")
           if progress.wanted(args) else verify())
    print(json.dumps(res, indent=1) if args.json else describe_verify(res))
    return 1 if res["mismatches"] and not res["repaired"] else 0


def register(sub: Any) -> None:
    """The mirror operations' parsers."""
    st = common.daemon_command(sub, "status",
                               "show mirrors: state, epoch, in-flight writes, last split, "
                               "the running copy (Cpy%%, ETA)")
    st.add_argument("names", nargs="*")
    st.add_argument("--check", action="store_true",
                    help=f"exit {EXIT_UNHEALTHY} when a mirror is degraded or failed, a leg or "
                         "a copy failed, or a LUN is NOT READY (for monitoring scripts, like "
                         "mdadm --detail --test)")
    st.add_argument("--watch", type=float, nargs="?", const=2.0, default=None,
                    metavar="SECONDS", help="show the table again every SECONDS (default 2) "
                    "until Ctrl-C")
    st.add_argument("--count", type=int, default=0,
                    help="with --watch: stop after this many tables")
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

    stt = common.daemon_command(sub, "selftest",
                                "prove the split on this host: a scratch mirror through "
                                "tcm_loop, a writer, a split under load, A and B checked "
                                "(PASS/FAIL)")
    selftest.add_arguments(stt)
    stt.set_defaults(func=selftest.main)
