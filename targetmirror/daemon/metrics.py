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
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from targetmirror import __version__, express
from targetmirror.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from targetmirror.daemon.main import Daemon

log = logging.getLogger("targetmirror.metrics")

READ, WRITE, OTHER = 0, 1, 2
DIRECTIONS = ("read", "write", "other")
LEGS = ("a", "b")

#: Upper bounds of the latency buckets, in nanoseconds (``le`` in seconds on the wire).  Fixed:
#: a command's latency is counted with one bisect, never a float conversion.
LATENCY_BOUNDS_NS: tuple[int, ...] = (
    25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
    25_000_000, 50_000_000, 100_000_000, 250_000_000, 1_000_000_000, 5_000_000_000)

_NBUCKETS = len(LATENCY_BOUNDS_NS) + 1          # the last one is +Inf
_STRIDE = 2 + _NBUCKETS                          # count, sum_ns, buckets...
_BYTES = len(DIRECTIONS) * _STRIDE               # then bytes[direction][leg]
_SHARD_LEN = _BYTES + len(DIRECTIONS) * len(LEGS)


class CommandStats:
    """Per-device command counters, written lock-free by the workers (see the module doc).

    Each thread gets its own shard (a ``list`` of ints) the first time it records; dict
    ``setdefault`` is atomic under the GIL, so two threads never share a shard and every ``+=``
    is made by the shard's only writer.  A reader sums the shards; it may see one command's
    count before its bytes, which a scrape tolerates (the next scrape is exact).
    """

    __slots__ = ("_arrays", "_shards")

    def __init__(self) -> None:
        self._shards: dict[int, list[int]] = {}
        self._arrays: list[array[int]] = []

    def array_shard(self) -> array[int]:
        """A shard as a flat int64 array, for a writer in C (the express lane, which adds
        into it with the layout below: ``layout()``).  Owned by one thread, like the others."""
        shard = array("q", bytes(8 * _SHARD_LEN))
        self._arrays.append(shard)
        return shard

    @staticmethod
    def layout() -> tuple[array[int], int, int]:
        """``(latency bounds in ns, stride per direction, offset of the byte counters)``."""
        return array("q", LATENCY_BOUNDS_NS), _STRIDE, _BYTES

    def record(self, direction: int, elapsed_ns: int, a_bytes: int = 0, b_bytes: int = 0
               ) -> None:
        """Count one finished command (called by a worker; plain integer additions only)."""
        s = self._shards.get(threading.get_ident())
        if s is None:
            s = self._shards.setdefault(threading.get_ident(), [0] * _SHARD_LEN)
        base = direction * _STRIDE
        s[base] += 1
        s[base + 1] += elapsed_ns
        s[base + 2 + bisect_left(LATENCY_BOUNDS_NS, elapsed_ns)] += 1
        if a_bytes:
            s[_BYTES + direction * 2] += a_bytes
        if b_bytes:
            s[_BYTES + direction * 2 + 1] += b_bytes

    def totals(self) -> list[int]:
        """The shards summed (scrape time)."""
        out = [0] * _SHARD_LEN
        for shard in [*self._shards.values(), *self._arrays]:
            for i, v in enumerate(shard):
                out[i] += v
        return out

    def commands(self, totals: list[int], direction: int) -> int:
        return totals[direction * _STRIDE]

    def latency_sum_seconds(self, totals: list[int], direction: int) -> float:
        return totals[direction * _STRIDE + 1] / 1e9

    def buckets(self, totals: list[int], direction: int) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs as Prometheus wants them."""
        base = direction * _STRIDE + 2
        out: list[tuple[str, int]] = []
        acc = 0
        for i in range(_NBUCKETS):
            acc += totals[base + i]
            le = "+Inf" if i == len(LATENCY_BOUNDS_NS) else repr(LATENCY_BOUNDS_NS[i] / 1e9)
            out.append((le, acc))
        return out

    def bytes(self, totals: list[int], direction: int, leg: int) -> int:
        return totals[_BYTES + direction * 2 + leg]


def leg_states(state: str) -> tuple[str, str]:
    """What each leg is doing in a mirror state (A, B)."""
    return {
        "mirrored": ("in-sync", "in-sync"),
        "splitting": ("draining", "live"),
        "split": ("frozen", "live"),
        "rejoining": ("resyncing", "live"),
        "syncing": ("live", "syncing"),
    }.get(state, ("unknown", "unknown"))


MIRROR_STATES = ("mirrored", "splitting", "split", "rejoining", "syncing")
LEG_STATES = ("in-sync", "live", "draining", "frozen", "resyncing", "syncing")


class MirrorCollector:
    """Builds every metric family from the daemon's devices at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
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

        with self.daemon._lock:
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
    """``HOST:PORT``, ``:PORT`` (all addresses) or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--metrics-address {text!r}: expected HOST:PORT, e.g. "
                          "127.0.0.1:9745 or [::1]:9745")
    # ":PORT" asks for every address
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104  # nosec B104
    return host, int(port)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """The ``/metrics`` endpoint on its own thread."""

    def __init__(self, daemon: Daemon, address: str) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app

        host, port = parse_address(address)
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
