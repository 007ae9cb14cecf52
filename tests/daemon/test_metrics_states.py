"""The metrics show every mirror state, leg health and running copy (issue 16, item 5).

One daemon serves a mirror in each state (tests/daemon/metricszoo.py: real mirrors put there by
their own operations and held); one scrape is parsed with prometheus_client's parser.  For each
mirror, exactly one ``targetmirror_mirror_state`` series is 1 and it is the mirror's state; the
legs' state and health, the mirror's health and the running copy's kind are the expected ones.
The zoo covers every member of the state table, so a state added to it fails this test until
the metrics know it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from targetmirror.daemon.metrics import (
    LEG_HEALTH,
    LEG_STATES,
    MIRROR_HEALTH,
    MIRROR_STATES,
    RESYNC_KINDS,
    leg_states,
)
from targetmirror.mirror.state import State
from tests.daemon.metricszoo import SIZE, Zoo

Samples = dict[str, list[tuple[dict[str, str], float]]]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zoo]:
    z = Zoo(tmp_path_factory.mktemp("zoo"))
    try:
        yield z.build()
    finally:
        z.close()


@pytest.fixture(scope="module")
def samples(zoo: Zoo) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(zoo.render()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def series(samples: Samples, name: str, **match: str) -> dict[tuple[str, ...], float]:
    """``{label values other than those matched: value}`` of one metric."""
    out = {}
    for labels, value in samples.get(name, []):
        if all(labels.get(k) == v for k, v in match.items()):
            out[tuple(v for k, v in sorted(labels.items()) if k not in match)] = value
    return out


def the_one(samples: Samples, name: str, **match: str) -> str:
    """The single label value whose series is 1 (the others must be 0)."""
    got = series(samples, name, **match)
    ones = [k for k, v in got.items() if v == 1]
    assert len(ones) == 1 and all(v in (0, 1) for v in got.values()), (name, match, got)
    return ones[0][0]


def test_the_zoo_covers_every_state_of_the_table(zoo: Zoo) -> None:
    assert set(MIRROR_STATES) == {s.value for s in State}
    assert {e.state for e in zoo.expect.values()} == set(MIRROR_STATES)
    assert {e.copy for e in zoo.expect.values()} - {None} == set(RESYNC_KINDS)
    assert {e.health for e in zoo.expect.values()} == set(MIRROR_HEALTH)
    shown = {ls for e in zoo.expect.values() for ls, _ in e.legs.values()}
    assert shown == set(LEG_STATES) - {"unknown"}
    assert {lh for e in zoo.expect.values() for _, lh in e.legs.values()} == set(LEG_HEALTH)


def test_each_mirror_shows_exactly_its_state(zoo: Zoo, samples: Samples) -> None:
    for name, exp in zoo.expect.items():
        assert zoo.daemon.registry.by_name(name).mirror.state == exp.state, name
        # every state of the table is a series, 1 for this mirror's only
        got = series(samples, "targetmirror_mirror_state", mirror=name)
        assert {k[0] for k in got} == set(MIRROR_STATES), name
        assert the_one(samples, "targetmirror_mirror_state", mirror=name) == exp.state, name
        assert the_one(samples, "targetmirror_mirror_health", mirror=name) == exp.health, name


def test_each_leg_shows_its_state_and_health(zoo: Zoo, samples: Samples) -> None:
    for name, exp in zoo.expect.items():
        for leg, (state, health) in exp.legs.items():
            assert the_one(samples, "targetmirror_leg_state", mirror=name, leg=leg) == state, \
                (name, leg)
            assert the_one(samples, "targetmirror_leg_health", mirror=name, leg=leg) == \
                health, (name, leg)


def test_a_failed_leg_says_why_and_when(samples: Samples) -> None:
    fails = {(lab["mirror"], lab["leg"]): lab for lab, v in
             samples["targetmirror_leg_failure_info"] if v == 1}
    assert set(fails) == {("z_degraded", "b"), ("z_failed", "a"), ("z_failed", "b")}
    lab = fails[("z_degraded", "b")]
    assert lab["errno"] == "EIO" and lab["kind"] == "write"
    assert "injected eio" in lab["reason"] and "z_degraded.b.img" in lab["reason"]
    when = series(samples, "targetmirror_leg_failed_timestamp_seconds", mirror="z_degraded")
    assert when[("b",)] > 1.6e9


def test_the_running_copy_and_its_progress(zoo: Zoo, samples: Samples) -> None:
    for name, exp in zoo.expect.items():
        active = series(samples, "targetmirror_resync_active", mirror=name)
        assert {k[0] for k in active} == set(RESYNC_KINDS), name
        running = [k[0] for k, v in active.items() if v == 1]
        assert running == ([exp.copy] if exp.copy else []), name
        failed = series(samples, "targetmirror_resync_failed", mirror=name)
        assert set(failed.values()) == {0.0}, name
        if exp.copy is None:
            continue
        copied = series(samples, "targetmirror_resync_bytes_copied", mirror=name,
                        kind=exp.copy)[()]
        ratio = series(samples, "targetmirror_resync_progress_ratio", mirror=name,
                       kind=exp.copy)
        if exp.copy == "recovery":  # held on its first read: nothing copied yet
            assert copied == 0, name
        else:
            assert copied > 0, name
            assert 0 < ratio[()] < 1, (name, ratio)
    # the sync and the verify are held half way; a rejoin knows its regions
    assert series(samples, "targetmirror_resync_size_bytes", mirror="z_syncing",
                  kind="sync")[()] == SIZE
    assert series(samples, "targetmirror_resync_progress_ratio", mirror="z_syncing",
                  kind="sync")[()] == 0.5
    assert series(samples, "targetmirror_resync_size_regions", mirror="z_rejoin",
                  kind="rejoin")[()] == 3
    assert series(samples, "targetmirror_resync_progress_ratio", mirror="z_verify",
                  kind="verify")[()] == 0.5
    assert series(samples, "targetmirror_resync_started_timestamp_seconds",
                  mirror="z_verify", kind="verify")[()] > 1.6e9


def test_a_held_command_is_reported_stuck(samples: Samples) -> None:
    assert series(samples, "targetmirror_stuck_commands", device="z_splitting")[()] == 1
    assert series(samples, "targetmirror_stuck_commands", device="z_split")[()] == 0
    assert series(samples, "targetmirror_oldest_command_seconds",
                  device="z_splitting")[()] > 0.3


def test_volume_2_does_not_repeat_its_mirrors_state(samples: Samples) -> None:
    assert not series(samples, "targetmirror_mirror_state", mirror="z_oneway_v2")
    assert series(samples, "targetmirror_commands_total", mirror="z_oneway_v2",
                  direction="write")[()] == 0


def test_scheduled_splits_are_exported(samples: Samples) -> None:
    sched = samples["targetmirror_scheduled_split_timestamp_seconds"]
    assert [(lab["mirrors"], lab["state"]) for lab, _ in sched] == [("z_mirrored", "pending")]
    outcomes = series(samples, "targetmirror_scheduled_splits_total")
    assert set(outcomes) == {("taken",), ("failed",), ("missed",)}


def test_process_metrics_are_there(samples: Samples) -> None:
    assert samples["process_resident_memory_bytes"][0][1] > 0


def test_leg_states_helper_matches_the_view() -> None:
    assert leg_states("split") == ("frozen", "live")
    assert leg_states("one-way") == ("one-way", "live")
    assert leg_states("rejoining") == ("resyncing", "live")
