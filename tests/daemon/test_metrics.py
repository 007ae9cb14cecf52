"""The Prometheus endpoint: scraped over HTTP on 127.0.0.1 from a daemon serving a real
runner + SCSI + mirror stack (kernel double), parsed with prometheus_client's own parser."""

from __future__ import annotations

import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from targetmirror.daemon.main import Daemon
from targetmirror.daemon.metrics import (
    LATENCY_BOUNDS_NS,
    READ,
    WRITE,
    CommandStats,
    MetricsServer,
    parse_address,
)
from targetmirror.errors import ConfigError
from targetmirror.mirror.state import StateStore
from tests.daemon.splitrig import BS, block, make_device, read10, write10

NBLOCKS = 64


def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    host, port = server.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def rig(tmp_path):
    store = StateStore(str(tmp_path / "state" / "mirrors"))
    dev = make_device(str(tmp_path), "m0", NBLOCKS, workers=2, store=store)
    daemon = Daemon(state_dir=str(tmp_path / "state"), control_socket=None)
    daemon.devices[dev.served.info.name] = dev.served
    server = MetricsServer(daemon.ops, ("127.0.0.1", 0))
    server.start()
    yield dev, daemon, server
    server.close()
    dev.close()


def _write(dev, lba: int, n: int, seq: int = 0):
    payload = b"".join(block(1, seq, i, lba + i) for i in range(n))
    q = dev.uio.submit("write", write10(lba, n), lba, n, payload)
    assert dev.uio.wait_reaped([q.cmd_id])
    assert dev.uio.reaped[q.cmd_id][1].status == 0
    return payload


def test_counters_state_and_split_are_scraped(rig):
    dev, daemon, server = rig
    before = scrape(server)
    assert val(before, "targetmirror_mirror_state", mirror="m0", state=
               "mirrored") == 1
    assert val(before, "targetmirror_commands_total", mirror="m0", direction="write") == 0
    assert val(before, "targetmirror_device_ready", device="m0") == 1

    for i in range(3):
        _write(dev, 4 * i, 2, seq=i)                      # 3 mirrored writes of 2 blocks
    q = dev.uio.submit("read", read10(0, 4), 0, 4, data_in_len=4 * BS)
    assert dev.uio.wait_reaped([q.cmd_id])

    s = scrape(server)
    assert val(s, "targetmirror_commands_total", mirror="m0", direction="write") == 3
    assert val(s, "targetmirror_commands_total", mirror="m0", direction="read") == 1
    for leg in ("a", "b"):
        assert val(s, "targetmirror_bytes_total", mirror="m0", direction="write",
                   leg=leg) == 6 * BS
    assert val(s, "targetmirror_bytes_total", mirror="m0", direction="read", leg="b") == 4 * BS
    assert val(s, "targetmirror_bytes_total", mirror="m0", direction="read", leg="a") == 0
    # the histogram is consistent: +Inf bucket == count, and buckets never decrease
    assert val(s, "targetmirror_command_latency_seconds_count", mirror="m0",
               direction="write") == 3
    les = [val(s, "targetmirror_command_latency_seconds_bucket", mirror="m0",
               direction="write", le=le)
           for le in [*(repr(b / 1e9) for b in LATENCY_BOUNDS_NS), "+Inf"]]
    assert les == sorted(les) and les[-1] == 3
    assert val(s, "targetmirror_command_latency_seconds_sum", mirror="m0",
               direction="write") > 0
    assert val(s, "targetmirror_leg_state", mirror="m0", leg="a",
               state="in-sync") == 1
    assert val(s, "targetmirror_ring_commands_total", device="m0") == 4
    epoch0 = val(s, "targetmirror_mirror_epoch", mirror="m0")

    # split through the control API's handler (what `targetmirror split` runs)
    res = daemon.ops.split(["m0"], wait=True, timeout=30)
    assert res["split"][0]["state"] == "split"
    _write(dev, 32, 4, seq=9)                             # post-split: B only, marked

    s = scrape(server)
    assert val(s, "targetmirror_mirror_state", mirror="m0",
               state="split") == 1
    assert val(s, "targetmirror_mirror_state", mirror="m0",
               state="mirrored") == 0
    assert val(s, "targetmirror_mirror_epoch", mirror="m0") == epoch0 + 1
    assert val(s, "targetmirror_leg_state", mirror="m0", leg="a",
               state="frozen") == 1
    assert val(s, "targetmirror_leg_state", mirror="m0", leg="b",
               state="live") == 1
    assert val(s, "targetmirror_bytes_total", mirror="m0", direction="write", leg="a") == 6 * BS
    assert val(s, "targetmirror_bytes_total", mirror="m0", direction="write", leg="b") == 10 * BS
    assert val(s, "targetmirror_bitmap_dirty_regions", mirror="m0") >= 1
    assert val(s, "targetmirror_split_info", mirror="m0", a_status="consistent",
               epoch=str(int(epoch0 + 1))) == 1
    assert val(s, "targetmirror_split_instant_timestamp_seconds", mirror="m0") > 0
    assert val(s, "targetmirror_pre_split_in_flight", mirror="m0") == 0

    daemon.ops.rejoin(["m0"], wait=True, timeout=30)
    s = scrape(server)
    assert val(s, "targetmirror_mirror_state", mirror="m0",
               state="mirrored") == 1
    assert val(s, "targetmirror_bitmap_dirty_regions", mirror="m0") == 0
    assert val(s, "targetmirror_resync_active", mirror="m0", kind="rejoin") == 0
    assert dev.image_bytes("a") == dev.image_bytes("b")


def test_parallel_scrapes_agree(rig):
    _dev, _daemon, server = rig
    results: list[int] = []

    def one() -> None:
        results.append(len(scrape(server)))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 4 and len(set(results)) == 1


def test_stats_shards_per_thread_sum_exactly():
    stats = CommandStats()
    n = 2000

    def work() -> None:
        for _ in range(n):
            stats.record(WRITE, 75_000, 512, 512)
            stats.record(READ, 2_000_000_000_000, 0, 4096)   # beyond the last bound: +Inf

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t = stats.totals()
    assert stats.commands(t, WRITE) == 4 * n and stats.bytes(t, WRITE, 0) == 4 * n * 512
    assert stats.bytes(t, READ, 1) == 4 * n * 4096
    buckets = dict(stats.buckets(t, WRITE))
    assert buckets["5e-05"] == 0 and buckets["0.0001"] == 4 * n
    rb = stats.buckets(t, READ)
    assert rb[-1] == ("+Inf", 4 * n) and rb[-2][1] == 0


@pytest.mark.parametrize("text", ["9100", "host:", "host:port", "1.2.3.4:70000", "",
                                  ":9745", "127.0.0.1:0", "localhost:9745", "::1:9745"])
def test_bad_metrics_address_is_refused(text):
    """The one IP:PORT rule of targetmirror.netaddr, as for portals in the file: a numeric
    IP, a port 1-65535; no ':PORT' shorthand, no port 0 from an admin."""
    with pytest.raises(ConfigError, match="IP:PORT with a numeric IP and a port 1-65535"):
        parse_address(text)


def test_metrics_address_forms():
    assert parse_address("127.0.0.1:9745") == ("127.0.0.1", 9745)
    assert parse_address("[::1]:9745") == ("::1", 9745)
    assert parse_address("0.0.0.0:9745") == ("0.0.0.0", 9745)


def test_port_in_use_is_a_clear_error(rig):
    _dev, daemon, server = rig
    with pytest.raises(ConfigError, match="cannot listen"):
        MetricsServer(daemon.ops, f"127.0.0.1:{server.address[1]}")
