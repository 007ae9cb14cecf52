"""Host benchmark: what metrics cost.

* per command: :meth:`CommandStats.record` (what a worker adds after each command), ns/call,
  one thread and four threads at once (each has its own shard, so no contention);
* per scrape: one HTTP GET of /metrics for N mirrors (state from ``Mirror.status()``), ms.

    python3 benchmarks/metrics_overhead.py [--calls 1000000] [--mirrors 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from targetmirror.daemon.metrics import READ, WRITE, CommandStats, MetricsServer


def per_command(calls: int, threads: int) -> float:
    stats = CommandStats()

    def work() -> None:
        rec = stats.record
        for i in range(calls):
            rec(WRITE if i & 1 else READ, 80_000 + i % 1000, 4096, 4096)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return (time.perf_counter() - t0) / (calls * threads) * 1e9


def per_scrape(n: int, rounds: int = 20) -> float:
    from targetmirror.daemon.device import ServedDevice
    from targetmirror.daemon.main import Daemon
    from targetmirror.mirror.mirror import Mirror
    from targetmirror.mirror.state import StateStore
    from targetmirror.store.image import Image
    from targetmirror.tcmu.uio import UioInfo

    class Runner:
        commands = 1000
        batches = 100

    with tempfile.TemporaryDirectory() as d:
        daemon = Daemon(state_dir=d, control_socket=None)
        store = StateStore(os.path.join(d, "mirrors"))
        mirrors = []
        for i in range(n):
            paths = []
            for leg in ("a", "b"):
                p = os.path.join(d, f"m{i}.{leg}")
                with open(p, "wb") as f:
                    f.truncate(1 << 20)
                paths.append(p)
            m = Mirror(f"m{i}", Image(paths[0]), Image(paths[1]), size=1 << 20, store=store)
            mirrors.append(m)
            info = UioInfo(name=f"tcm-user/0/m{i}/mirror/x", minor=i, hba=0, dev_name=f"m{i}",
                           subtype="mirror", cfgstring="x", map_size=0, dev_path="/dev/null")
            stats = CommandStats()
            stats.record(WRITE, 100_000, 4096, 4096)
            daemon.devices[info.name] = ServedDevice(info, None, Runner(), m,  # type: ignore
                                                     stats=stats)
        server = MetricsServer(daemon.ops, ("127.0.0.1", 0))
        server.start()
        url = f"http://127.0.0.1:{server.address[1]}/metrics"
        try:
            urllib.request.urlopen(url).read()
            t0 = time.perf_counter()
            for _ in range(rounds):
                size = len(urllib.request.urlopen(url).read())
            took = (time.perf_counter() - t0) / rounds * 1e3
        finally:
            server.close()
            for m in mirrors:
                m.close()
        print(f"  /metrics is {size} bytes for {n} mirrors")
        return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1_000_000)
    p.add_argument("--mirrors", type=int, default=64)
    args = p.parse_args()
    print(f"CommandStats.record, 1 thread:  {per_command(args.calls, 1):7.0f} ns/command")
    print(f"CommandStats.record, 4 threads: {per_command(args.calls // 4, 4):7.0f} ns/command "
          "(wall / total calls; the GIL serialises them)")
    print(f"scrape of {args.mirrors} mirrors: {per_scrape(args.mirrors):7.1f} ms")


if __name__ == "__main__":
    main()
