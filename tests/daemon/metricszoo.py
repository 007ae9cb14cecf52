"""A daemon serving one mirror in every state, held there, for the metrics tests.

Every mirror is a real :class:`Mirror` over real files behind a real ring loop (the kernel
double of tests/tcmu/producer.py), put into its state by the mirror's own operations -- a
split through the daemon's ``split()``, a rejoin, a repair after an injected leg failure, an
unclean stop, an initial sync, a verify through the daemon's control operation -- and held
there by an injected stall (``FaultPlan`` ``delay``, released at the end) or a copy-rate limit
of one byte a second (the copier waits on its stop event, which closing the mirror sets).

The zoo's :attr:`Zoo.expect` says, per mirror, the state, health, leg states and running copy
each one must show; ``Zoo.render()`` is one scrape's text.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from targetmirror.daemon.device import MirrorCommands, ServedDevice
from targetmirror.daemon.main import Daemon
from targetmirror.daemon.metrics import render
from targetmirror.daemon.runner import DeviceRunner
from targetmirror.daemon.split import split
from targetmirror.errors import StoreError
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import State, StateStore
from targetmirror.scsi.identity import DeviceIdentity
from targetmirror.store.faulty import Fault, FaultPlan, FaultyImage
from targetmirror.tcmu.ring import Ring
from targetmirror.tcmu.uio import UioInfo
from tests.daemon.splitrig import RecordingUio, write10
from tests.tcmu.producer import Producer

BS = 512
REGION = 4096
SIZE = 2 << 20          # 512 regions: a verify runs in two chunks of 256
SLOW = 1.0              # bytes per second: a copier that waits until it is stopped


@dataclass
class Expect:
    state: str
    health: str = "ok"
    legs: dict[str, tuple[str, str]] = field(default_factory=dict)
    """leg -> (leg state, leg health)."""
    copy: str | None = None
    """The kind of copy running (resync_active == 1), if any."""


@dataclass
class Served:
    served: ServedDevice
    uio: RecordingUio
    producer: Producer
    plans: tuple[FaultPlan, FaultPlan]


def wait_until(pred: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll a condition with a deadline (the states are reached on other threads)."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Zoo:
    """See the module docstring.  ``close()`` releases every stall and closes everything."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.daemon = Daemon(state_dir=str(tmp / "state"), control_socket=None,
                             stuck_after=0.2)
        self.store = StateStore(str(tmp / "state" / "mirrors"))
        self.expect: dict[str, Expect] = {}
        self.devices: list[Served] = []
        self.extra_mirrors: list[Mirror] = []
        self.threads: list[threading.Thread] = []
        self.verify_result: dict[str, Any] = {}

    # -- building blocks -----------------------------------------------------------------------
    def images(self, name: str) -> tuple[str, str]:
        paths = []
        for leg in ("a", "b"):
            p = str(self.tmp / f"{name}.{leg}.img")
            if not os.path.exists(p):
                with open(p, "wb") as f:
                    f.truncate(SIZE)
            paths.append(p)
        return paths[0], paths[1]

    def mirror(self, name: str, plans: tuple[FaultPlan, FaultPlan] | None = None) -> Mirror:
        pa, pb = self.images(name)
        plans = plans or (FaultPlan(), FaultPlan())
        a, b = FaultyImage(pa, plans[0]), FaultyImage(pb, plans[1])
        a.fast = b.fast = False  # a held write must not stall the ring thread itself
        return Mirror(name, a, b, size=SIZE,
                      block_size=BS, store=self.store, region_size=REGION, wi_interval=None,
                      leg_timeout=None, wi_extent=REGION)

    def serve(self, m: Mirror, name: str | None = None, volume: int = 1) -> Served:
        name = name or m.name
        commands = MirrorCommands(m, lambda: DeviceIdentity(serial=name[:16],
                                                           max_transfer_blocks=2048),
                                  volume=volume)
        producer = Producer(cmdr_size=256 * 1024, data_size=2 << 20)
        uio = RecordingUio(producer)
        runner = DeviceRunner(name, uio, Ring(producer.buf), commands.admit,
                              before_dispatch=commands.commit, workers=2, tag=m.epoch)
        runner.start()
        cfg = f"mirror={m.name};volume=2" if volume == 2 else f"{m.a.path}|{m.b.path}"
        info = UioInfo(name=f"tcm-user/0/{name}/mirror/{cfg}", minor=len(self.devices), hba=0,
                       dev_name=name, subtype="mirror", cfgstring=cfg,
                       map_size=producer.map_size, dev_path="/dev/null")
        served = ServedDevice(info, uio, runner, m, volume=volume,  # type: ignore[arg-type]
                              stats=commands.stats, lane=commands.lane)
        plans = (getattr(m.a, "plan", FaultPlan()), getattr(m.b, "plan", FaultPlan()))
        s = Served(served, uio, producer, plans)
        self.devices.append(s)
        self.daemon.registry.devices[info.name] = served
        return s

    def write(self, s: Served, lba: int, blocks: int = 8) -> int:
        data = bytes([lba & 0xFF]) * (blocks * BS)
        return s.uio.submit("write", write10(lba, blocks), lba, blocks, data).cmd_id

    # -- the states ----------------------------------------------------------------------------
    def build(self) -> Zoo:
        ok = ("ok",)
        self.serve(self.mirror("z_mirrored"))
        assert self.daemon.ops.verify("z_mirrored")["mismatches"] == 0  # a verify done
        self.expect["z_mirrored"] = Expect("mirrored", legs={"a": ("in-sync", *ok),
                                                             "b": ("in-sync", *ok)})

        # the initial sync copies the first half, then its read of A there is held
        plans = (FaultPlan(), FaultPlan())
        m = self.mirror("z_syncing", plans)
        self.serve(m)
        plans[0].add(Fault("read", "delay", offset=(SIZE // 2, SIZE // 2 + 1), seconds=120))
        m.initial_sync()
        wait_until(lambda: plans[0].injected, "the sync to reach the middle")
        self.expect["z_syncing"] = Expect("syncing", legs={"a": ("live", *ok),
                                                           "b": ("syncing", "resyncing")},
                                          copy="sync")

        # splitting: a pre-split write held on A keeps the drain open (and is a stuck command)
        plans = (FaultPlan(), FaultPlan())
        m = self.mirror("z_splitting", plans)
        s = self.serve(m)
        plans[0].add(Fault("write", "delay", offset=(64 * BS, 72 * BS), seconds=120))
        self.write(s, 64)
        wait_until(lambda: plans[0].injected, "the held write to reach A")
        split([s.served])
        self.expect["z_splitting"] = Expect("splitting", legs={"a": ("draining", *ok),
                                                               "b": ("live", *ok)})
        self.stalled = s

        m = self.mirror("z_split")
        s = self.serve(m)
        split([s.served])
        assert m.split_complete.wait(10)
        self.expect["z_split"] = Expect("split", legs={"a": ("frozen", *ok),
                                                       "b": ("live", *ok)})

        m = self.mirror("z_oneway")
        s = self.serve(m)
        v2 = self.serve(m, "z_oneway_v2", volume=2)
        split([s.served], {"z_oneway": [v2.served]}, one_way=True)
        assert m.split_complete.wait(10)
        self.expect["z_oneway"] = Expect("one-way", legs={"a": ("one-way", *ok),
                                                          "b": ("live", *ok)})

        m = self.mirror("z_rejoin")
        s = self.serve(m)
        split([s.served])
        assert m.split_complete.wait(10)
        m.write(0, [memoryview(b"r" * (3 * REGION))], False)
        m.rejoin(rate=SLOW)
        wait_until(lambda: (m.resync or {}).get("bytes_copied"), "the rejoin to copy")
        self.expect["z_rejoin"] = Expect("rejoining", legs={"a": ("resyncing", "resyncing"),
                                                            "b": ("live", *ok)},
                                         copy="rejoin")

        for leg in ("a", "b"):  # a repair runs from the other leg to the failed one
            plans = (FaultPlan(), FaultPlan())
            m = self.mirror(f"z_repair_{leg}", plans)
            self.serve(m)
            plans[0 if leg == "a" else 1].add(Fault("write", "eio"))
            m.write(0, [memoryview(b"x" * (3 * REGION))], False)
            assert m.health == "degraded"
            m.repair(rate=SLOW)
            wait_until(lambda m=m: (m.resync or {}).get("bytes_copied"), "the repair to copy")
            other = "b" if leg == "a" else "a"
            self.expect[f"z_repair_{leg}"] = Expect(
                "rejoining", legs={leg: ("resyncing", "resyncing"), other: ("live", *ok)},
                copy="repair")

        # recovery: a mirror left open (an unclean stop) and opened again; B's reads held
        crashed = self.mirror("z_recovery")
        crashed.write(0, [memoryview(b"c" * (2 * REGION))], False)
        self.extra_mirrors.append(crashed)
        plans = (FaultPlan(), FaultPlan())
        plans[1].add(Fault("read", "delay", seconds=120, count=-1))
        m = self.mirror("z_recovery", plans)
        assert m.unclean_start and m.state == State.REJOINING
        self.serve(m)
        m.resume()
        wait_until(lambda: m.resync and plans[1].injected, "the recovery to start copying")
        self.expect["z_recovery"] = Expect("rejoining", legs={"a": ("resyncing", "resyncing"),
                                                              "b": ("live", *ok)},
                                           copy="recovery")

        plans = (FaultPlan(), FaultPlan())
        m = self.mirror("z_degraded", plans)
        self.serve(m)
        plans[1].add(Fault("write", "eio"))
        m.write(8 * REGION, [memoryview(b"d" * REGION)], False)
        self.expect["z_degraded"] = Expect("mirrored", "degraded",
                                           legs={"a": ("in-sync", *ok),
                                                 "b": ("failed", "failed")})

        plans = (FaultPlan(), FaultPlan())
        m = self.mirror("z_failed", plans)
        self.serve(m)
        for p in plans:
            p.add(Fault("write", "eio"))
        with pytest.raises(StoreError, match="injected eio"):  # no leg is left
            m.write(0, [memoryview(b"f" * REGION)], False)
        assert m.health == "failed"
        self.expect["z_failed"] = Expect("mirrored", "failed",
                                         legs={"a": ("failed", "failed"),
                                               "b": ("failed", "failed")})

        # verify: through the daemon's operation; a read of A half-way is held
        plans = (FaultPlan(), FaultPlan())
        m = self.mirror("z_verify", plans)
        self.serve(m)
        plans[0].add(Fault("read", "delay", offset=(SIZE // 2, SIZE // 2 + 1), seconds=120))

        def run_verify() -> None:
            self.verify_result.update(self.daemon.ops.verify("z_verify"))

        t = threading.Thread(target=run_verify, daemon=True)
        t.start()
        self.threads.append(t)
        wait_until(lambda: plans[0].injected, "the verify to reach the held read")
        self.expect["z_verify"] = Expect("mirrored", legs={"a": ("in-sync", *ok),
                                                           "b": ("in-sync", *ok)},
                                         copy="verify")

        # the held pre-split write is a stuck command once older than --stuck-after
        runner = self.stalled.served.runner
        wait_until(lambda: any(time.monotonic() - t0 > 0.3
                               for t0, _ in list(runner.inflight.values())),
                   "the held write to age")
        assert self.daemon.watchdog is not None
        self.daemon.watchdog.scan()
        # a scheduled split, and one missed (due while no daemon ran)
        self.daemon.ops.scheduler.add(time.time() + 3600, ["z_mirrored"])
        return self

    def render(self) -> str:
        return render(self.daemon.ops)

    def close(self) -> None:
        for s in self.devices:
            for p in s.plans:
                p.release()
        for t in self.threads:
            t.join(30)
        for s in self.devices:
            s.served.runner.stop()
        for s in self.devices:
            s.served.runner.join(10)
            if s.served.volume == 1 and s.served.mirror is not None:
                s.served.mirror.close()
            s.producer.close()
            os.close(s.uio.efd)
        for m in self.extra_mirrors:
            m.close()
