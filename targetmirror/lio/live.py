"""The rtslib-fb seam of ``targetmirror apply``: read LIO's state, make one change at a time.

Every method is one small configfs change through rtslib-fb, named like the plan's actions
(:mod:`targetmirror.config.plan`), so the planning logic stays pure and host-testable and this
file is the only one that needs a kernel.  Only TPG 1 of a target is read or managed; other
TPGs of a hand-made target are left alone.
"""

from __future__ import annotations

from typing import Any

from targetmirror.config.cfgstring import SUBTYPE
from targetmirror.config.loader import Chap
from targetmirror.config.plan import AclState, BackstoreState, LioState, TargetState
from targetmirror.errors import LioError
from targetmirror.lio import backstore, iscsi, rts
from targetmirror.lio.iscsi import TPG_TAG


def _so_label(so: Any) -> str:
    """A LUN's storage object: its name for a user:mirror, ``plugin:name`` otherwise."""
    if so.plugin == "user" and str(so.config or "").startswith(SUBTYPE + "/"):
        return str(so.name)
    return f"{so.plugin}:{so.name}"


def _strip(ip: str) -> str:
    return ip[1:-1] if ip.startswith("[") and ip.endswith("]") else ip


class RtslibLio:
    """The live LIO (needs root, configfs and the target modules)."""

    def __init__(self) -> None:
        self.rtslib = rts.module()

    # -- reading ---------------------------------------------------------------------------
    def read_state(self) -> LioState:
        state = LioState()
        root = rts.root()
        for so in root.storage_objects:
            if so.plugin == "user" and str(so.config or "").startswith(SUBTYPE + "/"):
                state.backstores[so.name] = BackstoreState(
                    int(so.size), str(so.config)[len(SUBTYPE) + 1:], str(so.wwn or ""))
        for target in rts.iscsi().targets:
            tpg = iscsi.find_tpg(target)
            ts = TargetState()
            state.targets[target.wwn] = ts
            if tpg is None:
                continue
            ts.enabled = bool(tpg.enable)
            ts.authentication = tpg.get_attribute("authentication") == "1"
            ts.generate_node_acls = tpg.get_attribute("generate_node_acls") == "1"
            ts.portals = {(_strip(p.ip_address), int(p.port)) for p in tpg.network_portals}
            ts.luns = {int(lun.lun): _so_label(lun.storage_object) for lun in tpg.luns}
            for acl in tpg.node_acls:
                chap = None
                if acl.chap_userid:
                    chap = Chap(acl.chap_userid, acl.chap_password or "",
                                acl.chap_mutual_userid or "", acl.chap_mutual_password or "")
                ts.acls[acl.node_wwn] = AclState(
                    chap, {int(m.mapped_lun): int(m.tpg_lun.lun) for m in acl.mapped_luns})
        return state

    # -- lookups ---------------------------------------------------------------------------
    def _target(self, iqn: str) -> Any:
        target = iscsi.find_target(iqn)
        if target is None:
            raise LioError(f"no iSCSI target {iqn}")
        return target

    def _tpg(self, iqn: str) -> Any:
        tpg = iscsi.find_tpg(self._target(iqn))
        if tpg is None:
            raise LioError(f"iSCSI target {iqn} has no TPG {TPG_TAG}")
        return tpg

    def _acl(self, iqn: str, initiator: str) -> Any:
        for acl in self._tpg(iqn).node_acls:
            if acl.node_wwn == initiator:
                return acl
        raise LioError(f"{iqn} has no ACL for {initiator}")

    # -- changes ---------------------------------------------------------------------------
    def _wrap(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except (self.rtslib.RTSLibError, OSError) as exc:
            raise LioError(f"{what}: {exc}") from exc

    def create_backstore(self, name: str, size: int, cfgstring: str, wwn: str | None) -> str:
        so = backstore.create_backstore(name, size, cfgstring, wwn=wwn, check=True)
        return str(so.wwn)

    def delete_backstore(self, name: str) -> None:
        backstore.delete_backstore(name)

    def create_target(self, iqn: str) -> None:
        self._wrap(f"creating target {iqn}", iscsi.create_target, iqn)

    def delete_target(self, iqn: str) -> None:
        self._wrap(f"deleting target {iqn}", self._target(iqn).delete)

    def set_tpg(self, iqn: str, authentication: bool) -> None:
        self._wrap(f"setting authentication of {iqn}", iscsi.set_acl_mode, self._tpg(iqn),
                   authentication)

    def enable_tpg(self, iqn: str) -> None:
        tpg = self._tpg(iqn)
        self._wrap(f"enabling {iqn}", setattr, tpg, "enable", True)

    def add_portal(self, iqn: str, ip: str, port: int) -> None:
        self._wrap(f"adding portal {ip}:{port} to {iqn}", self.rtslib.NetworkPortal,
                   self._tpg(iqn), ip, port, mode="create")

    def remove_portal(self, iqn: str, ip: str, port: int) -> None:
        for p in self._tpg(iqn).network_portals:
            if (_strip(p.ip_address), int(p.port)) == (ip, port):
                self._wrap(f"removing portal {ip}:{port} of {iqn}", p.delete)
                return
        raise LioError(f"{iqn} has no portal {ip}:{port}")

    def add_lun(self, iqn: str, lun: int, backstore: str) -> None:
        from targetmirror.lio.backstore import find_backstore

        so = find_backstore(backstore)
        if so is None:
            raise LioError(f"no user:mirror backstore {backstore} to export as LUN {lun}")
        self._wrap(f"adding LUN {lun} to {iqn}", self.rtslib.LUN, self._tpg(iqn), lun, so)

    def remove_lun(self, iqn: str, lun: int) -> None:
        for lu in self._tpg(iqn).luns:
            if int(lu.lun) == lun:
                self._wrap(f"removing LUN {lun} of {iqn}", lu.delete)
                return
        raise LioError(f"{iqn} has no LUN {lun}")

    def add_acl(self, iqn: str, initiator: str) -> None:
        self._wrap(f"adding ACL {initiator} to {iqn}", self.rtslib.NodeACL, self._tpg(iqn),
                   initiator, mode="create")

    def remove_acl(self, iqn: str, initiator: str) -> None:
        self._wrap(f"removing ACL {initiator} of {iqn}", self._acl(iqn, initiator).delete)

    def set_chap(self, iqn: str, initiator: str, chap: Chap | None) -> None:
        acl = self._acl(iqn, initiator)
        c = chap or Chap("", "")

        def setcreds() -> None:
            # write only what differs: an unchanged (often empty) value is left alone
            for attr, value in (("chap_userid", c.user), ("chap_password", c.password),
                                ("chap_mutual_userid", c.mutual_user),
                                ("chap_mutual_password", c.mutual_password)):
                if (getattr(acl, attr) or "") != value:
                    setattr(acl, attr, value)

        self._wrap(f"setting CHAP of {initiator} on {iqn}", setcreds)

    def map_lun(self, iqn: str, initiator: str, mapped_lun: int, tpg_lun: int) -> None:
        acl = self._acl(iqn, initiator)
        self._wrap(f"mapping LUN {tpg_lun} of {iqn} for {initiator}", self.rtslib.MappedLUN,
                   acl, mapped_lun, tpg_lun)

    def unmap_lun(self, iqn: str, initiator: str, mapped_lun: int) -> None:
        for m in self._acl(iqn, initiator).mapped_luns:
            if int(m.mapped_lun) == mapped_lun:
                self._wrap(f"unmapping LUN {mapped_lun} of {initiator} on {iqn}", m.delete)
                return
        raise LioError(f"{initiator} on {iqn} has no mapped LUN {mapped_lun}")
