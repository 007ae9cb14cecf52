"""``targetmirrord``: serve every ``user:mirror`` TCMU device on this host.

Runs in the foreground (systemd style), logs to stderr in a journald-friendly form, and serves
devices that exist at start-up and those created while it runs.  New and removed devices are
learned from the kernel's TCM-USER netlink multicast group; a periodic rescan of
``/sys/class/uio`` backs that up (and is all there is where netlink is unavailable), so a missed
event delays a device by at most one rescan interval, never loses it.

SIGTERM and SIGINT stop fetching new commands, finish the in-flight ones, answer them, and
close every device and image before exiting 0.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from targetmirror import __version__, express
from targetmirror.config.cfgstring import (
    MirrorSpec,
    SnapshotSpec,
    check_confined,
    image_identity,
)
from targetmirror.config.loader import parse_size
from targetmirror.daemon import logs, sdnotify
from targetmirror.daemon.control import DEFAULT_SOCKET, ControlServer, Handler
from targetmirror.daemon.device import ServedDevice, serve, volume_of
from targetmirror.daemon.groups import GroupStore
from targetmirror.daemon.runner import DeviceRunner
from targetmirror.daemon.split import split as split_mirrors
from targetmirror.daemon.watchdog import DEFAULT_THRESHOLD, Watchdog
from targetmirror.errors import ConfigError, DeviceError, MirrorError, TargetMirrorError
from targetmirror.mirror.mirror import WI_EXTENT, Mirror
from targetmirror.mirror.state import StateStore
from targetmirror.tcmu import layout as L
from targetmirror.tcmu.netlink import NetlinkEvent, TcmuNetlink
from targetmirror.tcmu.uio import UioInfo, find_devices

log = logging.getLogger("targetmirror.daemon")

DEFAULT_STATE_DIR = "/var/lib/targetmirror"


class Daemon:
    """Keeps the set of served devices equal to the set of ``user:mirror`` devices."""

    def __init__(self, *, workers: int = 2, rescan_interval: float = 5.0,
                 state_dir: str = DEFAULT_STATE_DIR, control_socket: str | None = None,
                 sysfs_root: str = "/sys", dev_root: str = "/dev",
                 configfs_root: str = "/sys/kernel/config",
                 stuck_after: float = DEFAULT_THRESHOLD,
                 metrics_address: str | None = None, dbus: bool = False,
                 image_dirs: tuple[str, ...] | None = None,
                 control_uids: tuple[int, ...] = (),
                 wi_extent: int = WI_EXTENT) -> None:
        self.workers = workers
        self.wi_extent = wi_extent
        self.control_uids = (0, *(u for u in control_uids if u != 0))
        """Peer uids the control socket answers: root, and only whom the admin added."""
        self.image_dirs = (None if image_dirs is None
                           else tuple(os.path.realpath(d) for d in image_dirs))
        """Directories every served image must resolve into (None: not confined)."""
        self.dbus = dbus
        self.metrics_address = metrics_address
        self.store = StateStore(os.path.join(state_dir, "mirrors"))
        self.groups = GroupStore(os.path.join(state_dir, "groups.json"))
        self.control_socket = control_socket
        self._timers: dict[int, tuple[float, list[str], threading.Timer]] = {}
        self._timer_ids = itertools.count(1)
        self.rescan_interval = rescan_interval
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root
        self.configfs_root = configfs_root
        self.devices: dict[str, ServedDevice] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_scan = 0.0
        self.watchdog = (Watchdog(self._runners, threshold=stuck_after) if stuck_after > 0
                         else None)

    def _runners(self) -> list[tuple[str, DeviceRunner]]:
        with self._lock:
            return [(d.info.dev_name, d.runner) for d in self.devices.values()]

    # -- device set ------------------------------------------------------------------------
    def _served_mirror(self, name: str) -> Mirror | None:
        """The mirror served under backstore ``name`` (call with ``_lock`` held)."""
        for dev in self.devices.values():
            if dev.volume == 1 and dev.mirror is not None and dev.info.dev_name == name:
                return dev.mirror
        return None

    def _served_images(self) -> dict[tuple[object, ...], str]:
        """Identity of every image a served device uses -> that device (``_lock`` held)."""
        out: dict[tuple[object, ...], str] = {}
        for dev in self.devices.values():
            paths = []
            if dev.mirror is not None and dev.volume == 1:
                paths = [dev.mirror.a.path, dev.mirror.b.path]
            elif dev.snapshot is not None:
                paths = [dev.snapshot.image.path]
            for p in paths:
                ident = image_identity(p)
                if ident is not None:
                    out[ident] = dev.info.dev_name
        return out

    def _check_image(self, key: str, path: str, exclude: str | None = None) -> None:
        """Refuse an image outside the image directories or used by another served device."""
        if self.image_dirs is not None:
            check_confined(key, path, self.image_dirs)
        owner = self._served_images().get(image_identity(path) or ("missing", path))
        if owner is not None and owner != exclude:
            raise ConfigError(f"image {key} {path} is already used by {owner}; one image "
                              "belongs to one mirror")

    def _check_images(self, spec: MirrorSpec | SnapshotSpec) -> None:
        """``serve``'s guard (``_lock`` held): confinement for every image; a mirror's legs
        must not be images another device serves (a snapshot LUN reads a split mirror's A
        on purpose)."""
        if isinstance(spec, SnapshotSpec):
            if self.image_dirs is not None:
                check_confined("snapshot", spec.image, self.image_dirs)
            return
        for key, path in (("a", spec.image_a), ("b", spec.image_b)):
            self._check_image(key, path)

    def check_config(self, config: str) -> tuple[bool, str]:
        """D-Bus CheckConfig (targetcli's ``create``): the cfgstring's syntax and images, and
        this daemon's own refusals, so a backstore it would not serve is never made."""
        from targetmirror.daemon.dbus_service import check_config

        def guard(spec: MirrorSpec | SnapshotSpec) -> None:
            with self._lock:
                self._check_images(spec)

        return check_config(config, guard)

    def attach(self, info: UioInfo) -> None:
        """Serve ``info`` unless it is served already."""
        with self._lock:
            if info.name in self.devices:
                return
            owner = volume_of(info)
            if owner is not None and self._served_mirror(owner) is None:
                # volume 2 waits for its mirror: the next rescan tries again
                log.warning("%s is volume 2 of mirror %s, which is not served (yet)",
                            info.dev_name, owner, extra={"device": info.dev_name})
                return
            try:
                dev = serve(info, workers=self.workers, store=self.store,
                            configfs_root=self.configfs_root, mirrors=self._served_mirror,
                            guard=self._check_images, wi_extent=self.wi_extent)
                self.devices[info.name] = dev
                if dev.mirror is not None and dev.volume == 1:
                    dev.mirror.resume()
            except TargetMirrorError as exc:
                log.error("cannot open %s: %s", info.dev_path, exc,
                          extra={"device": info.dev_name})

    def detach(self, name: str) -> None:
        """Stop serving the device whose UIO name is ``name`` (and a mirror's volume 2s
        before the mirror itself: they share its Mirror)."""
        with self._lock:
            dev = self.devices.get(name)
            peers = [] if dev is None or dev.volume != 1 or dev.mirror is None else [
                n for n, d in self.devices.items() if d.volume == 2 and d.mirror is dev.mirror]
        for peer in peers:
            self.detach(peer)
        with self._lock:
            dev = self.devices.pop(name, None)
        if dev is not None:
            dev.close()
            log.info("stopped serving %s", dev.info.dev_name, extra={"device": dev.info.dev_name})

    def rescan(self) -> None:
        """Attach new devices; reap ring loops whose device went away."""
        try:
            found = {i.name: i for i in find_devices("mirror", self.sysfs_root, self.dev_root)}
        except OSError as exc:
            log.warning("scanning UIO devices failed: %s", exc)
            return
        for name, dev in list(self.devices.items()):
            if name not in found or not dev.runner.alive:
                self.detach(name)
        # mirrors before their volume 2s
        for info in sorted(found.values(), key=lambda i: volume_of(i) is not None):
            self.attach(info)

    # -- netlink -----------------------------------------------------------------------------
    def _on_event(self, nl: TcmuNetlink, event: NetlinkEvent) -> None:
        status = 0
        if event.cmd == L.CMD_ADDED_DEVICE:
            self.rescan()
            if event.device and event.device.split("/")[3:4] == ["mirror"] and \
                    event.device not in self.devices:
                status = -19  # -ENODEV: tell a waiting kernel we could not take it
        elif event.cmd == L.CMD_REMOVED_DEVICE:
            if event.device:
                self.detach(event.device)
        elif event.cmd == L.CMD_RECONFIG_DEVICE:
            status = self._reconfig(event)
        else:
            return
        if event.device and event.device.split("/")[3:4] == ["mirror"]:
            try:
                nl.reply(event, status)
            except (TargetMirrorError, OSError) as exc:
                # The kernel only accepts replies it waits for (nl_reply_supported >= 0).
                log.debug("netlink reply not taken: %s", exc)

    def _reconfig(self, event: NetlinkEvent) -> int:
        """Answer a RECONFIG event: 0 when it changes nothing we serve, else -EOPNOTSUPP.

        ``targetcli restoreconfig`` writes ``dev_config``, ``dev_size`` and
        ``emulate_write_cache`` back to a backstore it has just enabled; once any process has
        set the TCM-USER netlink features (tcmu-runner does), the kernel waits for our answer
        to each of those writes, and refusing them all would fail the restore.  Re-stating the
        cfgstring or size the device already has changes nothing, so it is accepted; a new
        cfgstring or size (a live image swap or resize) is refused, as is anything for a
        device we do not serve.  ``emulate_write_cache`` is advisory for a user backstore (the
        initiator sees our MODE SENSE caching page, which MODE SELECT changes), so it is
        accepted and logged.
        """
        with self._lock:
            dev = self.devices.get(event.device)
        mirror = dev.mirror if dev is not None else None
        if dev is None or mirror is None:
            log.warning("reconfiguration of %s, which is not served: refusing it", event.device)
            return -95  # -EOPNOTSUPP
        same = True
        if event.dev_cfg is not None:
            cfg = event.dev_cfg
            same = same and dev.info.cfgstring in (cfg, cfg.removeprefix("mirror/"))
        if event.dev_size is not None:
            same = same and event.dev_size == mirror.size
        if not same:
            log.warning("%s: changing dev_config or dev_size of a served mirror is not "
                        "supported; refusing it (delete and re-create the backstore)",
                        dev.info.dev_name, extra={"device": dev.info.dev_name})
            return -95
        if event.writecache is not None:
            log.info("%s: emulate_write_cache=%d noted (the caching mode page is ours)",
                     dev.info.dev_name, event.writecache, extra={"device": dev.info.dev_name})
        return 0

    # -- control API -----------------------------------------------------------------------------
    def _by_name(self, name: str) -> ServedDevice:
        with self._lock:
            for dev in self.devices.values():
                if dev.info.dev_name == name:
                    return dev
        raise MirrorError(f"no mirror named {name!r} is served by this daemon")

    def _names(self, req: dict[str, Any]) -> list[str]:
        names = list(req.get("names") or [])
        group = req.get("group")
        if group:
            names += self.groups.members(str(group))
        if not names or not all(isinstance(n, str) for n in names):
            raise MirrorError("name at least one mirror or a group")
        return names

    def op_status(self, req: dict[str, Any]) -> dict[str, Any]:
        names = req.get("names") or []
        with self._lock:
            devs = list(self.devices.values())
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
                st = {"name": dev.info.dev_name, "state": "not-ready", "reason": dev.reason}
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
        scheduled = [{"id": i, "at": at, "names": n} for i, (at, n, _) in self._timers.items()]
        return {"version": __version__, "mirrors": out, "scheduled": scheduled,
                "groups": self.groups.all()}

    def op_split(self, req: dict[str, Any]) -> dict[str, Any]:
        names = self._names(req)
        at = req.get("at")
        if at is not None:
            return self._schedule(float(at), names)
        devs = [self._by_name(n) for n in names]
        for d in devs:
            if d.volume == 2:
                raise MirrorError(f"{d.info.dev_name} is volume 2 of mirror "
                                  f"{d.mirror.name if d.mirror else '?'}; split the mirror")
        result = split_mirrors(devs, self._volume2s(devs), one_way=bool(req.get("one_way")))
        if req.get("wait", True):
            timeout = float(req.get("timeout", 300))
            deadline = time.monotonic() + timeout
            for n in names:
                m = self._by_name(n).mirror
                assert m is not None
                if not m.split_complete.wait(max(0.0, deadline - time.monotonic())):
                    raise MirrorError(f"split of {n} did not complete within {timeout} s "
                                      "(pre-split writes still in flight)")
            instant = {r["name"]: r for r in result}
            result = []
            for n in names:
                m2 = self._by_name(n).mirror
                assert m2 is not None
                st = m2.status()
                st["ring_head"] = instant[n]["ring_head"]
                st["locks_held_seconds"] = instant[n]["locks_held_seconds"]
                result.append(st)
        return {"split": result}

    def _volume2s(self, devs: list[ServedDevice]) -> dict[str, list[ServedDevice]]:
        """For each mirror being split: the volume-2 devices that share it (their rings
        take part in the instant)."""
        with self._lock:
            return {d.info.dev_name: [p for p in self.devices.values()
                                      if p.volume == 2 and p.mirror is d.mirror]
                    for d in devs if d.mirror is not None}

    def _schedule(self, at: float, names: list[str]) -> dict[str, Any]:
        for n in names:
            dev = self._by_name(n)
            if dev.mirror is None:
                raise MirrorError(f"mirror {n} is not being served: {dev.reason}")
            dev.mirror.check_can_split()
        delay = at - time.time()
        if delay < 0:
            raise MirrorError(f"the split time {time.ctime(at)} is in the past")
        timer_id = next(self._timer_ids)

        def fire() -> None:
            self._timers.pop(timer_id, None)
            try:
                devs = [self._by_name(n) for n in names]
                done = split_mirrors(devs, self._volume2s(devs))
                log.info("scheduled split %d of %s taken (requested for %.3f, late by %.3f s)",
                         timer_id, ", ".join(names), at, time.time() - at)
                del done
            except TargetMirrorError as exc:
                log.error("scheduled split %d of %s failed: %s", timer_id, ", ".join(names), exc)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        self._timers[timer_id] = (at, names, timer)
        timer.start()
        return {"scheduled": {"id": timer_id, "at": at, "names": names}}

    def _mirror(self, name: str) -> Mirror:
        dev = self._by_name(name)
        if dev.mirror is None:
            raise MirrorError(f"{name} is not a served mirror"
                              + (f": {dev.reason}" if dev.reason else ""))
        return dev.mirror

    def op_rejoin(self, req: dict[str, Any]) -> dict[str, Any]:
        names = self._names(req)
        mirrors = [self._mirror(n) for n in names]
        rate = req.get("rate")
        for m in mirrors:
            m.rejoin(full=bool(req.get("full", False)),
                     rate=None if rate is None else float(rate))
        if req.get("wait", False):
            timeout = float(req.get("timeout", 3600))
            deadline = time.monotonic() + timeout
            for m in mirrors:
                if not m.rejoin_complete.wait(max(0.0, deadline - time.monotonic())):
                    raise MirrorError(f"rejoin of {m.name} did not finish within {timeout} s "
                                      "(it goes on in the background)")
        return {"rejoin": [m.status() for m in mirrors]}

    def op_sync(self, req: dict[str, Any]) -> dict[str, Any]:
        m = self._mirror(str(req["name"]))
        rate = req.get("rate")
        m.initial_sync(rate=None if rate is None else float(rate))
        if req.get("wait", False):
            timeout = float(req.get("timeout", 3600))
            if not m.sync_complete.wait(timeout):
                raise MirrorError(f"initial sync of {m.name} did not finish within {timeout} s "
                                  "(it goes on in the background)")
        return {"sync": m.status()}

    def op_repair(self, req: dict[str, Any]) -> dict[str, Any]:
        m = self._mirror(str(req["name"]))
        rate = req.get("rate")
        leg = req.get("leg")
        replace = req.get("replace")
        if replace is not None and not os.path.isabs(str(replace)):
            raise MirrorError(f"--replace {replace}: expected an absolute path")
        if replace is not None:
            with self._lock:
                self._check_image("replacing a leg", str(replace))
        m.repair(leg=None if leg is None else str(leg),
                 replace=None if replace is None else str(replace),
                 rate=None if rate is None else float(rate))
        if req.get("wait", False):
            timeout = float(req.get("timeout", 3600))
            done = m.sync_complete if m.state == "syncing" else m.rejoin_complete
            deadline = time.monotonic() + timeout
            while not done.wait(0.2):  # also watching for a copy that failed
                progress = m.resync
                if progress is not None and progress.get("error"):
                    raise MirrorError(f"repair of {m.name} failed: {progress['error']}")
                if time.monotonic() > deadline:
                    raise MirrorError(f"repair of {m.name} did not finish within {timeout} s "
                                      "(it goes on in the background)")
        return {"repair": m.status()}

    def op_verify(self, req: dict[str, Any]) -> dict[str, Any]:
        m = self._mirror(str(req["name"]))
        rate = req.get("rate")
        length = req.get("length")
        return m.verify(repair=bool(req.get("repair", False)), offset=int(req.get("offset", 0)),
                        length=None if length is None else int(length),
                        rate=None if rate is None else float(rate))

    def op_cancel(self, req: dict[str, Any]) -> dict[str, Any]:
        entry = self._timers.pop(int(req["id"]), None)
        if entry is None:
            raise MirrorError(f"no scheduled split {req['id']}")
        entry[2].cancel()
        return {"cancelled": int(req["id"])}

    def op_group_create(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"groups": self.groups.create(str(req["group"]), list(req["names"]))}

    def op_group_delete(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"groups": self.groups.delete(str(req["group"]))}

    def handlers(self) -> dict[str, Handler]:
        return {"status": self.op_status, "split": self.op_split, "cancel": self.op_cancel,
                "rejoin": self.op_rejoin, "verify": self.op_verify, "sync": self.op_sync,
                "repair": self.op_repair,
                "group-create": self.op_group_create, "group-delete": self.op_group_delete,
                "ping": lambda req: {"version": __version__}}

    # -- main loop -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask :meth:`run` to return (signal-safe)."""
        self._stop.set()

    def run(self) -> int:
        """Serve until stopped; return the exit status."""
        metrics = None
        if self.metrics_address:
            from targetmirror.daemon.metrics import MetricsServer

            # bound first: a taken port fails the start before any device is touched
            metrics = MetricsServer(self, self.metrics_address)
        nl: TcmuNetlink | None
        try:
            nl = TcmuNetlink.open()
        except (DeviceError, OSError) as exc:
            log.warning("no netlink events (%s); relying on rescans every %.0f s", exc,
                        self.rescan_interval)
            nl = None
        self.rescan()
        control = None
        if self.control_socket:
            control = ControlServer(self.control_socket, self.handlers(),
                                    allowed_uids=self.control_uids)
            control.start()
        if self.watchdog is not None:
            self.watchdog.start()
        if metrics is not None:
            metrics.start()
        bus = None
        if self.dbus:
            from targetmirror.daemon.dbus_service import HandlerService

            bus = HandlerService(check=self.check_config)
            if not bus.start():
                bus = None
        log.info("targetmirrord %s serving %d device(s); express lane %s", __version__,
                 len(self.devices),
                 (f"on (wait loop {'on' if express.loop is not None else 'off'}, io_uring "
                  f"{'built' if express.HAVE_URING else 'not built'})")
                 if express.available() else f"off: {express.WHY_NOT}")
        sdnotify.notify(f"READY=1\nSTATUS=serving {len(self.devices)} device(s)")
        try:
            while not self._stop.is_set():
                if nl is None:
                    self._stop.wait(self.rescan_interval)
                    self.rescan()
                    continue
                try:
                    events = nl.receive(timeout=min(self.rescan_interval, 1.0))
                except (DeviceError, OSError) as exc:
                    log.warning("netlink failed (%s); falling back to rescans", exc)
                    nl.close()
                    nl = None
                    continue
                for event in events:
                    self._on_event(nl, event)
                self._periodic()
        finally:
            sdnotify.notify("STOPPING=1")
            if self.watchdog is not None:
                self.watchdog.stop()
            if control is not None:
                control.close()
            if metrics is not None:
                metrics.close()
            if bus is not None:
                bus.close()
            for _, _, timer in self._timers.values():
                timer.cancel()
            # every ring stops fetching at once and drains in parallel; detach then waits
            for dev in list(self.devices.values()):
                dev.runner.stop()
            for name in list(self.devices):
                self.detach(name)
            if nl is not None:
                nl.close()
        log.info("targetmirrord stopped")
        return 0

    def _periodic(self) -> None:
        now = time.monotonic()
        if now - self._last_scan >= self.rescan_interval:
            self._last_scan = now
            self.rescan()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also the source of the man page)."""
    p = argparse.ArgumentParser(
        prog="targetmirrord", description="Serve user:mirror TCMU devices (foreground).",
        epilog="With a configuration file (--config, $TARGETMIRROR_CONFIG, or "
               "/etc/targetmirror/targetmirror.yaml when it exists) the daemon applies it "
               "before serving, like 'targetmirror apply'; a file that is invalid or cannot be "
               "applied is logged as an error and the daemon serves what exists. Options given "
               "here override the file's daemon settings. Exit status: 0 after SIGTERM/SIGINT, "
               "1 on a fatal error, 2 on a usage error.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--config", default=None, help="YAML configuration to apply at start")
    p.add_argument("--workers", type=int, default=2,
                   help="I/O worker threads per device; 0 runs commands on the ring thread")
    p.add_argument("--log-level", default=None,
                   choices=["debug", "info", "warning", "error"],
                   help="default: daemon.log_level of the file, else info")
    p.add_argument("--rescan-interval", type=float, default=5.0,
                   help="seconds between UIO rescans (default %(default)s)")
    p.add_argument("--state-dir", default=None,
                   help=f"durable mirror state (default: the file's, else {DEFAULT_STATE_DIR})")
    p.add_argument("--control-socket", default=None,
                   help=f"control API socket (default: the file's, else {DEFAULT_SOCKET})")
    p.add_argument("--stuck-after", type=float, default=DEFAULT_THRESHOLD, metavar="SECONDS",
                   help="log a command still unanswered after this long, once (0: never; "
                   "default %(default)s)")
    p.add_argument("--metrics-address", default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: the "
                   "file's daemon.metrics_address, else off)")
    p.add_argument("--write-intent-extent", default=None, metavar="SIZE",
                   help="while mirrored, a write marks this much around it in the bitmap "
                   "(a power of two, 4K-1G; default: the file's daemon.write_intent_extent, "
                   "else 4M)")
    p.add_argument("--control-allow-uid", type=int, action="append", default=None,
                   metavar="UID", help="also accept control connections from this user id "
                   "(repeatable; default: root only; the socket stays mode 0600, so that user "
                   "needs a way to it, e.g. an ACL)")
    p.add_argument("--image-dir", action="append", default=None, metavar="DIR",
                   help="serve only images that resolve into DIR (repeatable; default: the "
                   "file's image_dirs, else images are not confined)")
    p.add_argument("--no-express", action="store_true",
                   help="serve every command from Python: the compiled express lane off (to "
                   "compare, or to rule it out; env TARGETMIRROR_EXPRESS=0 does the same)")
    p.add_argument("--no-dbus", action="store_true",
                   help="do not offer user:mirror to targetcli on the D-Bus system bus")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``targetmirrord``."""
    from targetmirror.daemon import restore

    p = build_parser()
    args = p.parse_args(argv)
    config, problem = restore.load(args.config)
    d = config.daemon if config is not None else None
    logs.setup(args.log_level or (d.log_level if d else "info"))
    if problem:
        log.error("%s", problem)
    metrics_address = args.metrics_address or (d.metrics_address if d else None)
    if metrics_address:
        from targetmirror.daemon.metrics import parse_address

        try:
            parse_address(metrics_address)
        except TargetMirrorError as exc:
            p.error(str(exc))
    if args.workers < 0:
        p.error("--workers must be 0 or more")
    if args.stuck_after < 0:
        p.error("--stuck-after must be 0 or more")
    if args.no_express:
        express.disable("--no-express")
    wi_extent = d.write_intent_extent if d else WI_EXTENT
    if args.write_intent_extent is not None:
        ext = parse_size(args.write_intent_extent)
        if ext is None or ext < 4096 or ext > 1 << 30 or ext & (ext - 1):
            p.error("--write-intent-extent: expected a power of two from 4K to 1G (e.g. 4M), "
                    f"got {args.write_intent_extent!r}")
        wi_extent = ext
    daemon = Daemon(workers=args.workers, rescan_interval=args.rescan_interval,
                    state_dir=args.state_dir or (d.state_dir if d else DEFAULT_STATE_DIR),
                    control_socket=args.control_socket or (d.control_socket if d
                                                           else DEFAULT_SOCKET),
                    stuck_after=args.stuck_after, metrics_address=metrics_address,
                    dbus=not args.no_dbus, wi_extent=wi_extent,
                    control_uids=tuple(args.control_allow_uid or ()),
                    image_dirs=(tuple(args.image_dir) if args.image_dir
                                else config.image_dirs if config is not None else None))
    if daemon.image_dirs is None:
        log.warning("images are not confined: give --image-dir or a configuration file with "
                    "image_dirs (see docs/security.md)")
    if config is not None:
        restore.apply_at_start(config, daemon.groups, args.state_dir)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; finishing in-flight commands", signal.Signals(signum).name)
        daemon.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return daemon.run()
    except TargetMirrorError as exc:
        log.error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
