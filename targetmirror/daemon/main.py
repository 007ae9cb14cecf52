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
import logging
import math
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from targetmirror import __version__, express
from targetmirror.config import deadlines as dl
from targetmirror.config.loader import Config
from targetmirror.daemon import logs, restore, sdnotify
from targetmirror.daemon.control import ControlServer, Handler
from targetmirror.daemon.device import ServedDevice
from targetmirror.daemon.groups import GroupStore
from targetmirror.daemon.ops import ControlOps
from targetmirror.daemon.registry import DeviceRegistry
from targetmirror.daemon.restore import Loaded
from targetmirror.daemon.watchdog import DEFAULT_THRESHOLD, Watchdog
from targetmirror.errors import DeviceError, TargetMirrorError
from targetmirror.mirror.mirror import WI_EXTENT
from targetmirror.mirror.state import StateStore
from targetmirror.protocol import DEFAULT_SOCKET
from targetmirror.tcmu import layout as L
from targetmirror.tcmu.netlink import NetlinkEvent, TcmuNetlink
from targetmirror.tcmu.uio import UioInfo
from targetmirror.units import parse_size

log = logging.getLogger("targetmirror.daemon")

DEFAULT_STATE_DIR = "/var/lib/targetmirror"


class Daemon:
    """Keeps the set of served devices equal to the set of ``user:mirror`` devices: the main
    loop, kernel events (netlink) and the faces (control socket, metrics, D-Bus).

    The parts live in their own modules: the device set and the image guard in
    :class:`~targetmirror.daemon.registry.DeviceRegistry`, the control operations in
    :class:`~targetmirror.daemon.ops.ControlOps` (with the split scheduler).
    """

    def __init__(self, *, workers: int = 2, rescan_interval: float = 5.0,
                 state_dir: str = DEFAULT_STATE_DIR, control_socket: str | None = None,
                 sysfs_root: str = "/sys", dev_root: str = "/dev",
                 configfs_root: str = "/sys/kernel/config",
                 stuck_after: float = DEFAULT_THRESHOLD,
                 metrics_address: str | None = None, dbus: bool = False,
                 image_dirs: tuple[str, ...] | None = None,
                 control_uids: tuple[int, ...] = (),
                 wi_extent: int = WI_EXTENT, config_path: str | None = None,
                 state_dir_override: str | None = None,
                 image_dirs_fixed: bool = False,
                 deadlines: dict[str, float | int | None] | None = None) -> None:
        self.config_path = config_path
        self.flag_deadlines = dict(deadlines or {})
        """Leg deadlines targetmirrord's flags set: they replace the file's daemon-wide
        ``deadlines`` (a mirror's own entry in the file still wins for it)."""
        """The YAML file read at start and on SIGHUP (None: none)."""
        self.loaded: Loaded | None = None
        """The configuration in force (its valid part is what was applied)."""
        self.last_reload: dict[str, Any] | None = None
        self._state_dir_override = state_dir_override
        self._image_dirs_fixed = image_dirs_fixed
        """--image-dir was given: the file's image_dirs do not replace it on reload."""
        self._reload = threading.Event()
        self.control_uids = (0, *(u for u in control_uids if u != 0))
        """Peer uids the control socket answers: root, and only whom the admin added."""
        self.dbus = dbus
        self.metrics_address = metrics_address
        self.control_socket = control_socket
        self.rescan_interval = rescan_interval
        self.registry = DeviceRegistry(
            StateStore(os.path.join(state_dir, "mirrors")), workers=workers,
            image_dirs=image_dirs, sysfs_root=sysfs_root, dev_root=dev_root,
            configfs_root=configfs_root, wi_extent=wi_extent, deadlines=self.deadlines_for)
        self.groups = GroupStore(os.path.join(state_dir, "groups.json"))
        # always running: it also sends systemd's WATCHDOG=1 (--stuck-after 0 only turns the
        # stuck-command reports off)
        self.watchdog = Watchdog(self.registry.runners,
                                 threshold=stuck_after if stuck_after > 0 else math.inf)
        self.ops = ControlOps(self.registry, self.groups, self.watchdog,
                              config_status=self._config_status,
                              schedules_path=os.path.join(state_dir, "schedules.json"))
        self._stop = threading.Event()
        self._last_scan = 0.0

    # -- the registry's, for the callers that hold a Daemon ------------------------------------
    @property
    def devices(self) -> dict[str, ServedDevice]:
        return self.registry.devices

    @property
    def image_dirs(self) -> tuple[str, ...] | None:
        return self.registry.image_dirs

    @image_dirs.setter
    def image_dirs(self, dirs: tuple[str, ...] | None) -> None:
        self.registry.image_dirs = dirs

    def attach(self, info: UioInfo) -> None:
        self.registry.attach(info)

    def detach(self, name: str) -> None:
        self.registry.detach(name)

    def rescan(self) -> None:
        self.registry.rescan()

    def check_config(self, config: str) -> tuple[bool, str]:
        return self.registry.check_config(config)

    def handlers(self) -> dict[str, Handler]:
        return self.ops.handlers()

    # -- the configuration file --------------------------------------------------------------
    def deadlines_for(self, name: str) -> dict[str, float | int | None]:
        """The leg deadlines mirror ``name`` is opened with: the file's daemon-wide ones, the
        flags' over them, the mirror's own entry over both (only the keys someone set; the
        mirror's defaults fill in the rest)."""
        config = self.loaded.config if self.loaded is not None else None
        if config is None:
            return dict(self.flag_deadlines)
        return config.deadlines_of(name, self.flag_deadlines)

    def start_with(self, loaded: Loaded) -> None:
        """Take the file read at start: refuse its invalid mirrors, apply its valid part
        (in full when the file is valid; only what is new when it has problems)."""
        self.loaded = loaded
        self.registry.refused = loaded.refused  # before the first rescan: nothing served yet
        config = loaded.config
        if config is not None:
            restore.apply_config(config, self.groups, self._state_dir_override,
                                 only_new=not loaded.ok)

    def request_reload(self) -> None:
        """Ask the main loop to reload the file (signal-safe: SIGHUP)."""
        self._reload.set()

    def reload(self) -> bool:
        """SIGHUP / ``systemctl reload``: read and check the file; apply a valid one in full
        and lift every refusal, keep the running configuration if it has a problem."""
        if self.config_path is None:
            log.warning("reload asked for, but targetmirrord runs without a configuration "
                        "file (--config)")
            return False
        sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            loaded = restore.read(self.config_path)
            if not loaded.ok or loaded.config is None:
                restore.log_problems(loaded, "keeping the running configuration")
                self.last_reload = {"wall": loaded.wall, "result": "kept the running "
                                    "configuration", "problems": list(loaded.problems)}
                return False
            config = loaded.config
            self._take_settings(config)
            before = {d.info.dev_name: self.deadlines_for(d.info.dev_name)
                      for d in self.registry.served() if d.mirror is not None}
            applied = restore.apply_config(config, self.groups, self._state_dir_override)
            self.loaded = loaded
            for name, old in before.items():
                if self.deadlines_for(name) != old:
                    log.warning("%s: its deadlines changed in %s (now %s): they take effect "
                                "when targetmirrord restarts", name, config.path,
                                dl.describe(self.deadlines_for(name)),
                                extra={"device": name})
            self.registry.refuse({})
            self.last_reload = {"wall": loaded.wall,
                                "result": "applied" if applied else "not applied (see the log)",
                                "problems": []}
            log.info("configuration %s reloaded: %s", self.config_path,
                     self.last_reload["result"])
            return applied
        finally:
            sdnotify.notify(f"READY=1\nSTATUS=serving {len(self.devices)} device(s)")

    def _take_settings(self, config: Config) -> None:
        """The daemon settings a reload can change (log level, image directories); the
        others need a restart, which is said."""
        logging.getLogger().setLevel(config.daemon.log_level.upper())
        if not self._image_dirs_fixed and self.registry.image_dirs != tuple(
                os.path.realpath(d) for d in config.image_dirs):
            log.info("image directories now %s", ", ".join(config.image_dirs) or "none")
            self.registry.image_dirs = config.image_dirs
        old = self.loaded.config if self.loaded is not None else None
        if old is not None:
            for key in ("control_socket", "state_dir", "metrics_address",
                        "write_intent_extent"):
                if getattr(old.daemon, key) != getattr(config.daemon, key):
                    log.warning("daemon.%s changed in %s: it takes effect when targetmirrord "
                                "restarts", key, config.path)

    def _config_status(self) -> dict[str, Any] | None:
        if self.loaded is None:
            return None
        st = self.loaded.status()
        st["last_reload"] = self.last_reload
        return st

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
        with self.registry.lock:
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
            metrics = MetricsServer(self.ops, self.metrics_address)
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
        self.watchdog.start()
        self.ops.scheduler.start()  # after the first rescan: a due split finds its mirrors
        if metrics is not None:
            metrics.start()
        bus = None
        if self.dbus:
            from targetmirror.daemon.dbus_service import HandlerService

            bus = HandlerService(check=self.registry.check_config)
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
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                if nl is None:
                    self._stop.wait(min(self.rescan_interval, 1.0))
                    self._periodic()
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
            self.watchdog.stop()
            if control is not None:
                control.close()
            if metrics is not None:
                metrics.close()
            if bus is not None:
                bus.close()
            self.ops.scheduler.stop()
            self.registry.close()
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
               "before serving, like 'targetmirror apply'. It never exits because of the file: "
               "every problem is logged, the valid part is applied (only what is new, when "
               "the file has problems), and a mirror whose entry is invalid is served NOT "
               "READY with reason 'config'. SIGHUP (systemctl reload) reads the file again: "
               "a valid file is applied and the refusals lifted, one with problems is logged "
               "and the running configuration kept. Options given here override the file's "
               "daemon settings. Exit status: 0 after SIGTERM/SIGINT, 1 on a fatal error, 2 on "
               "a usage error.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--config", default=None,
                   help="YAML configuration to apply at start and on SIGHUP")
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
    limits = p.add_argument_group(
        "leg deadlines", "How long a leg may take before it is failed (docs/operations.md, "
        "'Slow legs and deadlines'). They replace the file's daemon-wide deadlines; a "
        "mirror's own deadlines in the file still win for that mirror. A slow leg is reported "
        "(status, metrics), never failed: only one that stops answering is.")
    limits.add_argument("--leg-timeout", default=None, metavar="SECONDS",
                        help="a data read or write unanswered this long fails its leg, plus "
                        "deadlines.per_mib per MiB beyond the first ('never': no deadline; "
                        "default: the file's deadlines.read/write, else 20)")
    limits.add_argument("--flush-timeout", default=None, metavar="SECONDS",
                        help="the same for a flush (fdatasync) (default: the file's "
                        "deadlines.flush, else 60)")
    limits.add_argument("--discard-timeout", default=None, metavar="SECONDS",
                        help="a discard or zeroing piece slower than this is logged and "
                        "counted as slow; it never fails a leg (default: the file's "
                        "deadlines.discard, else 30)")
    limits.add_argument("--discard-piece", default=None, metavar="SIZE",
                        help="discards and zeroing go to a leg in calls of at most SIZE, each "
                        "with its own deadline (4K-1G, a multiple of 4K; default: the file's "
                        "deadlines.piece, else 64M)")
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
    p = build_parser()
    args = p.parse_args(argv)
    path = restore.config_path(args.config)
    loaded = restore.read(path) if path is not None else None
    config = loaded.config if loaded is not None else None
    d = config.daemon if config is not None else None
    logs.setup(args.log_level or (d.log_level if d else "info"))
    if loaded is not None:
        # never an exit because of the file: every problem is logged, the valid part served
        restore.log_problems(loaded, "serving its valid part and what exists")
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
    try:
        flag_deadlines = dl.from_flags(vars(args))
        dl.build(dl.merged(dict(config.deadlines) if config is not None else {},
                           flag_deadlines))
    except TargetMirrorError as exc:
        p.error(str(exc))
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
                                else config.image_dirs if config is not None else None),
                    config_path=path, state_dir_override=args.state_dir,
                    image_dirs_fixed=bool(args.image_dir), deadlines=flag_deadlines)
    if daemon.image_dirs is None:
        log.warning("images are not confined: give --image-dir or a configuration file with "
                    "image_dirs (see docs/security.md)")
    if loaded is not None:
        daemon.start_with(loaded)
    own = [m.name for m in config.mirrors if m.deadlines] if config is not None else []
    log.info("leg deadlines: %s, the defaults for the rest%s",
             dl.describe(daemon.deadlines_for("")),
             f"; mirrors with their own: {', '.join(own)}" if own else "")

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; finishing in-flight commands", signal.Signals(signum).name)
        daemon.stop()

    def on_hangup(_signum: int, _frame: FrameType | None) -> None:
        log.info("received SIGHUP; reloading %s", daemon.config_path or "(no file)")
        daemon.request_reload()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        return daemon.run()
    except TargetMirrorError as exc:
        log.error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
