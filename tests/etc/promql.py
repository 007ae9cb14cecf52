"""Metric names in PromQL expressions (the shipped alert rules and Grafana dashboard).

Not a PromQL parser: a tokenizer that removes everything that is not a metric name -- string
literals, label matchers ``{...}``, range and subquery brackets ``[...]``, grouping label lists
(``by``/``without``/``on``/``ignoring``/``group_left``/``group_right (...)``), numbers and
durations -- and then keeps the identifiers that are not a function or aggregation (followed by
``(``) nor a keyword.  Prometheus itself checks that every expression *parses* (promtool, in
tests/etc/test_monitoring.py); this only answers which metrics an expression reads, which is
all the test needs.  Grafana's variables are replaced first (``$__rate_interval`` by a
duration, ``$var`` inside matchers by a regex).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset", "inf", "nan", "atan2", "start", "end"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_GRAFANA_DURATION = re.compile(r"\$__(?:rate_interval|interval|range)|\$\{__\w+\}")


def grafana_to_promql(expr: str) -> str:
    """A Grafana target's expression as plain PromQL (its variables replaced)."""
    expr = _GRAFANA_DURATION.sub("5m", expr)
    return re.sub(r"\$\{?\w+\}?|\[\[\w+\]\]", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads."""
    s = _STRING.sub(" ", expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    return {m.group(1) for m in _IDENT.finditer(s)
            if m.group(2) is None and m.group(1).lower() not in KEYWORDS}


def template_queries(text: str) -> Iterator[str]:
    """PromQL inside an alert's annotation template (``printf "QUERY" ... | query``)."""
    for m in re.finditer(r'printf\s+"((?:[^"\\]|\\.)*)"[^}]*\|\s*query', text):
        yield m.group(1).replace("%s", "x")


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(where, PromQL)`` of every panel target (rows included) and templating query."""
    def panels(items: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels") or [])

    for p in panels(dashboard.get("panels") or []):
        for t in p.get("targets") or []:
            if t.get("expr"):
                yield f"panel {p.get('title')!r} {t.get('refId')}", grafana_to_promql(t["expr"])
    for v in (dashboard.get("templating") or {}).get("list") or []:
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if not q:
            continue
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q) or \
            re.fullmatch(r"\s*query_result\((.*)\)\s*", q)
        assert m, f"templating variable {v.get('name')}: unexpected query {q!r}"
        yield f"variable {v.get('name')!r}", grafana_to_promql(m.group(1))


def rules_exprs(rules: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(where, PromQL)`` of every rule and every query in its annotations."""
    for g in rules["groups"]:
        for r in g["rules"]:
            name = r.get("alert") or r.get("record")
            yield f"rule {name}", str(r["expr"])
            for key, text in (r.get("annotations") or {}).items():
                for q in template_queries(str(text)):
                    yield f"rule {name} annotation {key}", q
