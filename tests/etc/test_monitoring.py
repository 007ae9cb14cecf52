"""The shipped monitoring: etc/prometheus/targetmirror.rules.yml and etc/grafana/targetmirror.json.

* Prometheus's own ``promtool`` loads the rules (``check rules``), runs their unit tests with
  input series (``test rules``, tests/etc/targetmirror.rules.test.yml), parses every dashboard
  query (wrapped as recording rules), lints one scrape of a real daemon (``check metrics``), and
  evaluates the dashboard's state tables on that scrape (each mirror's and leg's row right).
* Every metric the rules and the dashboard name is one the daemon exports: one scrape of a
  daemon serving a mirror in every state (tests/daemon/metricszoo.py) is compared with the
  names found in every expression (tests/etc/promql.py).

promtool is Debian's (package ``prometheus``); lab/install-host-deps.sh unpacks it into
``~/.cache/targetmirror/promtool`` without installing the server.  Where it cannot be had the
promtool tests are skipped, saying so; the name comparison needs no promtool.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from targetmirror import express
from tests.daemon.metricszoo import Zoo
from tests.etc.promql import dashboard_exprs, grafana_to_promql, metric_names, rules_exprs

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "etc" / "prometheus" / "targetmirror.rules.yml"
RULES_TEST = REPO / "tests" / "etc" / "targetmirror.rules.test.yml"
DASHBOARD = REPO / "etc" / "grafana" / "targetmirror.json"
SCRAPER_METRICS = {"up"}
"""Series Prometheus makes itself for every target (not exported by the daemon)."""


def promtool() -> str | None:
    """$TARGETMIRROR_PROMTOOL, promtool on PATH, or the copy lab/install-host-deps.sh keeps."""
    env = os.environ.get("TARGETMIRROR_PROMTOOL")
    if env:
        return env
    found = shutil.which("promtool")
    if found:
        return found
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cached = cache / "targetmirror" / "promtool" / "usr" / "bin" / "promtool"
    return str(cached) if cached.is_file() and os.access(cached, os.X_OK) else None


@pytest.fixture(scope="module")
def tool() -> str:
    path = promtool()
    if path is None:
        pytest.skip("promtool not found: it ships in Debian's 'prometheus' package, which "
                    "lab/install-host-deps.sh unpacks (apt-get download) into "
                    "~/.cache/targetmirror/promtool; run it as root, or set "
                    "TARGETMIRROR_PROMTOOL")
    return path


def run(tool: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, *args], input=stdin, capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zoo]:
    z = Zoo(tmp_path_factory.mktemp("monitoring-zoo"))
    try:
        yield z.build()
    finally:
        z.close()


@pytest.fixture(scope="module")
def scrape(zoo: Zoo) -> str:
    return zoo.render()


@pytest.fixture(scope="module")
def exported(scrape: str) -> set[str]:
    """Every sample name of one scrape (``_total``, ``_bucket``, ``_info`` ... included)."""
    return {s.name for fam in text_string_to_metric_families(scrape) for s in fam.samples}


def rules() -> dict[str, Any]:
    data = yaml.safe_load(RULES.read_text())
    assert isinstance(data, dict)
    return data


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def named(exprs: Iterator[tuple[str, str]]) -> dict[str, set[str]]:
    """metric name -> where it is named."""
    out: dict[str, set[str]] = {}
    for where, expr in exprs:
        for name in metric_names(expr):
            out.setdefault(name, set()).add(where)
    return out


# -- promtool ----------------------------------------------------------------------------------

def test_promtool_loads_the_rules(tool: str) -> None:
    res = run(tool, "check", "rules", str(RULES))
    print(res.stdout, res.stderr)
    assert res.returncode == 0, res.stdout + res.stderr
    n = sum(len(g["rules"]) for g in rules()["groups"])
    assert f"SUCCESS: {n} rules found" in res.stdout


def test_the_alerts_fire_when_they_should(tool: str) -> None:
    res = run(tool, "test", "rules", str(RULES_TEST))
    print(res.stdout, res.stderr)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_has_a_unit_test() -> None:
    tested = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert tested == {r["alert"] for g in rules()["groups"] for r in g["rules"]}


def test_promtool_parses_every_dashboard_query(tool: str, tmp_path: Path) -> None:
    exprs = list(dashboard_exprs(dashboard()))
    wrapped = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(wrapped))
    res = run(tool, "check", "rules", str(path))
    assert res.returncode == 0, "\n".join(f"{w}: {e}" for w, e in exprs) + res.stdout + res.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in res.stdout


def test_a_scrape_passes_promtools_lint(tool: str, scrape: str) -> None:
    res = run(tool, "check", "metrics", stdin=scrape)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), \
        res.stdout + res.stderr


def _labels(labels: dict[str, str]) -> str:
    def q(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{q(v)}"' for k, v in sorted(labels.items())) + "}"


def test_the_dashboards_tables_show_each_mirror_right(tool: str, zoo: Zoo, scrape: str,
                                                      tmp_path: Path) -> None:
    """The scrape as Prometheus would store it, the dashboard's main queries evaluated on it
    by promtool: each mirror's row has its state, health and epoch, each leg its state and
    health, and the running copies are exactly the expected ones."""
    target = {"instance": "zoo:9745", "job": "targetmirror"}
    series = []
    samples = [(s.name, {**s.labels, **target}, s.value)
               for fam in text_string_to_metric_families(scrape) for s in fam.samples]
    for name, labels, value in samples:
        if value == value and abs(value) != float("inf"):  # no NaN, no infinities
            series.append({"series": name + _labels(labels), "values": f"{value!r}x5"})
    queries = {p["title"]: grafana_to_promql(p["targets"][0]["expr"])
               for p in dashboard()["panels"] if p.get("targets")}
    expect_mirrors, expect_legs, expect_copies = [], [], []
    for name, exp in zoo.expect.items():
        epoch = zoo.daemon.registry.by_name(name).mirror.epoch
        expect_mirrors.append({"labels": _labels({**target, "mirror": name, "state": exp.state,
                                                  "health": exp.health}), "value": epoch})
        for leg, (state, health) in exp.legs.items():
            expect_legs.append({"labels": _labels({**target, "mirror": name, "leg": leg,
                                                   "state": state, "health": health}),
                                "value": 1})
    active = {(lab["mirror"], lab["kind"]) for n, lab, v in samples
              if n == "targetmirror_resync_active" and v == 1}
    assert active == {(n, e.copy) for n, e in zoo.expect.items() if e.copy}
    for n, lab, v in samples:
        if n == "targetmirror_resync_progress_ratio" and (lab["mirror"], lab["kind"]) in active:
            expect_copies.append({"labels": "targetmirror_resync_progress_ratio" + _labels(lab),
                                  "value": v})
    test = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series, "promql_expr_test": [
            {"expr": queries["Mirrors"], "eval_time": "2m", "exp_samples": expect_mirrors},
            {"expr": queries["Legs"], "eval_time": "2m", "exp_samples": expect_legs},
            {"expr": queries["Copies running"], "eval_time": "2m",
             "exp_samples": expect_copies}]}]}
    path = tmp_path / "dashboard.test.yml"
    path.write_text(yaml.safe_dump(test, width=1000))
    res = run(tool, "test", "rules", str(path))
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr
    assert len(expect_mirrors) == len(zoo.expect) and len(expect_copies) == 6


# -- the names ---------------------------------------------------------------------------------

def test_every_metric_the_rules_name_is_exported(exported: set[str]) -> None:
    names = named(rules_exprs(rules()))
    assert len(names) >= 10, names
    missing = {n: sorted(w) for n, w in names.items()
               if n not in exported and n not in SCRAPER_METRICS}
    assert not missing, f"named by the rules but not exported: {missing}"


def test_every_metric_the_dashboard_names_is_exported(exported: set[str]) -> None:
    names = named(dashboard_exprs(dashboard()))
    assert len(names) >= 20, names
    excused = set()
    if not express.available():  # its counters exist only where the lane is built
        excused = {n for n in names if n.startswith("targetmirror_express_")}
        print(f"not compared (express lane off: {express.WHY_NOT}): {sorted(excused)}")
    missing = {n: sorted(w) for n, w in names.items() if n not in exported | excused}
    assert not missing, f"named by the dashboard but not exported: {missing}"


def test_the_comparison_catches_a_metric_that_is_not_exported(exported: set[str]) -> None:
    names = named(iter([("x", 'sum(rate(targetmirror_no_such_total{mirror="$m"}[5m])) / '
                                'on (mirror) targetmirror_mirror_size_bytes')]))
    assert set(names) == {"targetmirror_no_such_total", "targetmirror_mirror_size_bytes"}
    assert {n for n in names if n not in exported} == {"targetmirror_no_such_total"}


def test_the_name_finder() -> None:
    cases = {
        'rate(a_total{x="y{z}"}[5m]) / on (m) group_left(reason) b_info': {"a_total", "b_info"},
        'histogram_quantile(0.99, sum by (le) (rate(h_bucket[1m])))': {"h_bucket"},
        '(time() - t > 24 * 3600) and on (i) (s{state=~"a|b"} == 1)': {"t", "s"},
        'sum(x) by (a) offset 5m + 1e9 - 0x1f': {"x"},
        'max_over_time(deriv(y[$__rate_interval])[1h:5m])': {"y"},
    }
    from tests.etc.promql import grafana_to_promql
    for expr, want in cases.items():
        assert metric_names(grafana_to_promql(expr)) == want, expr


# -- the dashboard's shape -------------------------------------------------------------------

def test_the_dashboard_is_importable_as_is() -> None:
    d = dashboard()
    assert d["uid"] == "targetmirror" and d["schemaVersion"] >= 30
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    ids: list[int] = []
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        ids.append(p["id"])
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):       # no two panels overlap
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p.get("description"), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]
    assert len(set(ids)) == len(ids)
    assert {v["name"] for v in d["templating"]["list"]} == {"job", "instance", "mirror"}
