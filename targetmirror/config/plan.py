"""``targetmirror apply``: what must change so LIO matches the file (pure planning).

:func:`plan` compares three things and returns the list of :class:`Action` that makes the host
match the file, or raises :class:`~targetmirror.errors.ConfigError` for every conflict it cannot
resolve safely -- before anything is changed:

* the desired state (a validated :class:`~targetmirror.config.loader.Config`);
* the current state (:class:`LioState`, read from configfs by the one rtslib seam,
  :mod:`targetmirror.lio.live`, and the daemon's consistency groups);
* the ownership :class:`Manifest`: what earlier runs of ``apply`` created.

Ownership is recorded in a small JSON manifest in the daemon's state directory
(``<state_dir>/apply-manifest.json``) rather than as a tag on the LIO objects because LIO has no
free-form attribute that every object kind (backstore, target, group) can carry and that
survives ``targetcli saveconfig``/restore unchanged; a backstore's unit serial (``wwn``) does
survive, so the manifest records it with the name and ``apply`` only deletes a backstore whose
serial still matches -- a hand-made object that happens to reuse a name is never taken for
ours.  If the manifest is lost, ``apply`` owns nothing and therefore deletes nothing: it fails
safe.  Consistency groups live in the daemon, not in LIO, so they would need a manifest anyway.

Rules (docs/operations.md repeats them for admins):

* Create what the file has and LIO lacks; remove what the manifest says ``apply`` created and the
  file no longer has; never remove or change anything else.
* An object that exists with the wanted name but different settings is a conflict (a live
  mirror is never re-created behind its initiators' backs), and so is a target the file names
  that ``apply`` did not create.  A hand-made backstore identical to the file's is used as it is
  but not adopted: dropping it from the file later leaves it alone.
* A recreated backstore (after a reboot without ``targetcli`` restore) gets its old unit serial
  back from the manifest, so initiators and multipath see the same disk.
* Images are created only for mirrors with ``create_images: true`` and never deleted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from targetmirror.atomicfile import write_json
from targetmirror.config.cfgstring import MirrorSpec, SnapshotSpec, parse, parse_any
from targetmirror.config.loader import Chap, Config
from targetmirror.errors import ConfigError, ConfigFileError
from targetmirror.lio.iscsi import TPG_TAG
from targetmirror.store.rbd import is_rbd

MANIFEST_NAME = "apply-manifest.json"


@dataclass
class BackstoreState:
    """A ``user:mirror`` backstore as configfs shows it (``config`` without ``mirror/``)."""

    size: int
    config: str
    wwn: str = ""


@dataclass
class AclState:
    chap: Chap | None = None
    mapped: dict[int, int] = field(default_factory=dict)
    """mapped LUN -> TPG LUN."""


@dataclass
class TargetState:
    """An iSCSI target's TPG 1 (the only one apply manages)."""

    portals: set[tuple[str, int]] = field(default_factory=set)
    luns: dict[int, str] = field(default_factory=dict)
    """LUN -> backstore name (``plugin:name`` for anything that is not a user:mirror)."""
    acls: dict[str, AclState] = field(default_factory=dict)
    authentication: bool = False
    generate_node_acls: bool = False
    enabled: bool = True


@dataclass
class LioState:
    backstores: dict[str, BackstoreState] = field(default_factory=dict)
    targets: dict[str, TargetState] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    """Consistency groups as the daemon knows them."""


@dataclass
class Manifest:
    """What earlier ``apply`` runs created (see the module docstring)."""

    backstores: dict[str, str] = field(default_factory=dict)
    """name -> unit serial (wwn)."""
    targets: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str) -> Manifest:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read apply's ownership manifest: {exc}; move it "
                              "away to start over (apply then owns nothing and deletes "
                              "nothing)") from exc
        try:
            return cls(backstores={str(k): str(v) for k, v in data["backstores"].items()},
                       targets=[str(t) for t in data["targets"]],
                       groups=[str(g) for g in data["groups"]])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}: apply's ownership manifest is malformed ({exc!r})") \
                from exc

    def save(self, path: str) -> None:
        """Write atomically (temp file, fsync, rename): a crash leaves the old or the new."""
        write_json(path, {"backstores": self.backstores, "targets": sorted(self.targets),
                          "groups": sorted(self.groups)})


@dataclass(frozen=True)
class Action:
    """One change: ``op`` names the seam method, ``args`` its keyword arguments."""

    op: str
    args: dict[str, Any]
    text: str

    def __str__(self) -> str:
        return self.text


def manifest_path(config: Config) -> str:
    return os.path.join(config.daemon.state_dir, MANIFEST_NAME)


def _same_backstore(cur: BackstoreState, size: int, spec: MirrorSpec) -> bool:
    if cur.size != size:
        return False
    try:
        have = parse(cur.config)
    except ConfigError:
        return False
    return have == spec


@dataclass
class _Desired:
    portals: set[tuple[str, int]]
    luns: dict[int, str]
    acls: dict[str, AclState]
    authentication: bool


def _desired_targets(config: Config) -> dict[str, _Desired]:
    out = {}
    for e in config.exports:
        luns = dict(e.luns)
        acls = {a.initiator: AclState(a.chap, {n: n for n in luns}) for a in e.acls}
        out[e.target] = _Desired(set(e.portals), luns, acls,
                                 any(a.chap is not None for a in e.acls))
    return out


def _portal_text(p: tuple[str, int]) -> str:
    return f"[{p[0]}]:{p[1]}" if ":" in p[0] else f"{p[0]}:{p[1]}"


def plan(config: Config, current: LioState, manifest: Manifest,
         *, image_exists: Any = os.path.exists) -> list[Action]:
    """The actions that make ``current`` match ``config``; conflicts raise before any."""
    problems: list[str] = []
    src = config.path

    def conflict(text: str) -> None:
        problems.append(f"{src}: {text}")

    wanted_bs = {m.name: m for m in config.mirrors}
    wanted_t = _desired_targets(config)
    wanted_g = {g.name: list(g.mirrors) for g in config.groups}
    owned_bs = {n: w for n, w in manifest.backstores.items()
                if n in current.backstores and current.backstores[n].wwn == w}
    owned_t = {t for t in manifest.targets if t in current.targets}
    owned_g = {g for g in manifest.groups if g in current.groups}

    removals: list[Action] = []
    creations: list[Action] = []

    # -- consistency groups (the daemon) ----------------------------------------------------
    for name in sorted(owned_g - set(wanted_g)):
        removals.append(Action("group_delete", {"name": name},
                               f"- group {name} (created by apply, no longer in the file)"))
    for name, members in wanted_g.items():
        have = current.groups.get(name)
        if have is None:
            creations.append(Action("group_create", {"name": name, "members": members},
                                    f"+ group {name}: {', '.join(members)}"))
        elif sorted(have) != sorted(members):
            if name in owned_g:
                removals.append(Action("group_delete", {"name": name},
                                       f"- group {name} (members change)"))
                creations.append(Action("group_create", {"name": name, "members": members},
                                        f"+ group {name}: {', '.join(members)}"))
            else:
                conflict(f"groups: consistency group {name} exists with members "
                         f"{', '.join(have)} and was not created by apply; delete it "
                         f"(targetmirror group delete {name}) or rename the file's group")

    # -- targets ------------------------------------------------------------------------------
    for iqn in sorted(owned_t - set(wanted_t)):
        removals.append(Action("delete_target", {"iqn": iqn},
                               f"- target {iqn} (created by apply, no longer in the file)"))
    target_changes: list[Action] = []
    for iqn, want in wanted_t.items():
        cur = current.targets.get(iqn)
        if cur is None:
            target_changes.append(Action("create_target", {"iqn": iqn}, f"+ target {iqn}"))
            cur = TargetState(authentication=not want.authentication,
                              generate_node_acls=True, enabled=False)
        elif iqn not in owned_t:
            conflict(f"exports: iSCSI target {iqn} exists and was not created by apply; "
                     f"delete it (targetcli /iscsi delete {iqn}) or export under another IQN")
            continue
        rm, add = _reconcile_target(iqn, cur, want)
        removals.extend(rm)
        target_changes.extend(add)

    # -- backstores ---------------------------------------------------------------------------
    doomed = sorted(set(owned_bs) - set(wanted_bs))
    for name in doomed:
        users = [f"{iqn} LUN {lun}" for iqn, t in sorted(current.targets.items())
                 for lun, so in t.luns.items()
                 if so == name and iqn not in owned_t]
        if users:
            conflict(f"mirrors: backstore {name} (created by apply, gone from the file) is "
                     f"still exported by {', '.join(users)}, which apply did not create; "
                     "remove those LUNs first")
            continue
        removals.append(Action("delete_backstore", {"name": name},
                               f"- backstore {name} (created by apply, no longer in the file; "
                               "its images are kept)"))
    for name, m in wanted_bs.items():
        spec = m.spec()
        cur_bs = current.backstores.get(name)
        if cur_bs is not None:
            if not _same_backstore(cur_bs, m.size, spec):
                conflict(f"mirrors: backstore {name} exists as {cur_bs.size} bytes "
                         f"'{cur_bs.config}', the file wants {m.size} bytes "
                         f"'{spec.to_cfgstring()}'; apply never re-creates a live mirror: "
                         f"delete it (targetmirror delete {name}) and apply again")
            continue
        taken = _images_in_use(current, name)
        clash = [f"{path} (backstore {taken[path]})" for path in (m.image_a, m.image_b)
                 if path in taken]
        if clash:
            conflict(f"mirrors: {name} would use an image another backstore already uses: "
                     f"{', '.join(clash)}; two backstores on one image corrupt it")
            continue
        if m.create_images:
            for path in (m.image_a, m.image_b):
                if not is_rbd(path) and not image_exists(path):  # RBD: `rbd create` by hand
                    creations.append(Action("create_image", {"path": path, "size": m.size},
                                            f"+ image {path} ({m.size} bytes, sparse)"))
        creations.append(Action(
            "create_backstore",
            {"name": name, "size": m.size, "cfgstring": spec.to_cfgstring(),
             "wwn": manifest.backstores.get(name) or None},
            f"+ backstore user:mirror/{name} ({m.size} bytes, {spec.to_cfgstring()})"))
    if problems:
        raise ConfigFileError(src, problems)
    # removals before creations; groups are created last (their mirrors exist by then)
    groups_new = [a for a in creations if a.op == "group_create"]
    return (removals + [a for a in creations if a.op != "group_create"] + target_changes
            + groups_new)


def _images_in_use(current: LioState, except_name: str) -> dict[str, str]:
    """Resolved image path -> backstore name, for every user:mirror but ``except_name``."""
    out: dict[str, str] = {}
    for name, bs in current.backstores.items():
        if name == except_name:
            continue
        try:
            spec = parse_any(bs.config)
        except ConfigError:
            continue
        if isinstance(spec, MirrorSpec):
            paths = [spec.image_a, spec.image_b]
        elif isinstance(spec, SnapshotSpec):
            paths = [spec.image]
        else:
            continue  # a one-way volume 2 names its mirror, not images

        for path in paths:
            out[path if is_rbd(path) else os.path.realpath(path)] = name
    return out


def _reconcile_target(iqn: str, cur: TargetState, want: _Desired
                      ) -> tuple[list[Action], list[Action]]:
    """Removals and additions inside one target that apply owns (or is creating)."""
    rm: list[Action] = []
    add: list[Action] = []
    changed_luns = {n for n, so in cur.luns.items() if want.luns.get(n) != so}
    for ini, acl in sorted(cur.acls.items()):
        if ini not in want.acls:
            rm.append(Action("remove_acl", {"iqn": iqn, "initiator": ini},
                             f"- {iqn}: ACL {ini}"))
            continue
        for mlun, tlun in sorted(acl.mapped.items()):
            if want.acls[ini].mapped.get(mlun) != tlun or tlun in changed_luns:
                rm.append(Action("unmap_lun", {"iqn": iqn, "initiator": ini, "mapped_lun": mlun},
                                 f"- {iqn}: ACL {ini} mapped LUN {mlun}"))
    for n in sorted(changed_luns):
        rm.append(Action("remove_lun", {"iqn": iqn, "lun": n},
                         f"- {iqn}: LUN {n} ({cur.luns[n]})"))
    for p in sorted(cur.portals - want.portals):
        rm.append(Action("remove_portal", {"iqn": iqn, "ip": p[0], "port": p[1]},
                         f"- {iqn}: portal {_portal_text(p)}"))
    if cur.authentication != want.authentication or cur.generate_node_acls:
        add.append(Action("set_tpg", {"iqn": iqn, "authentication": want.authentication},
                          f"~ {iqn}: authentication "
                          + ("CHAP" if want.authentication else "none")
                          + ", ACLs only (no demo mode)"))
    for p in sorted(want.portals - cur.portals):
        add.append(Action("add_portal", {"iqn": iqn, "ip": p[0], "port": p[1]},
                          f"+ {iqn}: portal {_portal_text(p)}"))
    for n, so in sorted(want.luns.items()):
        if n in changed_luns or n not in cur.luns:
            add.append(Action("add_lun", {"iqn": iqn, "lun": n, "backstore": so},
                              f"+ {iqn}: LUN {n} -> {so}"))
    for ini, acl in sorted(want.acls.items()):
        have = cur.acls.get(ini)
        if have is None:
            add.append(Action("add_acl", {"iqn": iqn, "initiator": ini},
                              f"+ {iqn}: ACL {ini}"))
        if (have.chap if have else None) != acl.chap:
            what = ("none" if acl.chap is None else
                    "mutual CHAP" if acl.chap.mutual_user else "CHAP")
            add.append(Action("set_chap", {"iqn": iqn, "initiator": ini, "chap": acl.chap},
                              f"~ {iqn}: ACL {ini} authentication {what}"))
        for mlun, tlun in sorted(acl.mapped.items()):
            kept = (have is not None and have.mapped.get(mlun) == tlun
                    and tlun not in changed_luns)
            if not kept:
                add.append(Action("map_lun", {"iqn": iqn, "initiator": ini, "mapped_lun": mlun,
                                              "tpg_lun": tlun},
                                  f"+ {iqn}: ACL {ini} mapped LUN {mlun} -> LUN {tlun}"))
    if not cur.enabled:
        add.append(Action("enable_tpg", {"iqn": iqn}, f"+ {iqn}: enable TPG {TPG_TAG}"))
    return rm, add
