"""An in-memory stand-in for ``rtslib_fb`` (the part targetmirror uses), to test the CLI's
checks, refusals and roll-backs on a host without LIO.

It keeps one tree of storage objects and iSCSI targets, refuses what configfs refuses (a name
or LUN taken twice), and can be told to fail: ``absent`` makes ``RTSRoot()`` fail the way
rtslib-fb does on a host without LIO (``FileNotFoundError: /proc/modules`` or
``RTSLibError("Cannot mount configfs")``), ``fail_on`` makes the named constructor raise
``RTSLibError`` (a later step of a create failing).  The lab tests prove the same commands
against the real kernel.
"""

from __future__ import annotations

import types
from typing import Any


class RTSLibError(Exception):
    pass


class Lio:
    def __init__(self) -> None:
        self.storage_objects: list[StorageObject] = []
        self.targets: list[Target] = []
        self.absent: str | None = None
        """None, "proc-modules" or "configfs"."""
        self.fail_on: set[str] = set()

    def check(self, what: str) -> None:
        if what in self.fail_on:
            raise RTSLibError(f"injected failure of {what}")

    def snapshot(self) -> Any:
        """Everything, comparable: what 'changes nothing' is measured on."""
        return (sorted((so.name, so.size, so.config, so.wwn) for so in self.storage_objects),
                sorted((t.wwn, [(g.tag, g.enable, sorted(g.attrs.items()),
                                 sorted((p.ip_address, p.port) for p in g.network_portals),
                                 sorted((lu.lun, lu.storage_object.name) for lu in g.luns),
                                 sorted((a.node_wwn, sorted((m.mapped_lun, m.tpg_lun.lun)
                                                            for m in a.mapped_luns))
                                        for a in g.node_acls))
                                for g in t.tpgs]) for t in self.targets))


LIO = Lio()


class RTSRoot:
    def __init__(self) -> None:
        if LIO.absent == "proc-modules":
            raise FileNotFoundError(2, "No such file or directory", "/proc/modules")
        if LIO.absent == "configfs":
            raise RTSLibError("Cannot mount configfs")

    @property
    def storage_objects(self) -> list[StorageObject]:
        return list(LIO.storage_objects)

    @property
    def targets(self) -> list[Target]:
        return list(LIO.targets)


class StorageObject:
    plugin = "user"

    def __init__(self, name: str, size: int, config: str, wwn: str | None = None,
                 hw_max_sectors: int = 128, control: str = "") -> None:
        LIO.check("UserBackedStorageObject")
        if any(so.name == name for so in LIO.storage_objects):
            raise RTSLibError(f"storage object {name} exists")
        self.name, self.size, self.config = name, size, config
        self.wwn = wwn or f"serial-{name}"
        self.hw_max_sectors, self.control = hw_max_sectors, control
        LIO.storage_objects.append(self)

    @property
    def attached_luns(self) -> list[LUN]:
        return [lu for t in LIO.targets for g in t.tpgs for lu in g.luns
                if lu.storage_object is self]

    def delete(self) -> None:
        if self.attached_luns:
            raise RTSLibError(f"storage object {self.name} is in use")
        LIO.storage_objects.remove(self)


UserBackedStorageObject = StorageObject


class FabricModule:
    def __init__(self, name: str) -> None:
        assert name == "iscsi"

    @property
    def targets(self) -> list[Target]:
        return list(LIO.targets)


class Target:
    def __init__(self, fabric: FabricModule, wwn: str, mode: str = "any") -> None:
        LIO.check("Target")
        if any(t.wwn == wwn for t in LIO.targets):
            raise RTSLibError(f"target {wwn} exists")
        self.wwn = wwn
        self.tpgs: list[TPG] = []
        LIO.targets.append(self)

    def delete(self) -> None:
        for tpg in list(self.tpgs):
            tpg.delete()
        LIO.targets.remove(self)


class TPG:
    def __init__(self, target: Target, tag: int, mode: str = "any") -> None:
        LIO.check("TPG")
        self.target, self.tag, self.enable = target, tag, False
        self.attrs: dict[str, str] = {"generate_node_acls": "0", "authentication": "0"}
        self.network_portals: list[NetworkPortal] = []
        self.luns: list[LUN] = []
        self.node_acls: list[NodeACL] = []
        target.tpgs.append(self)

    def set_attribute(self, key: str, value: str) -> None:
        self.attrs[key] = value

    def get_attribute(self, key: str) -> str:
        return self.attrs.get(key, "0")

    def delete(self) -> None:
        for obj in [*self.node_acls, *self.luns, *self.network_portals]:
            obj.delete()
        self.target.tpgs.remove(self)


class NetworkPortal:
    def __init__(self, tpg: TPG, ip: str, port: int, mode: str = "any") -> None:
        LIO.check("NetworkPortal")
        self.tpg, self.ip_address, self.port = tpg, ip, port
        tpg.network_portals.append(self)

    def delete(self) -> None:
        self.tpg.network_portals.remove(self)


class LUN:
    def __init__(self, tpg: TPG, lun: int, storage_object: StorageObject) -> None:
        LIO.check("LUN")
        if any(lu.lun == lun for lu in tpg.luns):
            raise RTSLibError(f"LUN {lun} exists")
        self.tpg, self.lun, self.storage_object = tpg, lun, storage_object
        tpg.luns.append(self)

    def delete(self) -> None:
        if self not in self.tpg.luns:
            raise RTSLibError("no such LUN")
        for acl in self.tpg.node_acls:
            for m in list(acl.mapped_luns):
                if m.tpg_lun is self:
                    m.delete()
        self.tpg.luns.remove(self)


class NodeACL:
    def __init__(self, tpg: TPG, node_wwn: str, mode: str = "any") -> None:
        LIO.check("NodeACL")
        self.tpg, self.node_wwn = tpg, node_wwn
        self.mapped_luns: list[MappedLUN] = []
        self.chap_userid = self.chap_password = ""
        self.chap_mutual_userid = self.chap_mutual_password = ""
        tpg.node_acls.append(self)

    def delete(self) -> None:
        if self not in self.tpg.node_acls:
            raise RTSLibError("no such ACL")
        self.tpg.node_acls.remove(self)


class MappedLUN:
    def __init__(self, acl: NodeACL, mapped_lun: int, tpg_lun: LUN | int) -> None:
        LIO.check("MappedLUN")
        self.acl, self.mapped_lun = acl, mapped_lun
        self.tpg_lun = tpg_lun if isinstance(tpg_lun, LUN) else next(
            lu for lu in acl.tpg.luns if lu.lun == tpg_lun)
        acl.mapped_luns.append(self)

    def delete(self) -> None:
        if self in self.acl.mapped_luns:
            self.acl.mapped_luns.remove(self)


def install(monkeypatch: Any) -> Lio:
    """Make ``targetmirror.lio.rts.module()`` return this fake, with an empty LIO."""
    from targetmirror.lio import rts

    global LIO
    LIO = Lio()
    module = types.ModuleType("rtslib_fb_fake")
    for name in ("RTSLibError", "RTSRoot", "UserBackedStorageObject", "FabricModule",
                 "Target", "TPG", "NetworkPortal", "LUN", "NodeACL", "MappedLUN"):
        setattr(module, name, globals()[name])
    monkeypatch.setattr(rts, "module", lambda: module)
    return LIO
