"""The control API's operations: one method per request, with the request's arguments as
keyword parameters (checked against this signature before the call, see
:func:`targetmirror.daemon.control.check_arguments`), returning a JSON-able dict.

They ask the device registry for mirrors and act on them; the socket, the main loop and the
device set are elsewhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from targetmirror import __version__, express
from targetmirror.daemon.control import Handler
from targetmirror.daemon.groups import GroupStore
from targetmirror.daemon.registry import DeviceRegistry
from targetmirror.daemon.schedule import SplitScheduler
from targetmirror.daemon.split import split as split_mirrors
from targetmirror.daemon.watchdog import Watchdog
from targetmirror.deadline import wait_events
from targetmirror.errors import MirrorError


class ControlOps:
    """The operations of one daemon."""

    def __init__(self, registry: DeviceRegistry, groups: GroupStore,
                 watchdog: Watchdog | None = None,
                 config_status: Callable[[], dict[str, Any] | None] = lambda: None,
                 schedules_path: str | None = None) -> None:
        self.registry = registry
        self.groups = groups
        self.watchdog = watchdog
        self.config_status = config_status
        """What ``status`` says about the configuration file (path, problems), if any."""
        self.scheduler = SplitScheduler(
            schedules_path or os.path.join(registry.store.directory, "..", "schedules.json"),
            self._take_split)
        """Scheduled splits, persisted in the state directory (daemon/schedule.py)."""
        self.verified: dict[str, dict[str, Any]] = {}
        """Per mirror, the latest completed verify since the daemon started (metrics)."""

    def handlers(self) -> dict[str, Handler]:
        return {"status": self.status, "split": self.split, "cancel": self.cancel,
                "rejoin": self.rejoin, "verify": self.verify, "sync": self.sync,
                "repair": self.repair, "forget": self.forget,
                "group-create": self.group_create, "group-delete": self.group_delete,
                "ping": self.ping}

    def _names(self, names: list[str] | None, group: str | None) -> list[str]:
        out = list(names or [])
        if group:
            out += self.groups.members(group)
        if not out:
            raise MirrorError("name at least one mirror or a group")
        return out

    # -- reading ---------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return {"version": __version__}

    def status(self, names: list[str] | None = None) -> dict[str, Any]:
        names = names or []
        devs = self.registry.served()
        out = []
        for dev in devs:
            if names and dev.info.dev_name not in names:
                continue
            if dev.mirror is not None and dev.volume == 2:
                st = {"name": dev.info.dev_name, "volume": 2, "mirror": dev.mirror.name,
                      "state": str(dev.mirror.state), "epoch": dev.mirror.epoch}
            elif dev.mirror is not None:
                st = dev.mirror.status()
                st["volume2"] = [d.info.dev_name for d in devs
                                 if d.volume == 2 and d.mirror is dev.mirror]
            elif dev.snapshot is not None:
                st = dev.snapshot.status()
                st["name"] = dev.info.dev_name
            else:
                st = {"name": dev.info.dev_name, "state": "not-ready", "reason": dev.reason,
                      "reason_code": dev.reason_code}
            st["commands"] = dev.runner.commands
            if dev.lane is not None:
                st["express"] = {"commands": dev.lane.served, "runs": dev.lane.runs,
                                 "stops": {why: dev.lane.stops[code]
                                           for code, why in express.STOP_NAMES.items()},
                                 "loop": express.loop is not None,
                                 "notifies": dev.lane.notifies,
                                 "batched": dev.lane.uring_why_not is None,
                                 "batched_why_not": dev.lane.uring_why_not}
            if self.watchdog is not None:
                st["stuck_commands"] = self.watchdog.stuck(dev.info.dev_name)
            out.append(st)
        missing = set(names) - {m["name"] for m in out}
        if missing:
            raise MirrorError(f"no mirror named {', '.join(sorted(missing))} is served")
        res = {"version": __version__, "mirrors": out, "scheduled": self.scheduler.entries(),
               "groups": self.groups.all()}
        config = self.config_status()
        if config is not None:
            res["config"] = config
        return res

    # -- split -----------------------------------------------------------------------------
    def _take_split(self, names: list[str]) -> list[dict[str, Any]]:
        devs = [self.registry.by_name(n) for n in names]
        return split_mirrors(devs, self.registry.volume2s(devs))

    def split(self, names: list[str] | None = None, group: str | None = None,
              at: float | None = None, wait: bool = True, timeout: float = 300.0,
              one_way: bool = False) -> dict[str, Any]:
        names = self._names(names, group)
        if at is not None:
            for n in names:
                dev = self.registry.by_name(n)
                if dev.mirror is None:
                    raise MirrorError(f"mirror {n} is not being served: {dev.reason}")
                dev.mirror.check_can_split()
            s = self.scheduler.add(float(at), names)
            return {"scheduled": {"id": s.id, "at": s.at, "names": s.names}}
        devs = [self.registry.by_name(n) for n in names]
        for d in devs:
            if d.volume == 2:
                raise MirrorError(f"{d.info.dev_name} is volume 2 of mirror "
                                  f"{d.mirror.name if d.mirror else '?'}; split the mirror")
        result = split_mirrors(devs, self.registry.volume2s(devs), one_way=one_way)
        if not wait:
            return {"split": result}
        wait_events([(n, self.registry.mirror(n).split_complete) for n in names], timeout,
                    lambda n: MirrorError(f"split of {n} did not complete within {timeout} s "
                                          "(pre-split writes still in flight)"))
        instant = {r["name"]: r for r in result}
        done = []
        for n in names:
            st = self.registry.mirror(n).status()
            st["ring_head"] = instant[n]["ring_head"]
            st["locks_held_seconds"] = instant[n]["locks_held_seconds"]
            done.append(st)
        return {"split": done}

    def cancel(self, id: int) -> dict[str, Any]:
        s = self.scheduler.cancel(id)
        return {"cancelled": s.id, "state": s.state}

    def forget(self, name: str) -> dict[str, Any]:
        """Delete the saved state (state document, bitmap) of a mirror that is not served:
        its backstore was deleted for good (``targetmirror selftest`` cleans up with it)."""
        return {"forgotten": name, "removed": self.registry.forget(name)}

    # -- copies ----------------------------------------------------------------------------
    def rejoin(self, names: list[str] | None = None, group: str | None = None,
               full: bool = False, rate: float | None = None, wait: bool = False,
               timeout: float = 3600.0) -> dict[str, Any]:
        mirrors = [self.registry.mirror(n) for n in self._names(names, group)]
        for m in mirrors:
            m.rejoin(full=full, rate=rate)
        if wait:
            wait_events([(m.name, m.rejoin_complete) for m in mirrors], timeout,
                        lambda n: MirrorError(f"rejoin of {n} did not finish within {timeout} "
                                              "s (it goes on in the background)"))
        return {"rejoin": [m.status() for m in mirrors]}

    def sync(self, name: str, rate: float | None = None, wait: bool = False,
             timeout: float = 3600.0) -> dict[str, Any]:
        m = self.registry.mirror(name)
        m.initial_sync(rate=rate)
        if wait:
            wait_events([(m.name, m.sync_complete)], timeout,
                        lambda n: MirrorError(f"initial sync of {n} did not finish within "
                                              f"{timeout} s (it goes on in the background)"))
        return {"sync": m.status()}

    def repair(self, name: str, leg: str | None = None, replace: str | None = None,
               rate: float | None = None, wait: bool = False,
               timeout: float = 3600.0) -> dict[str, Any]:
        m = self.registry.mirror(name)
        if replace is not None and not os.path.isabs(replace):
            raise MirrorError(f"--replace {replace}: expected an absolute path")
        if replace is not None:
            with self.registry.lock:
                self.registry.check_image("replacing a leg", replace)
        m.repair(leg=leg, replace=replace, rate=rate)
        if wait:
            done = m.sync_complete if m.state == "syncing" else m.rejoin_complete

            def failed() -> None:  # a copy that failed is reported at once
                progress = m.resync
                if progress is not None and progress.get("error"):
                    raise MirrorError(f"repair of {m.name} failed: {progress['error']}")

            wait_events([(m.name, done)], timeout,
                        lambda n: MirrorError(f"repair of {n} did not finish within {timeout} "
                                              "s (it goes on in the background)"),
                        check=failed)
        return {"repair": m.status()}

    def verify(self, name: str, repair: bool = False, offset: int = 0,
               length: int | None = None, rate: float | None = None,
               timeout: float | None = None) -> dict[str, Any]:
        """Compare A and B.  ``timeout`` is accepted for the client's sake and not enforced:
        a verify runs to its end (rate-limited by ``rate``)."""
        del timeout
        result: dict[str, Any] = self.registry.mirror(name).verify(
            repair=repair, offset=offset, length=length, rate=rate)
        self.verified[name] = {"mismatches": result["mismatches"],
                               "completed_wall": time.time()}
        return result

    # -- groups ----------------------------------------------------------------------------
    def group_create(self, group: str, names: list[str]) -> dict[str, Any]:
        return {"groups": self.groups.create(group, names)}

    def group_delete(self, group: str) -> dict[str, Any]:
        return {"groups": self.groups.delete(group)}
