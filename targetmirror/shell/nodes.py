"""The ``targetmirror-shell`` tree, in targetcli's idiom (configshell-fb)::

    /                    the daemon               status refresh
    /mirrors             every mirror served      status split rejoin
    /mirrors/<name>      one mirror               status split rejoin verify sync backup
    /mirrors/<name>/a|b  its legs: image path and what the leg is doing
    /groups              consistency groups       create delete
    /groups/<name>       one group                status split rejoin
    /exports             iSCSI LUNs backed by user:mirror (read from LIO)   status

Nothing here performs an operation: every command calls :class:`targetmirror.client.Client`,
the same code the ``targetmirror`` CLI runs, and prints the same one-line descriptions.  The
tree is rebuilt from one ``status`` call whenever a command may have changed it (``refresh``
does it by hand), so ``ls`` always shows what the daemon says.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

try:  # Debian's python3-configshell-fb 1.1 names it configshell_fb; PyPI 2.x both
    from configshell_fb import ConfigNode, ExecutionError
except ImportError:  # pragma: no cover - depends on the installed flavour
    from configshell import ConfigNode, ExecutionError

from targetmirror.client import (
    Client,
    describe_backup,
    describe_rejoin,
    describe_sync,
    describe_verify,
    status_rows,
)
from targetmirror.errors import TargetMirrorError
from targetmirror.states import STEADY_STATES, leg_states

T = TypeVar("T")



def _run(fn: Callable[[], T]) -> T:
    """Run one client call; a refusal becomes the shell's error line (code and reason)."""
    try:
        return fn()
    except TargetMirrorError as exc:
        raise ExecutionError(f"{exc.code}: {exc}") from exc


def _bool(value: str | bool | None, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if value.lower() in ("true", "yes", "1", "on"):
        return True
    if value.lower() in ("false", "no", "0", "off"):
        return False
    raise ExecutionError(f"{name}={value}: expected true or false")


def _number(value: str | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise ExecutionError(f"{name}={value}: expected a number") from None


def mirror_summary(m: dict[str, Any]) -> tuple[str, bool | None]:
    """``ls`` text and health of one mirror (True green, False red, None plain)."""
    state = m["state"]
    parts = [state]
    if "epoch" in m:
        parts.append(f"epoch {m['epoch']}")
    sp = m.get("split") or {}
    if state in ("split", "splitting") and sp:
        parts.append(f"A {sp.get('a_status')}")
    bm = m.get("bitmap") or {}
    if state in ("split", "rejoining") and bm:
        parts.append(f"{bm.get('marked', 0)} dirty regions")
    rs = m.get("resync") or {}
    if rs.get("error"):
        return ", ".join([*parts, f"{rs.get('kind')} failed: {rs['error']}"]), False
    if rs:
        total = rs.get("bytes_total") or (rs.get("regions_total") or 0) * bm.get("region_size", 0)
        if total:
            parts.append(f"{rs.get('kind')} {100 * rs.get('bytes_copied', 0) / total:.0f}%")
    if m.get("reason"):
        parts.append(str(m["reason"]))
    health = m.get("health", "ok")
    if health != "ok":
        failed = ", ".join(sorted(m.get("failed_legs") or {})).upper()
        parts.append(f"{health.upper()} (leg {failed} failed)" if failed else health.upper())
        return ", ".join(parts), False
    if str(sp.get("a_status", "")).startswith("lost"):
        return ", ".join(parts), False
    if state in STEADY_STATES:  # resting where it should (the state table says which)
        return ", ".join(parts), True
    if state in ("not-ready", "snapshot"):
        return ", ".join(parts), state == "snapshot"
    return ", ".join(parts), None  # on its way: a drain, a copy


class Node(ConfigNode):  # type: ignore[misc]
    """Shared helpers: the root's client and status snapshot."""

    @property
    def root(self) -> RootNode:
        node = self
        while node.parent is not None:
            node = node.parent
        assert isinstance(node, RootNode)
        return node

    @property
    def client(self) -> Client:
        return self.root.client

    def say(self, text: str) -> None:
        self.shell.con.display(text)

    def changed(self) -> None:
        """After an operation: rebuild the tree from a fresh status."""
        self.root.refresh()


class RootNode(Node):
    """The daemon."""

    def __init__(self, shell: Any, client: Client) -> None:
        # shell= is configshell's console object, not a command shell
        super().__init__("/", shell=shell)  # nosec B604
        self.client_ = client
        self.snapshot: dict[str, Any] = {}
        self.error: str | None = None
        self.mirrors = MirrorsNode(self)
        self.groups = GroupsNode(self)
        self.exports = ExportsNode(self)
        self.refresh()

    @property
    def client(self) -> Client:
        return self.client_

    def refresh(self) -> None:
        try:
            self.snapshot = self.client_.status()
            self.error = None
        except TargetMirrorError as exc:
            self.snapshot = {}
            self.error = f"{exc.code}: {exc}"
        self.mirrors.refresh()
        self.groups.refresh()

    def mirror_status(self, name: str) -> dict[str, Any] | None:
        for m in self.snapshot.get("mirrors", []):
            if m["name"] == name:
                return dict(m)
        return None

    def summary(self) -> tuple[str, bool | None]:
        if self.error:
            return self.error, False
        return f"targetmirrord {self.snapshot.get('version', '?')}", True

    def ui_command_refresh(self) -> None:
        """
        Read the daemon's state again (every command that changes something does this
        itself)."""
        self.refresh()

    def ui_command_status(self) -> None:
        """
        Show every mirror as ``targetmirror status`` does: state, epoch, writes in flight,
        pre-split writes, the last split instant, its drain time and what A is."""
        self.refresh()
        if self.error:
            raise ExecutionError(self.error)
        for row in status_rows(self.snapshot.get("mirrors", []), self.snapshot.get("config")):
            self.say(row)


class MirrorsNode(Node):
    """Every mirror the daemon serves."""

    def __init__(self, parent: Node) -> None:
        super().__init__("mirrors", parent)

    def refresh(self) -> None:
        self._children: set[ConfigNode] = set()
        for m in self.root.snapshot.get("mirrors", []):
            MirrorNode(self, m["name"])

    def names(self) -> list[str]:
        return sorted(c.name for c in self.children)

    def summary(self) -> tuple[str, bool | None]:
        healths = [c.summary()[1] for c in self.children]
        n = len(healths)
        return (f"{n} mirror{'s' if n != 1 else ''}",
                False if False in healths else (None if None in healths or not n else True))

    def _complete_names(self, parameters: dict[str, str], text: str) -> list[str]:
        del parameters
        return [n for n in self.names() if n.startswith(text)]

    def ui_command_status(self, *names: str) -> None:
        """
        status [NAME...]: the status table of the named mirrors (all when none).
        """
        res = _run(lambda: self.client.status(list(names)))
        for row in status_rows(res["mirrors"]):
            self.say(row)

    def ui_complete_status(self, parameters: dict[str, str], text: str,
                           current_param: str) -> list[str]:
        return self._complete_names(parameters, text)

    def ui_command_split(self, *names: str, timeout: str = "300") -> None:
        """
        split NAME [NAME...] [timeout=SECONDS]: split the named mirrors at one instant and
        wait until every A is complete (as ``targetmirror split``)."""
        if not names:
            raise ExecutionError("name at least one mirror (or use /groups/<name> split)")
        t = _number(timeout, "timeout") or 300.0
        res = _run(lambda: self.client.split(list(names), wait=True, timeout=t))
        self.changed()
        for row in status_rows(res["split"]):
            self.say(row)

    def ui_complete_split(self, parameters: dict[str, str], text: str,
                          current_param: str) -> list[str]:
        return self._complete_names(parameters, text)

    def ui_command_rejoin(self, *names: str, full: str = "false", rate: str | None = None,
                          timeout: str = "3600") -> None:
        """
        rejoin NAME [NAME...] [full=true] [rate=MB/s] [timeout=SECONDS]: copy what changed
        since the split back to A, online, and wait until mirrored again."""
        if not names:
            raise ExecutionError("name at least one mirror (or use /groups/<name> rejoin)")
        f, r, t = _bool(full, "full"), _number(rate, "rate"), _number(timeout, "timeout")
        res = _run(lambda: self.client.rejoin(list(names), full=f, rate_mbps=r, wait=True,
                                              timeout=t or 3600.0))
        self.changed()
        for m in res["rejoin"]:
            self.say(describe_rejoin(m))

    def ui_complete_rejoin(self, parameters: dict[str, str], text: str,
                           current_param: str) -> list[str]:
        return self._complete_names(parameters, text)


class MirrorNode(Node):
    """One mirror; ``cd`` here and run its commands without naming it."""

    def __init__(self, parent: MirrorsNode, name: str) -> None:
        super().__init__(name, parent)
        self.mirror = name
        st = self.status()
        if "image_a" in st:
            LegNode(self, "a")
            LegNode(self, "b")

    def status(self) -> dict[str, Any]:
        return self.root.mirror_status(self.mirror) or {"name": self.mirror,
                                                        "state": "gone"}

    def summary(self) -> tuple[str, bool | None]:
        return mirror_summary(self.status())

    def ui_command_status(self, json: str = "false") -> None:
        """
        status [json=true]: this mirror's state, epoch, last split and progress (the same
        data as ``targetmirror status --json NAME`` with json=true)."""
        st = _run(lambda: self.client.mirror(self.mirror))
        if _bool(json, "json"):
            self.say(_dumps(st))
            return
        for row in status_rows([st]):
            self.say(row)
        text, _ = mirror_summary(st)
        self.say(text)

    def ui_command_split(self, timeout: str = "300") -> None:
        """
        split [timeout=SECONDS]: split this mirror now: A becomes the point-in-time copy of
        this instant, writes go on to B only.  Waits until A is complete."""
        t = _number(timeout, "timeout") or 300.0
        res = _run(lambda: self.client.split([self.mirror], wait=True, timeout=t))
        self.changed()
        for row in status_rows(res["split"]):
            self.say(row)

    def ui_command_rejoin(self, full: str = "false", rate: str | None = None,
                          timeout: str = "3600") -> None:
        """
        rejoin [full=true] [rate=MB/s] [timeout=SECONDS]: copy the regions B changed since
        the split back to A, online (full=true copies everything), and wait until mirrored."""
        f, r, t = _bool(full, "full"), _number(rate, "rate"), _number(timeout, "timeout")
        res = _run(lambda: self.client.rejoin([self.mirror], full=f, rate_mbps=r, wait=True,
                                              timeout=t or 3600.0))
        self.changed()
        for m in res["rejoin"]:
            self.say(describe_rejoin(m))

    def ui_complete_rejoin(self, parameters: dict[str, str], text: str,
                           current_param: str) -> list[str]:
        return [f"{p}=" for p in ("full", "rate", "timeout") if p.startswith(text)]

    def ui_command_verify(self, repair: str = "false", rate: str | None = None) -> None:
        """
        verify [repair=true] [rate=MB/s]: compare A and B online; regions changed since a
        split are skipped.  repair=true copies B over A where a mirrored mirror differs."""
        rp, r = _bool(repair, "repair"), _number(rate, "rate")
        res = _run(lambda: self.client.verify(self.mirror, repair=rp, rate_mbps=r))
        self.say(describe_verify(res))
        if res["mismatches"] and not res["repaired"]:
            raise ExecutionError(f"{self.mirror}: A and B differ where they should not")

    def ui_command_sync(self, rate: str | None = None, wait: str = "true") -> None:
        """
        sync [rate=MB/s] [wait=false]: initial sync, copy A to B online (A holds the data,
        B is new)."""
        r, w = _number(rate, "rate"), _bool(wait, "wait")
        res = _run(lambda: self.client.sync(self.mirror, rate_mbps=r, wait=w))
        self.changed()
        self.say(describe_sync(res))

    def ui_command_backup(self, to: str, rejoin: str = "false", timeout: str = "300") -> None:
        """
        backup to=FILE [rejoin=true] [timeout=SECONDS]: split (unless split already) and copy
        image A to the new sparse FILE; rejoin=true rejoins afterwards.  (Handing A to a
        command is ``targetmirror backup --exec``.)"""
        rj, t = _bool(rejoin, "rejoin"), _number(timeout, "timeout") or 300.0
        result = _run(lambda: self.client.backup(self.mirror, to=to, rejoin=rj, timeout=t))
        self.changed()
        self.say(describe_backup(result))

    def ui_complete_backup(self, parameters: dict[str, str], text: str,
                           current_param: str) -> list[str]:
        import glob
        import os

        if current_param != "to":
            return [f"{p}=" for p in ("to", "rejoin", "timeout") if p.startswith(text)]
        return [p + ("/" if os.path.isdir(p) else "") for p in glob.glob(text + "*")]


class LegNode(Node):
    """One leg (``a`` is the split-off copy, ``b`` the live leg)."""

    def __init__(self, parent: MirrorNode, leg: str) -> None:
        super().__init__(leg, parent)
        self.leg = leg

    def summary(self) -> tuple[str, bool | None]:
        st = self.parent.status()
        leg = (st.get("legs") or {}).get(self.leg)
        if leg is None:  # an older daemon: the role from the state alone
            a, b = leg_states(st["state"])
            leg = {"role": a if self.leg == "a" else b, "health": "ok"}
        text = f"{st.get('image_' + self.leg, '?')}, {leg['role']}"
        if leg.get("reason"):
            text += f": {leg['reason']}"
        if leg.get("slow"):
            text += f", SLOW (oldest call {leg.get('oldest_call_seconds', 0):.1f} s)"
        health = leg.get("health", "ok")
        return text, False if health == "failed" else None if health == "resyncing" else True


class GroupsNode(Node):
    """Consistency groups: mirrors split at one instant."""

    def __init__(self, parent: Node) -> None:
        super().__init__("groups", parent)

    def refresh(self) -> None:
        self._children: set[ConfigNode] = set()
        for g in sorted(self.root.snapshot.get("groups", {})):
            GroupNode(self, g)

    def summary(self) -> tuple[str, bool | None]:
        n = len(self.children)
        return f"{n} group{'s' if n != 1 else ''}", None

    def ui_command_create(self, name: str, *members: str) -> None:
        """
        create NAME MIRROR MIRROR [MIRROR...]: a consistency group of two or more mirrors
        (split and rejoined together)."""
        _run(lambda: self.client.group_create(name, list(members)))
        self.changed()
        self.say(f"created group {name}: {' '.join(members)}")

    def ui_complete_create(self, parameters: dict[str, str], text: str,
                           current_param: str) -> list[str]:
        if current_param == "name":
            return []
        return [n for n in self.root.mirrors.names() if n.startswith(text)]

    def ui_command_delete(self, name: str) -> None:
        """
        delete NAME: forget a consistency group (its mirrors are not touched).
        """
        _run(lambda: self.client.group_delete(name))
        self.changed()
        self.say(f"deleted group {name}")

    def ui_complete_delete(self, parameters: dict[str, str], text: str,
                           current_param: str) -> list[str]:
        return [c.name for c in self.children if c.name.startswith(text)]


class GroupNode(Node):
    """One consistency group."""

    def __init__(self, parent: GroupsNode, name: str) -> None:
        super().__init__(name, parent)
        self.group = name

    def members(self) -> list[str]:
        return list(self.root.snapshot.get("groups", {}).get(self.group, []))

    def summary(self) -> tuple[str, bool | None]:
        states = [(self.root.mirror_status(n) or {}).get("state", "absent")
                  for n in self.members()]
        text = " ".join(f"{n}:{s}" for n, s in zip(self.members(), states, strict=True))
        return text, (False if "absent" in states else
                      True if len(set(states)) == 1 and states[0] in STEADY_STATES else None)

    def ui_command_status(self) -> None:
        """
        status: the status table of this group's mirrors.
        """
        res = _run(lambda: self.client.status(self.members()))
        for row in status_rows(res["mirrors"]):
            self.say(row)

    def ui_command_split(self, timeout: str = "300") -> None:
        """
        split [timeout=SECONDS]: split every mirror of the group at one instant.
        """
        t = _number(timeout, "timeout") or 300.0
        res = _run(lambda: self.client.split(group=self.group, wait=True, timeout=t))
        self.changed()
        for row in status_rows(res["split"]):
            self.say(row)

    def ui_command_rejoin(self, full: str = "false", rate: str | None = None,
                          timeout: str = "3600") -> None:
        """
        rejoin [full=true] [rate=MB/s]: rejoin every mirror of the group.
        """
        f, r, t = _bool(full, "full"), _number(rate, "rate"), _number(timeout, "timeout")
        res = _run(lambda: self.client.rejoin(group=self.group, full=f, rate_mbps=r,
                                              wait=True, timeout=t or 3600.0))
        self.changed()
        for m in res["rejoin"]:
            self.say(describe_rejoin(m))


class ExportsNode(Node):
    """iSCSI targets that export ``user:mirror`` backstores (LIO, read through rtslib)."""

    def __init__(self, parent: Node) -> None:
        super().__init__("exports", parent)

    def _exports(self) -> list[tuple[str, int, str]]:
        from targetmirror.lio.exports import list_exports

        return list_exports()

    def summary(self) -> tuple[str, bool | None]:
        try:
            n = len(self._exports())
        except TargetMirrorError as exc:
            return f"LIO not readable: {exc}", None
        return f"{n} LUN{'s' if n != 1 else ''}", None

    def ui_command_status(self) -> None:
        """
        status: each exporting target IQN, LUN and backstore.
        """
        for iqn, lun, so in _run(self._exports):
            self.say(f"{iqn} lun{lun} -> user:mirror/{so}")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
