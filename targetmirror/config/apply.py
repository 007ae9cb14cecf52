"""Run a plan: the orchestration of ``targetmirror apply`` and of ``targetmirrord --config``.

Everything that touches LIO goes through one seam object (:class:`LioSeam`; the real one is
:class:`targetmirror.lio.live.RtslibLio`, tests use a recording fake), consistency groups through
another (:class:`GroupSeam`: the control API from the CLI, the daemon's own registry at daemon
start).  The file is validated and the whole plan computed -- conflicts included -- before the
first change.  Each executed step updates the ownership manifest at once, so a failure half way
leaves a manifest that tells the truth and a second ``apply`` finishes the job.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from targetmirror.config.loader import Config
from targetmirror.config.plan import Action, LioState, Manifest, manifest_path, plan
from targetmirror.errors import LioError, TargetMirrorError


class LioSeam(Protocol):
    """What apply needs from LIO (see :mod:`targetmirror.lio.live`)."""

    def read_state(self) -> LioState: ...

    def create_backstore(self, name: str, size: int, cfgstring: str,
                         wwn: str | None) -> str: ...

    def delete_backstore(self, name: str) -> None: ...

    def create_target(self, iqn: str) -> None: ...

    def delete_target(self, iqn: str) -> None: ...

    def set_tpg(self, iqn: str, authentication: bool) -> None: ...

    def enable_tpg(self, iqn: str) -> None: ...

    def add_portal(self, iqn: str, ip: str, port: int) -> None: ...

    def remove_portal(self, iqn: str, ip: str, port: int) -> None: ...

    def add_lun(self, iqn: str, lun: int, backstore: str) -> None: ...

    def remove_lun(self, iqn: str, lun: int) -> None: ...

    def add_acl(self, iqn: str, initiator: str) -> None: ...

    def remove_acl(self, iqn: str, initiator: str) -> None: ...

    def set_chap(self, iqn: str, initiator: str, chap: Any) -> None: ...

    def map_lun(self, iqn: str, initiator: str, mapped_lun: int, tpg_lun: int) -> None: ...

    def unmap_lun(self, iqn: str, initiator: str, mapped_lun: int) -> None: ...


class GroupSeam(Protocol):
    """Consistency groups (the daemon's registry)."""

    def all(self) -> dict[str, list[str]]: ...

    def create(self, group: str, names: list[str]) -> Any: ...

    def delete(self, group: str) -> Any: ...


@dataclass
class Result:
    actions: list[Action]
    done: list[Action] = field(default_factory=list)
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.done)


def create_image(path: str, size: int) -> None:
    """A sparse image of ``size`` bytes; O_EXCL, so an existing file is never touched."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def apply(config: Config, lio: LioSeam, groups: GroupSeam, *, dry_run: bool = False,
          out: Callable[[str], None] = print, only_new: bool = False) -> Result:
    """Make LIO and the daemon's groups match ``config``; print the plan and each step.

    ``only_new`` (the daemon with a file that has problems, :mod:`targetmirror.daemon.restore`)
    keeps only the creation of what does not exist at all -- images, backstores, targets with
    everything in them, groups -- and changes or removes nothing."""
    mpath = manifest_path(config)
    manifest = Manifest.load(mpath)
    current = lio.read_state()
    current.groups = groups.all()
    actions = plan(config, current, manifest)
    if only_new:
        actions = creations_only(actions, current)
    result = Result(actions, dry_run=dry_run)
    if not actions:
        out(f"nothing to change: LIO matches {config.path}")
        if not dry_run:
            _prune(manifest, current, config, mpath)
        return result
    out(f"plan ({len(actions)} change{'s' if len(actions) != 1 else ''}) for {config.path}:")
    for a in actions:
        out(f"  {a}")
    if dry_run:
        out("dry run: nothing changed")
        return result
    for a in actions:
        try:
            _execute(a, lio, groups, manifest)
        except (TargetMirrorError, OSError) as exc:
            manifest.save(mpath)
            raise LioError(f"step '{a.text}' failed: {exc}; {len(result.done)} of "
                           f"{len(actions)} steps were done (the manifest {mpath} records "
                           "them; fix the cause and run apply again)") from exc
        result.done.append(a)
        manifest.save(mpath)
    out(f"applied {len(result.done)} change{'s' if len(result.done) != 1 else ''}")
    return result


def creations_only(actions: list[Action], current: LioState) -> list[Action]:
    """The actions that make something new and touch nothing that exists."""
    new_targets = {a.args["iqn"] for a in actions if a.op == "create_target"}
    def new(a: Action) -> bool:
        if a.op in ("create_image", "create_backstore"):
            return True
        if a.op == "group_create":
            return a.args["name"] not in current.groups
        return a.args.get("iqn") in new_targets

    return [a for a in actions if new(a)]


def _prune(manifest: Manifest, current: LioState, config: Config, path: str) -> None:
    """Forget owned objects that are gone and not wanted (keeps serials of wanted ones)."""
    wanted = {m.name for m in config.mirrors}
    before = (dict(manifest.backstores), list(manifest.targets), list(manifest.groups))
    manifest.backstores = {n: w for n, w in manifest.backstores.items()
                           if n in current.backstores or n in wanted}
    manifest.targets = [t for t in manifest.targets if t in current.targets]
    manifest.groups = [g for g in manifest.groups if g in current.groups]
    if (manifest.backstores, manifest.targets, manifest.groups) != before:
        manifest.save(path)


def _execute(a: Action, lio: LioSeam, groups: GroupSeam, manifest: Manifest) -> None:
    args = a.args
    if a.op == "create_image":
        create_image(args["path"], args["size"])
    elif a.op == "group_create":
        groups.create(args["name"], list(args["members"]))
        if args["name"] not in manifest.groups:
            manifest.groups.append(args["name"])
    elif a.op == "group_delete":
        groups.delete(args["name"])
        if args["name"] in manifest.groups:
            manifest.groups.remove(args["name"])
    elif a.op == "create_backstore":
        manifest.backstores[args["name"]] = lio.create_backstore(**args)
    elif a.op == "delete_backstore":
        lio.delete_backstore(**args)
        manifest.backstores.pop(args["name"], None)
    elif a.op == "create_target":
        lio.create_target(**args)
        if args["iqn"] not in manifest.targets:
            manifest.targets.append(args["iqn"])
    elif a.op == "delete_target":
        lio.delete_target(**args)
        if args["iqn"] in manifest.targets:
            manifest.targets.remove(args["iqn"])
    else:
        getattr(lio, a.op)(**args)
