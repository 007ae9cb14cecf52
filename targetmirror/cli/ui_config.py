"""``apply`` and ``list``: the YAML configuration file against LIO and the daemon."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from targetmirror.cli import common
from targetmirror.errors import ConfigError, ConfigFileError, MirrorError, TargetMirrorError
from targetmirror.protocol import DEFAULT_SOCKET
from targetmirror.units import human_size


class DaemonGroups:
    """Consistency groups through targetmirrord's control API."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def all(self) -> dict[str, list[str]]:
        from targetmirror.protocol import call

        return dict(call(self.socket, "status")["groups"])

    def create(self, group: str, names: list[str]) -> None:
        from targetmirror.protocol import call

        call(self.socket, "group-create", group=group, names=names)

    def delete(self, group: str) -> None:
        from targetmirror.protocol import call

        call(self.socket, "group-delete", group=group)


class NoGroups:
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
    groups: Any = DaemonGroups(socket)
    try:
        groups.all()
    except TargetMirrorError as exc:
        has_groups = bool(config.groups or Manifest.load(manifest_path(config)).groups)
        if has_groups and not args.dry_run:
            raise MirrorError(f"the file's consistency groups live in targetmirrord, which "
                              f"does not answer on {socket} ({exc}); start it first") from exc
        if has_groups:  # a dry run plans them as if the daemon had none
            print(f"note: targetmirrord does not answer on {socket}: its consistency groups "
                  "are planned as if it had none", file=sys.stderr)
        groups = NoGroups()
    lines: list[str] = []
    result = ap.apply(config, common.lio_seam(), groups, dry_run=args.dry_run,
                      out=lines.append if args.json else print)
    if args.json:
        print(json.dumps({"config": config.path, "dry_run": args.dry_run,
                          "plan": [a.text for a in result.actions],
                          "applied": [a.text for a in result.done]}, indent=1))
    return 0


def validate_file(path: str | None, as_json: bool = False) -> int:
    """Check a YAML file completely, with neither LIO nor the daemon: exit 0 and one line
    when it is valid, else exit 1 and every problem on its own line (stderr)."""
    from targetmirror.config import loader

    path = path or loader.default_path()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: "
                          f"{exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: expected UTF-8 text: {exc}") from exc
    try:
        checked = loader.check(loader.parse_yaml(text, path), path)
        problems = list(checked.problems)
    except ConfigFileError as exc:  # not YAML, or past the size bounds
        checked, problems = None, exc.problems
    if as_json:
        print(json.dumps({"config": path, "valid": not problems, "problems": problems},
                         indent=1))
    elif problems:
        for line in problems:
            print(line, file=sys.stderr)
    elif checked is not None:
        print(loader.summary(checked.config))
    return 1 if problems else 0


def cmd_validate(args: argparse.Namespace) -> int:
    return validate_file(args.file, args.json)


def cmd_list(args: argparse.Namespace) -> int:
    """Every user:mirror backstore in LIO: images, exports, who made it, the daemon's view."""
    from targetmirror.config import loader
    from targetmirror.config.cfgstring import parse_any
    from targetmirror.config.plan import Manifest, manifest_path

    state = common.lio_seam().read_state()
    owned: dict[str, str] = {}
    socket = args.socket
    try:
        config = loader.load(args.config)
        owned = Manifest.load(manifest_path(config)).backstores
        socket = socket or config.daemon.control_socket
    except TargetMirrorError:
        config = None  # no (valid) file: ownership is unknown, list LIO as it is
    try:
        st = common.call(argparse.Namespace(socket=socket or DEFAULT_SOCKET), "status")
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
        rows.append((r["name"], human_size(r["size"]), r["state"], r["group"] or "-",
                     ", ".join(f"{e['target']} LUN {e['lun']}" for e in r["exports"]) or "-",
                     "apply" if r["managed_by_apply"] else "hand",
                     r["image_a"] or (f"snapshot {r['snapshot_of']}" if r["snapshot_of"]
                                      else "-"),
                     r["image_b"] or "-"))
    common.table(rows)
    return 0


def register(sub: Any) -> None:
    """The configuration file commands' parsers."""
    va = sub.add_parser(
        "validate", help="check a YAML configuration file completely (no LIO, no daemon)",
        description="Check the file's shape, types, keys (with 'did you mean'), sizes, names, "
        "IQNs, portals, LUN numbers, image paths (resolved inside image_dirs; read, never "
        "written), duplicates and group members, without LIO or targetmirrord. Exit 0 and "
        "one line when it is valid; exit 1 and every problem as 'FILE: key.path: expected "
        "..., got ...' on stderr.")
    va.add_argument("file", nargs="?", default=None,
                    help="the YAML file (default $TARGETMIRROR_CONFIG or "
                         "/etc/targetmirror/targetmirror.yaml)")
    va.add_argument("--json", action="store_true",
                    help="print {config, valid, problems} instead (exit status the same)")
    va.set_defaults(func=cmd_validate)

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
