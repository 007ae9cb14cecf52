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
import signal
import sys
import threading
import time
from types import FrameType

from targetmirror import __version__
from targetmirror.daemon import logs
from targetmirror.daemon.device import ServedDevice, serve
from targetmirror.errors import DeviceError, TargetMirrorError
from targetmirror.tcmu import layout as L
from targetmirror.tcmu.netlink import NetlinkEvent, TcmuNetlink
from targetmirror.tcmu.uio import UioInfo, find_devices

log = logging.getLogger("targetmirror.daemon")


class Daemon:
    """Keeps the set of served devices equal to the set of ``user:mirror`` devices."""

    def __init__(self, *, workers: int = 2, rescan_interval: float = 5.0,
                 sysfs_root: str = "/sys", dev_root: str = "/dev",
                 configfs_root: str = "/sys/kernel/config") -> None:
        self.workers = workers
        self.rescan_interval = rescan_interval
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root
        self.configfs_root = configfs_root
        self.devices: dict[str, ServedDevice] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_scan = 0.0

    # -- device set ------------------------------------------------------------------------
    def attach(self, info: UioInfo) -> None:
        """Serve ``info`` unless it is served already."""
        with self._lock:
            if info.name in self.devices:
                return
            try:
                self.devices[info.name] = serve(info, workers=self.workers,
                                                configfs_root=self.configfs_root)
            except TargetMirrorError as exc:
                log.error("cannot open %s: %s", info.dev_path, exc,
                          extra={"device": info.dev_name})

    def detach(self, name: str) -> None:
        """Stop serving the device whose UIO name is ``name``."""
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
        for info in found.values():
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
            log.warning("reconfiguration of %s is not supported yet; refusing it", event.device)
            status = -95  # -EOPNOTSUPP
        else:
            return
        if event.device and event.device.split("/")[3:4] == ["mirror"]:
            try:
                nl.reply(event, status)
            except (TargetMirrorError, OSError) as exc:
                # The kernel only accepts replies it waits for (nl_reply_supported >= 0).
                log.debug("netlink reply not taken: %s", exc)

    # -- main loop -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask :meth:`run` to return (signal-safe)."""
        self._stop.set()

    def run(self) -> int:
        """Serve until stopped; return the exit status."""
        nl: TcmuNetlink | None
        try:
            nl = TcmuNetlink.open()
        except (DeviceError, OSError) as exc:
            log.warning("no netlink events (%s); relying on rescans every %.0f s", exc,
                        self.rescan_interval)
            nl = None
        self.rescan()
        log.info("targetmirrord %s serving %d device(s)", __version__, len(self.devices))
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``targetmirrord``."""
    p = argparse.ArgumentParser(prog="targetmirrord",
                                description="Serve user:mirror TCMU devices (foreground).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--workers", type=int, default=2,
                   help="I/O worker threads per device; 0 runs commands on the ring thread")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--rescan-interval", type=float, default=5.0,
                   help="seconds between UIO rescans (default %(default)s)")
    args = p.parse_args(argv)
    logs.setup(args.log_level)
    if args.workers < 0:
        p.error("--workers must be 0 or more")
    daemon = Daemon(workers=args.workers, rescan_interval=args.rescan_interval)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; finishing in-flight commands", signal.Signals(signum).name)
        daemon.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main())
