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

import logging
import socket
import threading
from collections.abc import Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from targetmirror import __version__, express

# The counters live in daemon/stats.py (the device layer records them) and the leg table in
# targetmirror/states.py (the faces show it); re-exported here for the exporter's users.
from targetmirror.daemon.stats import DIRECTIONS as DIRECTIONS
from targetmirror.daemon.stats import LATENCY_BOUNDS_NS as LATENCY_BOUNDS_NS
from targetmirror.daemon.stats import LEGS as LEGS
from targetmirror.daemon.stats import OTHER as OTHER
from targetmirror.daemon.stats import READ as READ
from targetmirror.daemon.stats import WRITE as WRITE
from targetmirror.daemon.stats import CommandStats as CommandStats
from targetmirror.errors import ConfigError
from targetmirror.netaddr import EXPECTED, parse_hostport
from targetmirror.states import LEG_STATES as LEG_STATES
from targetmirror.states import MIRROR_STATES as MIRROR_STATES
from targetmirror.states import leg_states as leg_states

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from targetmirror.daemon.registry import DeviceRegistry

log = logging.getLogger("targetmirror.metrics")

class MirrorCollector:
    """Builds every metric family from the daemon's devices at scrape time."""

    def __init__(self, daemon: DeviceRegistry) -> None:
        self.daemon = daemon

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the devices present: no static description

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
            StateSetMetricFamily,
        )

        info = InfoMetricFamily("targetmirror_build", "targetmirrord version")
        info.add_metric([], {"version": __version__})
        yield info

        with self.daemon.lock:
            devices = sorted(self.daemon.devices.values(), key=lambda d: d.info.dev_name)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("mirror",)) -> Any:
            return GaugeMetricFamily(f"targetmirror_{name}", doc, labels=list(labels))

        ready = gauge("device_ready", "1 if the device is served, 0 if it answers NOT READY "
                      "(bad cfgstring or images; see the log)", ("device",))
        ring_cmds = CounterMetricFamily("targetmirror_ring_commands",
                                        "commands fetched from the TCMU ring", labels=["device"])
        ring_batches = CounterMetricFamily("targetmirror_ring_batches",
                                           "batches fetched (one kernel notify each)",
                                           labels=["device"])
        lane_cmds = CounterMetricFamily("targetmirror_express_commands",
                                        "commands the compiled express lane served straight "
                                        "from the ring", labels=["device"])
        lane_runs = CounterMetricFamily("targetmirror_express_runs",
                                        "express lane runs, by why each stopped (head: ring "
                                        "empty; entry, gate, io, full: Python took over)",
                                        labels=["device", "stop"])
        m_state = StateSetMetricFamily("targetmirror_mirror_state", "where the mirror is in its "
                                       "split / rejoin cycle", labels=["mirror"])
        m_info = InfoMetricFamily("targetmirror_mirror", "the mirror's images",
                                  labels=["mirror"])
        epoch = gauge("mirror_epoch", "mirror epoch (grows at each split and rejoin)")
        size = gauge("mirror_size_bytes", "LUN size")
        l_state = StateSetMetricFamily("targetmirror_leg_state", "what each leg is doing "
                                       "(A is the split-off copy, B the live leg)",
                                       labels=["mirror", "leg"])
        inflight = gauge("writes_in_flight", "writes admitted and not finished")
        pre = gauge("pre_split_in_flight", "pre-split writes still draining to A")
        dirty = gauge("bitmap_dirty_regions", "regions changed on B since the split (what a "
                      "rejoin copies)")
        regions = gauge("bitmap_regions", "regions in the change bitmap")
        region_size = gauge("bitmap_region_size_bytes", "bytes per bitmap region")
        split_epoch = gauge("split_epoch", "epoch of the latest split")
        split_instant = gauge("split_instant_timestamp_seconds", "wall time of the latest split "
                              "instant")
        split_drain = gauge("split_drain_seconds", "instant to A complete, latest split")
        split_info = InfoMetricFamily("targetmirror_split", "latest split: what A is",
                                      labels=["mirror"])
        resync_active = gauge("resync_active", "1 while a rejoin or initial sync copies",
                              ("mirror", "kind"))
        resync_bytes = gauge("resync_bytes_copied", "bytes copied by the running rejoin or sync",
                             ("mirror", "kind"))
        resync_total = gauge("resync_bytes_total", "bytes the running rejoin or sync will copy",
                             ("mirror", "kind"))
        resync_eta = gauge("resync_eta_seconds", "estimated time left", ("mirror", "kind"))
        commands = CounterMetricFamily("targetmirror_commands", "SCSI commands finished",
                                       labels=["mirror", "direction"])
        nbytes = CounterMetricFamily("targetmirror_bytes", "bytes moved per leg (a mirrored "
                                     "write counts on both legs)",
                                     labels=["mirror", "direction", "leg"])
        latency = HistogramMetricFamily("targetmirror_command_latency_seconds",
                                        "worker execution time of a command",
                                        labels=["mirror", "direction"])

        for dev in devices:
            name = dev.info.dev_name
            ready.add_metric([name], 0.0 if dev.reason else 1.0)
            ring_cmds.add_metric([name], dev.runner.commands)
            ring_batches.add_metric([name], dev.runner.batches)
            lane = dev.lane
            if lane is not None:
                lane_cmds.add_metric([name], lane.served)
                for code, why in express.STOP_NAMES.items():
                    lane_runs.add_metric([name, why], lane.stops[code])
            m = dev.mirror
            if m is None:
                continue
            st = m.status()
            state = st["state"]
            m_state.add_metric([name], {s: s == state for s in MIRROR_STATES})
            m_info.add_metric([name], {"image_a": st["image_a"], "image_b": st["image_b"]})
            epoch.add_metric([name], st["epoch"])
            size.add_metric([name], st["size"])
            for leg, ls in zip(LEGS, leg_states(state), strict=True):
                l_state.add_metric([name, leg], {s: s == ls for s in LEG_STATES})
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
            rs: dict[str, Any] = st.get("resync") or {}
            for kind in ("rejoin", "sync"):
                running = rs.get("kind") == kind and "error" not in rs
                resync_active.add_metric([name, kind], 1.0 if running else 0.0)
            if rs:
                kind = str(rs.get("kind"))
                resync_bytes.add_metric([name, kind], rs.get("bytes_copied", 0))
                total = rs.get("bytes_total")
                if total is None and rs.get("regions_total") is not None and bm:
                    total = rs["regions_total"] * bm["region_size"]
                if total is not None:
                    resync_total.add_metric([name, kind], total)
                if rs.get("eta_seconds") is not None:
                    resync_eta.add_metric([name, kind], rs["eta_seconds"])
            stats = dev.stats
            if stats is None:
                continue
            t = stats.totals()
            for d, dname in enumerate(DIRECTIONS):
                commands.add_metric([name, dname], stats.commands(t, d))
                latency.add_metric([name, dname], stats.buckets(t, d),
                                   stats.latency_sum_seconds(t, d))
                if d != OTHER:
                    for li, leg in enumerate(LEGS):
                        nbytes.add_metric([name, dname, leg], stats.bytes(t, d, li))

        yield from (ready, ring_cmds, ring_batches, lane_cmds, lane_runs, m_state, m_info,
                    epoch, size, l_state, inflight, pre, dirty, regions, region_size,
                    split_epoch, split_instant,
                    split_drain, split_info, resync_active, resync_bytes, resync_total,
                    resync_eta, commands, nbytes, latency)


def parse_address(text: str) -> tuple[str, int]:
    """``IP:PORT`` (the one rule of :mod:`targetmirror.netaddr`) -> (host, port)."""
    hp = parse_hostport(text)
    if hp is None:
        raise ConfigError(f"--metrics-address {text!r}: expected {EXPECTED}")
    return hp


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """The ``/metrics`` endpoint on its own thread."""

    def __init__(self, daemon: DeviceRegistry, address: str | tuple[str, int]) -> None:
        """``address``: ``IP:PORT`` as the admin writes it, or ``(host, port)`` from code
        (port 0 binds any free port: tests)."""
        from prometheus_client import CollectorRegistry, make_wsgi_app

        host, port = parse_address(address) if isinstance(address, str) else address
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MirrorCollector(daemon))
        server_cls: type[_Server] = _Server
        if ":" in host:
            server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
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
