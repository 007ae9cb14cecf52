"""Prometheus metrics for ``targetmirrord`` (``--metrics-address HOST:PORT``; off by default).

Two kinds of numbers, gathered two ways:

* **State** (mirror and leg state, epoch, in-flight pre-split writes, dirty regions, sync and
  rejoin progress, the last split) is read at scrape time from ``Mirror.status()`` -- the same
  snapshot the control API and ``targetmirror status --json`` show, so the three never disagree.
* **Per-command counters** (commands, bytes by direction and leg, latency histograms) must cost
  the hot path next to nothing: a worker adds plain integers into a flat list that only its own
  thread writes (one *shard* per thread, so no lock and no lost increment), and the latency
  bucket is found with one ``bisect`` over fixed bounds.  No prometheus_client object is touched
  per command; the :class:`MirrorCollector` sums the shards when Prometheus scrapes.

The HTTP endpoint is prometheus_client's WSGI app on a small threading server of our own (so it
can bind port 0 in tests, report the port it got, and be shut down cleanly on SIGTERM).
"""

from __future__ import annotations

import errno as errno_mod
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from targetmirror import __version__, express

# The counters live in daemon/stats.py (the device layer records them) and the leg table in
# targetmirror/states.py (derived from the mirror's state table); re-exported here.
from targetmirror.daemon.stats import DIRECTIONS as DIRECTIONS
from targetmirror.daemon.stats import LATENCY_BOUNDS_NS as LATENCY_BOUNDS_NS
from targetmirror.daemon.stats import LEGS as LEGS
from targetmirror.daemon.stats import OTHER as OTHER
from targetmirror.daemon.stats import READ as READ
from targetmirror.daemon.stats import WRITE as WRITE
from targetmirror.daemon.stats import CommandStats as CommandStats
from targetmirror.errors import ConfigError
from targetmirror.netaddr import EXPECTED, parse_hostport
from targetmirror.states import LEG_HEALTH as LEG_HEALTH
from targetmirror.states import LEG_STATES as LEG_STATES
from targetmirror.states import MIRROR_STATES as MIRROR_STATES
from targetmirror.states import leg_states as leg_states

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from targetmirror.daemon.ops import ControlOps

log = logging.getLogger("targetmirror.metrics")

MIRROR_HEALTH = ("ok", "degraded", "failed")
RESYNC_KINDS = ("sync", "rejoin", "repair", "recovery", "verify")
"""What copies or compares a mirror's legs: the initial sync, a rejoin after a split, a repair
of a failed leg, the recovery after an unclean stop, and a verify (all in ``Mirror.resync``)."""

def leg_view(st: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """``leg -> (role, health)`` from a ``Mirror.status()`` snapshot (its ``legs``, which the
    mirror derives from its state table: ``policy.leg_role`` / ``policy.leg_health``)."""
    legs = st.get("legs") or {}
    return {leg: (str((legs.get(leg) or {}).get("role", "unknown")),
                  str((legs.get(leg) or {}).get("health", "ok"))) for leg in LEGS}


@dataclass(frozen=True)
class Copy:
    """One copy or compare of a mirror's legs, as the metrics show it."""

    kind: str
    active: bool
    failed: bool
    done_bytes: float
    total_bytes: float | None
    regions_done: float | None
    regions_total: float | None
    eta_seconds: float | None
    started_wall: float | None

    @property
    def ratio(self) -> float | None:
        if self.total_bytes is None:
            return None
        return 1.0 if self.total_bytes <= 0 else min(1.0, self.done_bytes / self.total_bytes)


def copies(st: dict[str, Any]) -> list[Copy]:
    """The copy of a ``Mirror.status()`` snapshot (its ``resync``: sync, rejoin, repair,
    recovery or verify), running, failed or stopped; none when nothing copies."""
    rs: dict[str, Any] = st.get("resync") or {}
    if not rs:
        return []
    kind = str(rs.get("kind"))
    bm = st.get("bitmap") or {}
    if kind == "sync":
        # the cursor is where the copy is (a resumed sync copied the bytes below it earlier)
        done = float(rs.get("cursor") or rs.get("bytes_copied") or 0)
        total: float | None = float(rs.get("bytes_total") or st["size"])
    else:
        done = float(rs.get("bytes_copied") or 0)
        total = None if rs.get("bytes_total") is None else float(rs["bytes_total"])
        if total is None and rs.get("regions_total") is not None and bm.get("region_size"):
            total = float(min(rs["regions_total"] * bm["region_size"], st["size"]))
    return [Copy(kind, bool(rs.get("running")), bool(rs.get("error")), done, total,
                 rs.get("regions_done"), rs.get("regions_total"), rs.get("eta_seconds"),
                 rs.get("started_wall"))]


def _oldest_age(runner: Any, now: float) -> float:
    """Age of the oldest command the ring loop fetched and has not answered (0 if none)."""
    try:
        entries = list(runner.inflight.values())
    except (RuntimeError, AttributeError):  # resized while copied: the next scrape sees it
        return 0.0
    return max((now - started for started, _job in entries), default=0.0)


class MirrorCollector:
    """Builds every metric family from the daemon's devices at scrape time."""

    def __init__(self, ops: ControlOps) -> None:
        self.ops = ops

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the devices present: no static description

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        info = InfoMetricFamily("targetmirror_build", "targetmirrord version")
        info.add_metric([], {"version": __version__})
        yield info

        ops = self.ops
        with ops.registry.lock:
            devices = sorted(ops.registry.devices.values(), key=lambda d: d.info.dev_name)
        watchdog = ops.watchdog
        verified = dict(ops.verified)
        scheduler = ops.scheduler

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("mirror",)) -> Any:
            return GaugeMetricFamily(f"targetmirror_{name}", doc, labels=list(labels))

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Any:
            return CounterMetricFamily(f"targetmirror_{name}", doc, labels=list(labels))

        ready = gauge("device_ready", "1 if the device is served, 0 if it answers NOT READY "
                      "(bad cfgstring or images; see the log)", ("device",))
        ring_cmds = counter("ring_commands", "commands fetched from the TCMU ring", ("device",))
        ring_batches = counter("ring_batches", "batches fetched (one kernel notify each)",
                               ("device",))
        stuck = gauge("stuck_commands", "commands unanswered for longer than the daemon's "
                      "--stuck-after (the watchdog logged each)", ("device",))
        oldest = gauge("oldest_command_seconds", "age of the oldest command fetched from the "
                       "ring and not yet answered (0: none)", ("device",))
        lane_cmds = counter("express_commands", "commands the compiled express lane served "
                            "straight from the ring", ("device",))
        lane_runs = counter("express_runs", "express lane runs, by why each stopped (head: "
                            "ring empty; entry, gate, io, full: Python took over)",
                            ("device", "stop"))
        m_state = gauge("mirror_state", "1 for the state the mirror is in, 0 for the others",
                        ("mirror", "state"))
        m_health = gauge("mirror_health", "1 for the mirror's health: ok, degraded (a leg "
                         "failed, a complete one serves) or failed (no complete leg)",
                         ("mirror", "health"))
        m_info = InfoMetricFamily("targetmirror_mirror", "the mirror's images",
                                  labels=["mirror"])
        epoch = gauge("mirror_epoch", "mirror epoch (grows at each split and rejoin)")
        size = gauge("mirror_size_bytes", "LUN size")
        l_state = gauge("leg_state", "1 for what the leg is doing (A is the split-off copy, "
                        "B the live leg), 0 for the rest", ("mirror", "leg", "state"))
        l_health = gauge("leg_health", "1 for the leg's health: ok, resyncing (being made "
                         "whole) or failed", ("mirror", "leg", "health"))
        l_failure = InfoMetricFamily("targetmirror_leg_failure", "why a failed leg failed "
                                     "(present only while it is failed)",
                                     labels=["mirror", "leg"])
        l_failed_at = gauge("leg_failed_timestamp_seconds", "when the leg failed",
                            ("mirror", "leg"))
        inflight = gauge("writes_in_flight", "writes admitted and not finished")
        pre = gauge("pre_split_in_flight", "pre-split writes still draining to A")
        dirty = gauge("bitmap_dirty_regions", "regions marked in the change bitmap (changed "
                      "since the split, or written while a leg was failed)")
        regions = gauge("bitmap_regions", "regions in the change bitmap")
        region_size = gauge("bitmap_region_size_bytes", "bytes per bitmap region")
        split_epoch = gauge("split_epoch", "epoch of the latest split")
        split_instant = gauge("split_instant_timestamp_seconds", "wall time of the latest split "
                              "instant")
        split_drain = gauge("split_drain_seconds", "instant to A complete, latest split")
        split_info = InfoMetricFamily("targetmirror_split", "latest split: what A is",
                                      labels=["mirror"])
        kind_labels = ("mirror", "kind")
        r_active = gauge("resync_active", "1 while a copy of this kind runs (sync, rejoin, "
                         "repair, recovery, verify)", kind_labels)
        r_failed = gauge("resync_failed", "1 when the latest copy of this kind stopped on an "
                         "error (see the log; retry or repair)", kind_labels)
        r_bytes = gauge("resync_bytes_copied", "bytes copied (verify: compared or skipped) by "
                        "the current copy; for a sync, its position", kind_labels)
        r_total = gauge("resync_size_bytes", "bytes the current copy covers", kind_labels)
        r_ratio = gauge("resync_progress_ratio", "share of the current copy done, 0 to 1",
                        kind_labels)
        r_regions_done = gauge("resync_regions_done", "regions committed by the current copy",
                               kind_labels)
        r_regions_total = gauge("resync_size_regions", "regions the current copy covers",
                                kind_labels)
        r_eta = gauge("resync_eta_seconds", "estimated time left", kind_labels)
        r_started = gauge("resync_started_timestamp_seconds", "when the current copy started",
                          kind_labels)
        v_mismatch = gauge("verify_last_mismatches", "mismatching regions found by the latest "
                           "completed verify since the daemon started")
        v_last = gauge("verify_last_timestamp_seconds", "when the latest verify completed")
        commands = counter("commands", "SCSI commands finished", ("mirror", "direction"))
        nbytes = counter("bytes", "bytes moved per leg (a mirrored write counts on both legs)",
                         ("mirror", "direction", "leg"))
        latency = HistogramMetricFamily("targetmirror_command_latency_seconds",
                                        "worker execution time of a command",
                                        labels=["mirror", "direction"])

        now = time.monotonic()
        for dev in devices:
            name = dev.info.dev_name
            ready.add_metric([name], 0.0 if dev.reason else 1.0)
            ring_cmds.add_metric([name], dev.runner.commands)
            ring_batches.add_metric([name], dev.runner.batches)
            oldest.add_metric([name], _oldest_age(dev.runner, now))
            if watchdog is not None:
                stuck.add_metric([name], watchdog.stuck(name))
            lane = dev.lane
            if lane is not None:
                lane_cmds.add_metric([name], lane.served)
                for code, why in express.STOP_NAMES.items():
                    lane_runs.add_metric([name, why], lane.stops[code])
            m = dev.mirror
            if m is None:
                continue
            stats = dev.stats
            if stats is not None:
                t = stats.totals()
                for d, dname in enumerate(DIRECTIONS):
                    commands.add_metric([name, dname], stats.commands(t, d))
                    latency.add_metric([name, dname], stats.buckets(t, d),
                                       stats.latency_sum_seconds(t, d))
                    if d != OTHER:
                        for li, leg in enumerate(LEGS):
                            nbytes.add_metric([name, dname, leg], stats.bytes(t, d, li))
            if dev.volume != 1:
                continue  # volume 2 shares volume 1's mirror: its state is reported there
            st = m.status()
            state = str(st["state"])
            for s in dict.fromkeys((*MIRROR_STATES, state)):
                m_state.add_metric([name, s], 1.0 if s == state else 0.0)
            health = str(st.get("health", "ok"))
            for h in dict.fromkeys((*MIRROR_HEALTH, health)):
                m_health.add_metric([name, h], 1.0 if h == health else 0.0)
            m_info.add_metric([name], {"image_a": st["image_a"], "image_b": st["image_b"]})
            epoch.add_metric([name], st["epoch"])
            size.add_metric([name], st["size"])
            failed_legs = st.get("failed_legs") or {}
            for leg, (ls, lh) in leg_view(st).items():
                for s in dict.fromkeys((*LEG_STATES, ls)):
                    l_state.add_metric([name, leg, s], 1.0 if s == ls else 0.0)
                for h in LEG_HEALTH:
                    l_health.add_metric([name, leg, h], 1.0 if h == lh else 0.0)
                f = failed_legs.get(leg)
                if f is not None:
                    l_failure.add_metric([name, leg], {
                        "kind": str(f.get("kind")),
                        "errno": "" if f.get("errno") is None else
                        errno_mod.errorcode.get(int(f["errno"]), str(f["errno"])),
                        "reason": str(f.get("reason"))[:200]})
                    if f.get("wall") is not None:
                        l_failed_at.add_metric([name, leg], f["wall"])
            inflight.add_metric([name], st["writes_in_flight"])
            pre.add_metric([name], st["pre_split_in_flight"])
            bm = st.get("bitmap")
            if bm:
                dirty.add_metric([name], bm["marked"])
                regions.add_metric([name], bm["regions"])
                region_size.add_metric([name], bm["region_size"])
            sp = st.get("split")
            if sp:
                split_epoch.add_metric([name], sp["epoch"])
                if sp.get("instant_wall") is not None:
                    split_instant.add_metric([name], sp["instant_wall"])
                if sp.get("drain_seconds") is not None:
                    split_drain.add_metric([name], sp["drain_seconds"])
                split_info.add_metric([name], {"a_status": str(sp.get("a_status")),
                                               "epoch": str(sp["epoch"])})
            cps = {c.kind: c for c in copies(st)}
            for kind in dict.fromkeys((*RESYNC_KINDS, *cps)):
                c = cps.get(kind)
                r_active.add_metric([name, kind], 1.0 if c is not None and c.active else 0.0)
                r_failed.add_metric([name, kind], 1.0 if c is not None and c.failed else 0.0)
                if c is None:
                    continue
                lab = [name, kind]
                r_bytes.add_metric(lab, c.done_bytes)
                for fam, v in ((r_total, c.total_bytes), (r_ratio, c.ratio),
                               (r_regions_done, c.regions_done),
                               (r_regions_total, c.regions_total), (r_eta, c.eta_seconds),
                               (r_started, c.started_wall)):
                    if v is not None:
                        fam.add_metric(lab, float(v))
            last = verified.get(name)
            if last:
                v_mismatch.add_metric([name], last["mismatches"])
                v_last.add_metric([name], last["completed_wall"])

        yield from (ready, ring_cmds, ring_batches, stuck, oldest, lane_cmds, lane_runs,
                    m_state, m_health, m_info, epoch, size, l_state, l_health, l_failure,
                    l_failed_at, inflight, pre, dirty, regions, region_size, split_epoch,
                    split_instant, split_drain, split_info, r_active, r_failed, r_bytes,
                    r_total, r_ratio, r_regions_done, r_regions_total, r_eta, r_started,
                    v_mismatch, v_last, commands, nbytes, latency)
        if scheduler is not None:
            yield from scheduler.metrics()


def parse_address(text: str) -> tuple[str, int]:
    """``IP:PORT`` (the one rule of :mod:`targetmirror.netaddr`) -> (host, port)."""
    hp = parse_hostport(text)
    if hp is None:
        raise ConfigError(f"--metrics-address {text!r}: expected {EXPECTED}")
    return hp


def registry(ops: ControlOps) -> CollectorRegistry:
    """Everything ``/metrics`` serves: the mirrors (:class:`MirrorCollector`) and the
    process (CPU seconds, resident memory, open fds, start time: prometheus_client's own)."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(MirrorCollector(ops))
    ProcessCollector(registry=reg)
    return reg


def render(ops: ControlOps) -> str:
    """One scrape's text, without the HTTP server (tests, and a look from a debugger)."""
    from prometheus_client import generate_latest

    return generate_latest(registry(ops)).decode()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """The ``/metrics`` endpoint on its own thread."""

    def __init__(self, ops: ControlOps, address: str | tuple[str, int]) -> None:
        """``address``: ``IP:PORT`` as the admin writes it, or ``(host, port)`` from code
        (port 0 binds any free port: tests)."""
        host, port = parse_address(address) if isinstance(address, str) else address
        self.registry = registry(ops)
        server_cls: type[_Server] = _Server
        if ":" in host:
            server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        from prometheus_client import make_wsgi_app

        try:
            self.httpd = make_server(host, port, make_wsgi_app(self.registry),
                                     server_class=server_cls, handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigError(f"--metrics-address {address}: cannot listen: "
                              f"{exc.strerror or exc}") from exc
        self.address = (host, self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", *self.address)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
