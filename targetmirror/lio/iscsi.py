"""iSCSI exports of a backstore: target, TPG, portal, LUN and ACLs, through rtslib-fb.

With initiator names given, each gets a NodeACL and a mapped LUN (the normal, secure setup).
With none, the TPG runs in demo mode (any initiator, writable) — meant for the lab only and
logged as such by the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from targetmirror.errors import LioError
from targetmirror.lio.backstore import _rtslib


def export(so: Any, iqn: str, *, portal: tuple[str, int] = ("127.0.0.1", 3260), lun: int = 0,
           initiators: Sequence[str] = ()) -> Any:
    """Export storage object ``so`` as LUN ``lun`` of target ``iqn``; return the LUN.

    Reuses an existing target, TPG 1 and portal.  On failure everything this call created is
    removed again.
    """
    rtslib = _rtslib()
    created: list[Any] = []
    try:
        fabric = rtslib.FabricModule("iscsi")
        existing = [t for t in fabric.targets if t.wwn == iqn]
        if existing:
            target = existing[0]
        else:
            target = rtslib.Target(fabric, iqn, mode="create")
            created.append(target)
        tpgs = [t for t in target.tpgs if t.tag == 1]
        if tpgs:
            tpg = tpgs[0]
        else:
            tpg = rtslib.TPG(target, 1, mode="create")
            created.append(tpg)
        tpg.enable = True
        if not any((p.ip_address, p.port) == portal for p in tpg.network_portals):
            created.append(rtslib.NetworkPortal(tpg, portal[0], portal[1], mode="create"))
        lun_obj = rtslib.LUN(tpg, lun, so)
        created.append(lun_obj)
        if initiators:
            tpg.set_attribute("authentication", "0")
            tpg.set_attribute("generate_node_acls", "0")
            for name in initiators:
                acl = rtslib.NodeACL(tpg, name, mode="any")
                rtslib.MappedLUN(acl, lun, lun_obj)
        else:
            tpg.set_attribute("authentication", "0")
            tpg.set_attribute("generate_node_acls", "1")
            tpg.set_attribute("demo_mode_write_protect", "0")
            tpg.set_attribute("cache_dynamic_acls", "1")
        return lun_obj
    except (rtslib.RTSLibError, OSError) as exc:
        for obj in reversed(created):
            with contextlib.suppress(rtslib.RTSLibError, OSError):
                obj.delete()
        raise LioError(f"exporting {so.name} as {iqn} LUN {lun} failed: {exc}") from exc


def unexport(iqn: str) -> None:
    """Delete target ``iqn`` with its TPGs, portals, ACLs and LUNs (not the backstores)."""
    rtslib = _rtslib()
    for target in rtslib.FabricModule("iscsi").targets:
        if target.wwn == iqn:
            target.delete()
            return
    raise LioError(f"no iSCSI target {iqn}")
