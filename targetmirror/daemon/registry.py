"""The set of devices ``targetmirrord`` serves, and the guard every image passes first.

:class:`DeviceRegistry` keeps the served devices equal to the ``user:mirror`` devices the kernel
has (attach, detach, rescan), refuses an image outside the image directories or used by
another served device, and remembers which backstores the configuration file refuses (their
entry in the file is invalid): those are served NOT READY with reason ``config`` until a
corrected file is loaded.  The control operations (:mod:`targetmirror.daemon.ops`), the metrics
collector and the D-Bus face read devices through it; none of them reaches into the main loop.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

from targetmirror.config.cfgstring import (
    MirrorSpec,
    SnapshotSpec,
    check_confined,
    image_identity,
)
from targetmirror.daemon.device import ServedDevice, serve, volume_of
from targetmirror.daemon.runner import DeviceRunner
from targetmirror.errors import ConfigError, MirrorError, TargetMirrorError
from targetmirror.mirror.mirror import WI_EXTENT, Mirror
from targetmirror.mirror.state import StateStore
from targetmirror.tcmu.uio import UioInfo, find_devices

log = logging.getLogger("targetmirror.daemon")


class DeviceRegistry:
    """Served devices by UIO name, under :attr:`lock`."""

    def __init__(self, store: StateStore, *, workers: int = 2,
                 image_dirs: tuple[str, ...] | None = None,
                 sysfs_root: str = "/sys", dev_root: str = "/dev",
                 configfs_root: str = "/sys/kernel/config",
                 wi_extent: int = WI_EXTENT) -> None:
        self.store = store
        self.workers = workers
        self.wi_extent = wi_extent
        self.image_dirs = image_dirs
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root
        self.configfs_root = configfs_root
        self.devices: dict[str, ServedDevice] = {}
        self.lock = threading.Lock()
        self._closing: set[str] = set()
        """Devices being closed (their mirror saves its state last: not forgettable yet)."""
        self.refused: dict[str, str] = {}
        """Backstore name -> why the configuration file refuses it (served NOT READY)."""

    @property
    def image_dirs(self) -> tuple[str, ...] | None:
        """Directories every served image must resolve into (None: not confined)."""
        return self._image_dirs

    @image_dirs.setter
    def image_dirs(self, dirs: tuple[str, ...] | None) -> None:
        self._image_dirs = None if dirs is None else tuple(os.path.realpath(d) for d in dirs)

    def runners(self) -> list[tuple[str, DeviceRunner]]:
        with self.lock:
            return [(d.info.dev_name, d.runner) for d in self.devices.values()]

    def served(self) -> list[ServedDevice]:
        """A snapshot of the served devices."""
        with self.lock:
            return list(self.devices.values())

    # -- lookups ---------------------------------------------------------------------------
    def served_mirror(self, name: str) -> Mirror | None:
        """The mirror served under backstore ``name`` (call with ``lock`` held)."""
        for dev in self.devices.values():
            if dev.volume == 1 and dev.mirror is not None and dev.info.dev_name == name:
                return dev.mirror
        return None

    def by_name(self, name: str) -> ServedDevice:
        with self.lock:
            for dev in self.devices.values():
                if dev.info.dev_name == name:
                    return dev
        raise MirrorError(f"no mirror named {name!r} is served by this daemon")

    def mirror(self, name: str) -> Mirror:
        dev = self.by_name(name)
        if dev.mirror is None:
            raise MirrorError(f"{name} is not a served mirror"
                              + (f": {dev.reason}" if dev.reason else ""))
        return dev.mirror

    def volume2s(self, devs: list[ServedDevice]) -> dict[str, list[ServedDevice]]:
        """For each mirror being split: the volume-2 devices that share it (their rings
        take part in the instant)."""
        with self.lock:
            return {d.info.dev_name: [p for p in self.devices.values()
                                      if p.volume == 2 and p.mirror is d.mirror]
                    for d in devs if d.mirror is not None}

    # -- the image guard -------------------------------------------------------------------
    def _served_images(self) -> dict[tuple[object, ...], str]:
        """Identity of every image a served device uses -> that device (``lock`` held)."""
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

    def check_image(self, key: str, path: str, exclude: str | None = None) -> None:
        """Refuse an image outside the image directories or used by another served device
        (``lock`` held)."""
        if self.image_dirs is not None:
            check_confined(key, path, self.image_dirs)
        owner = self._served_images().get(image_identity(path) or ("missing", path))
        if owner is not None and owner != exclude:
            raise ConfigError(f"image {key} {path} is already used by {owner}; one image "
                              "belongs to one mirror")

    def check_images(self, spec: MirrorSpec | SnapshotSpec) -> None:
        """``serve``'s guard (``lock`` held): confinement for every image; a mirror's legs
        must not be images another device serves (a snapshot LUN reads a split mirror's A
        on purpose)."""
        if isinstance(spec, SnapshotSpec):
            if self.image_dirs is not None:
                check_confined("snapshot", spec.image, self.image_dirs)
            return
        for key, path in (("a", spec.image_a), ("b", spec.image_b)):
            self.check_image(key, path)

    def check_config(self, config: str) -> tuple[bool, str]:
        """D-Bus CheckConfig (targetcli's ``create``): the cfgstring's syntax and images, and
        this daemon's own refusals, so a backstore it would not serve is never made."""
        from targetmirror.daemon.dbus_service import check_config

        def guard(spec: MirrorSpec | SnapshotSpec) -> None:
            with self.lock:
                self.check_images(spec)

        return check_config(config, guard)

    # -- the device set --------------------------------------------------------------------
    def attach(self, info: UioInfo) -> None:
        """Serve ``info`` unless it is served already."""
        with self.lock:
            if info.name in self.devices:
                return
            owner = volume_of(info)
            if owner is not None and self.served_mirror(owner) is None:
                # volume 2 waits for its mirror: the next rescan tries again
                log.warning("%s is volume 2 of mirror %s, which is not served (yet)",
                            info.dev_name, owner, extra={"device": info.dev_name})
                return
            try:
                dev = serve(info, workers=self.workers, store=self.store,
                            configfs_root=self.configfs_root, mirrors=self.served_mirror,
                            guard=self.check_images, wi_extent=self.wi_extent,
                            refused=self.refused.get(info.dev_name))
                self.devices[info.name] = dev
                if dev.mirror is not None and dev.volume == 1:
                    dev.mirror.a_readers = functools.partial(self.a_readers, dev.mirror.name)
                    dev.mirror.resume()
            except TargetMirrorError as exc:
                log.error("cannot open %s: %s", info.dev_path, exc,
                          extra={"device": info.dev_name})

    def a_readers(self, mirror: str) -> list[str]:
        """The snapshot LUNs served from ``mirror``'s A (A must not change under them: the
        mirror refuses a rejoin, a sync or a repair of A meanwhile)."""
        with self.lock:
            return sorted(d.info.dev_name for d in self.devices.values()
                          if d.snapshot is not None and d.snapshot.mirror == mirror)

    def detach(self, name: str) -> None:
        """Stop serving the device whose UIO name is ``name`` (and a mirror's volume 2s
        before the mirror itself: they share its Mirror)."""
        with self.lock:
            dev = self.devices.get(name)
            peers = [] if dev is None or dev.volume != 1 or dev.mirror is None else [
                n for n, d in self.devices.items() if d.volume == 2 and d.mirror is dev.mirror]
        for peer in peers:
            self.detach(peer)
        with self.lock:
            dev = self.devices.pop(name, None)
            if dev is not None:
                self._closing.add(dev.info.dev_name)
        if dev is not None:
            try:
                dev.close()
            finally:
                with self.lock:
                    self._closing.discard(dev.info.dev_name)
            log.info("stopped serving %s", dev.info.dev_name, extra={"device": dev.info.dev_name})

    def forget(self, name: str) -> list[str]:
        """Delete the saved state (state document, bitmap) of mirror ``name``, which must not
        be served or closing; return the files removed."""
        bitmap = self.store.bitmap_path(name)  # checks the name
        with self.lock:
            if name in self._closing or any(d.info.dev_name == name
                                            for d in self.devices.values()):
                raise MirrorError(f"mirror {name} is served; delete its backstore first")
            removed = []
            for path in (os.path.join(self.store.directory, f"{name}.json"), bitmap):
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
        return removed

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

    def refuse(self, refused: dict[str, str]) -> None:
        """Take a new set of backstores the configuration file refuses (name -> why), and
        serve again every device whose refusal came or went: one now refused is answered NOT
        READY with the reason, one no longer refused is opened for real."""
        with self.lock:
            before = dict(self.refused)
            self.refused = dict(refused)
            changed = [uio for uio, d in self.devices.items()
                       if before.get(d.info.dev_name) != refused.get(d.info.dev_name)]
        for uio in changed:
            self.detach(uio)
        if changed:
            self.rescan()

    def close(self) -> None:
        """Every ring stops fetching at once and drains in parallel; then each device is
        closed."""
        for dev in self.served():
            dev.runner.stop()
        for name in list(self.devices):
            self.detach(name)
