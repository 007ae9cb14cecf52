"""iSCSI exports through rtslib-fb: the one place that knows how targetmirror shapes a target
(TPG :data:`TPG_TAG`, portals, LUNs, ACLs, demo mode), used by ``targetmirror create`` /
``export-snapshot`` (:func:`export`) and by ``apply``'s seam (:mod:`targetmirror.lio.live`).

Access is by ACL: each allowed initiator gets a NodeACL and a mapped LUN.  Demo mode (any
initiator may log in and write) is only ever set when asked for by name (``--demo-mode``), and
never on a TPG that has ACLs: adding a LUN in demo mode there would open it to everyone, and
adding ACLs to a demo-mode TPG would lock out whoever uses it now.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from targetmirror.errors import ConfigError, LioError
from targetmirror.lio import rts

TPG_TAG = 1
"""The TPG targetmirror creates, reads and manages; other TPGs of a target are left alone."""


def find_target(iqn: str) -> Any | None:
    for t in rts.iscsi().targets:
        if t.wwn == iqn:
            return t
    return None


def find_tpg(target: Any) -> Any | None:
    for tpg in target.tpgs:
        if tpg.tag == TPG_TAG:
            return tpg
    return None


def create_target(iqn: str) -> tuple[Any, Any]:
    """A new target with its TPG; nothing is left behind if the TPG cannot be made."""
    rtslib = rts.module()
    target = rtslib.Target(rts.iscsi(), iqn, mode="create")
    try:
        tpg = rtslib.TPG(target, TPG_TAG, mode="create")
    except BaseException:
        with contextlib.suppress(*rts.failures()):
            target.delete()
        raise
    return target, tpg


def set_acl_mode(tpg: Any, authentication: bool) -> None:
    """Only initiators with an ACL may log in (CHAP on them when ``authentication``)."""
    tpg.set_attribute("generate_node_acls", "0")
    tpg.set_attribute("demo_mode_write_protect", "1")
    tpg.set_attribute("authentication", "1" if authentication else "0")


def set_demo_mode(tpg: Any) -> None:
    """Any initiator may log in and write (lab only; ``--demo-mode``)."""
    tpg.set_attribute("authentication", "0")
    tpg.set_attribute("generate_node_acls", "1")
    tpg.set_attribute("demo_mode_write_protect", "0")
    tpg.set_attribute("cache_dynamic_acls", "1")


def in_demo_mode(tpg: Any) -> bool:
    return str(tpg.get_attribute("generate_node_acls")).strip() == "1"


def check_export(iqn: str, *, lun: int, initiators: Sequence[str], demo_mode: bool) -> None:
    """Refuse, before anything is made, an export that would open or break an existing TPG:
    demo mode on a TPG with ACLs, ACLs on a TPG in demo mode, a LUN number already used."""
    if bool(initiators) == demo_mode:
        raise ConfigError(f"exporting as {iqn}: expected --initiator IQN (repeatable) or "
                          "--demo-mode (any initiator may write; lab only), "
                          + ("not both" if demo_mode else "got neither"))
    target = find_target(iqn)
    tpg = find_tpg(target) if target is not None else None
    if tpg is None:
        return
    acls = [a.node_wwn for a in tpg.node_acls]
    if demo_mode and acls:
        raise ConfigError(f"target {iqn} TPG {TPG_TAG} has ACLs ({', '.join(acls)}); "
                          "--demo-mode would let any initiator write its LUNs: give "
                          "--initiator instead")
    if initiators and in_demo_mode(tpg):
        raise ConfigError(f"target {iqn} TPG {TPG_TAG} is in demo mode; adding ACLs would "
                          "lock out the initiators using it: export under another IQN, or "
                          "add --demo-mode")
    used = {int(x.lun) for x in tpg.luns}
    if lun in used:
        raise ConfigError(f"target {iqn} TPG {TPG_TAG} has a LUN {lun} already; choose "
                          f"another --lun (used: {', '.join(map(str, sorted(used)))})")


def export(so: Any, iqn: str, *, portal: tuple[str, int] = ("127.0.0.1", 3260), lun: int = 0,
           initiators: Sequence[str] = (), demo_mode: bool = False) -> Any:
    """Export storage object ``so`` as LUN ``lun`` of target ``iqn``; return the LUN.

    :func:`check_export`'s rules are checked first.  Reuses an existing target, TPG and
    portal.  On failure everything this call created is removed again (rtslib-fb's rule for a
    failed construction)."""
    check_export(iqn, lun=lun, initiators=initiators, demo_mode=demo_mode)
    rtslib = rts.module()
    created: list[Any] = []
    try:
        target = find_target(iqn)
        tpg = find_tpg(target) if target is not None else None
        if target is None:
            target, tpg = create_target(iqn)
            created.append(target)
        elif tpg is None:
            tpg = rtslib.TPG(target, TPG_TAG, mode="create")
            created.append(tpg)
        if not any((p.ip_address.strip("[]"), int(p.port)) == portal
                   for p in tpg.network_portals):
            created.append(rtslib.NetworkPortal(tpg, portal[0], portal[1], mode="create"))
        lun_obj = rtslib.LUN(tpg, lun, so)
        created.append(lun_obj)
        if demo_mode:
            set_demo_mode(tpg)
        else:
            set_acl_mode(tpg, authentication=False)
            for name in initiators:
                existing = [a for a in tpg.node_acls if a.node_wwn == name]
                acl = existing[0] if existing else rtslib.NodeACL(tpg, name, mode="create")
                if not existing:
                    created.append(acl)
                created.append(rtslib.MappedLUN(acl, lun, lun_obj))
        tpg.enable = True
        return lun_obj
    except rts.failures() as exc:
        for obj in reversed(created):
            with contextlib.suppress(*rts.failures()):
                obj.delete()
        raise LioError(f"exporting {so.name} as {iqn} LUN {lun} failed: {exc}") from exc


def unexport(iqn: str) -> None:
    """Delete target ``iqn`` with its TPGs, portals, ACLs and LUNs (not the backstores)."""
    target = find_target(iqn)
    if target is None:
        raise LioError(f"no iSCSI target {iqn}")
    try:
        target.delete()
    except rts.failures() as exc:
        raise LioError(f"deleting iSCSI target {iqn} failed: {exc}") from exc
