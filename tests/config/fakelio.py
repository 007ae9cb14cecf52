"""A recording stand-in for the rtslib seam (targetmirror.lio.live.RtslibLio).

It keeps an in-memory :class:`LioState` that each call changes the way LIO would, and records
every call, so tests can run apply twice (idempotence), check ownership, and assert that a
refused file made no call at all.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from targetmirror.config.plan import AclState, BackstoreState, LioState, TargetState


class FakeLio:
    def __init__(self, state: LioState | None = None) -> None:
        self.state = state or LioState()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.reads = 0
        self._serial = itertools.count(1)

    def read_state(self) -> LioState:
        self.reads += 1
        st = copy.deepcopy(self.state)
        st.groups = {}
        return st

    def _rec(self, op: str, **kw: Any) -> None:
        self.calls.append((op, kw))

    def create_backstore(self, name: str, size: int, cfgstring: str, wwn: str | None) -> str:
        self._rec("create_backstore", name=name, size=size, cfgstring=cfgstring, wwn=wwn)
        assert name not in self.state.backstores
        wwn = wwn or f"serial-{next(self._serial)}"
        self.state.backstores[name] = BackstoreState(size, cfgstring, wwn)
        return wwn

    def delete_backstore(self, name: str) -> None:
        self._rec("delete_backstore", name=name)
        del self.state.backstores[name]
        for t in self.state.targets.values():
            for n in [n for n, so in t.luns.items() if so == name]:
                del t.luns[n]

    def create_target(self, iqn: str) -> None:
        self._rec("create_target", iqn=iqn)
        assert iqn not in self.state.targets
        self.state.targets[iqn] = TargetState(generate_node_acls=True, enabled=False)

    def delete_target(self, iqn: str) -> None:
        self._rec("delete_target", iqn=iqn)
        del self.state.targets[iqn]

    def set_tpg(self, iqn: str, authentication: bool) -> None:
        self._rec("set_tpg", iqn=iqn, authentication=authentication)
        t = self.state.targets[iqn]
        t.authentication = authentication
        t.generate_node_acls = False

    def enable_tpg(self, iqn: str) -> None:
        self._rec("enable_tpg", iqn=iqn)
        self.state.targets[iqn].enabled = True

    def add_portal(self, iqn: str, ip: str, port: int) -> None:
        self._rec("add_portal", iqn=iqn, ip=ip, port=port)
        self.state.targets[iqn].portals.add((ip, port))

    def remove_portal(self, iqn: str, ip: str, port: int) -> None:
        self._rec("remove_portal", iqn=iqn, ip=ip, port=port)
        self.state.targets[iqn].portals.remove((ip, port))

    def add_lun(self, iqn: str, lun: int, backstore: str) -> None:
        self._rec("add_lun", iqn=iqn, lun=lun, backstore=backstore)
        assert backstore in self.state.backstores
        assert lun not in self.state.targets[iqn].luns
        self.state.targets[iqn].luns[lun] = backstore

    def remove_lun(self, iqn: str, lun: int) -> None:
        self._rec("remove_lun", iqn=iqn, lun=lun)
        t = self.state.targets[iqn]
        del t.luns[lun]
        for acl in t.acls.values():
            acl.mapped = {m: tl for m, tl in acl.mapped.items() if tl != lun}

    def add_acl(self, iqn: str, initiator: str) -> None:
        self._rec("add_acl", iqn=iqn, initiator=initiator)
        self.state.targets[iqn].acls[initiator] = AclState()

    def remove_acl(self, iqn: str, initiator: str) -> None:
        self._rec("remove_acl", iqn=iqn, initiator=initiator)
        del self.state.targets[iqn].acls[initiator]

    def set_chap(self, iqn: str, initiator: str, chap: Any) -> None:
        self._rec("set_chap", iqn=iqn, initiator=initiator, chap=chap)
        self.state.targets[iqn].acls[initiator].chap = chap

    def map_lun(self, iqn: str, initiator: str, mapped_lun: int, tpg_lun: int) -> None:
        self._rec("map_lun", iqn=iqn, initiator=initiator, mapped_lun=mapped_lun,
                  tpg_lun=tpg_lun)
        t = self.state.targets[iqn]
        assert tpg_lun in t.luns and mapped_lun not in t.acls[initiator].mapped
        t.acls[initiator].mapped[mapped_lun] = tpg_lun

    def unmap_lun(self, iqn: str, initiator: str, mapped_lun: int) -> None:
        self._rec("unmap_lun", iqn=iqn, initiator=initiator, mapped_lun=mapped_lun)
        del self.state.targets[iqn].acls[initiator].mapped[mapped_lun]


class FakeGroups:
    """The daemon's group registry, recorded."""

    def __init__(self) -> None:
        self.groups: dict[str, list[str]] = {}
        self.calls: list[tuple[str, str]] = []

    def all(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.groups.items()}

    def create(self, group: str, names: list[str]) -> None:
        self.calls.append(("create", group))
        assert group not in self.groups
        self.groups[group] = list(names)

    def delete(self, group: str) -> None:
        self.calls.append(("delete", group))
        del self.groups[group]
