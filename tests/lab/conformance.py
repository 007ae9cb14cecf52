"""libiscsi's conformance suite (``iscsi-test-cu``) against three backstores in one guest.

Used by ``tests/lab/test_lab_conformance.py`` (a CI subset) and by
``benchmarks/lab_conformance.py`` (the whole suite, a table and JSON).

Why it is shaped this way:

* ``iscsi-test-cu`` is run once per *suite* (``SCSI.Read10``, ...), each with its own timeout,
  so a suite that hangs on one backstore costs that suite only, not the whole run.
* CUnit counts a skipped test as passed; libiscsi prints ``[SKIPPED]`` inside the test's block
  of the verbose output, so the result of each test is read from that output
  (``Test: NAME ...`` up to ``passed``/``FAILED``), not from the summary line.
* The suite logs in with two initiator names of its own (``-i``/``-I``: reservation tests use a
  second nexus); every target gets a node ACL for both, as a real deployment would have.
* LIO writes persistent-reservation metadata under ``/etc/target/pr``: without that directory
  every PR test fails with NOT READY (a lab artefact, not a backstore property).

The parser (:func:`parse_output`) is pure and unit-tested on the host.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.lab import guest

INITIATOR_1 = "iqn.2024-01.org.targetmirror.lab:conformance-1"
INITIATOR_2 = "iqn.2024-01.org.targetmirror.lab:conformance-2"
SIZE = 64 * guest.MiB
#: Backstore names in the table, in the order they are run.
BACKSTORES = ("user:mirror", "user:file", "fileio")
#: Per-suite timeout: a suite that takes longer is recorded as hung.
SUITE_TIMEOUT = 240.0

PASS, FAIL, SKIP, HUNG = "pass", "fail", "skip", "hung"

_TEST_RE = re.compile(r"^\s*Test: (?P<name>\S+) \.\.\.(?P<rest>.*)$")
_SUITE_RE = re.compile(r"^Suite: (?P<name>\S+)")
_VERDICT_RE = re.compile(r"^\s*(passed|FAILED)\b")


def parse_output(suite: str, text: str) -> dict[str, str]:
    """``{'SCSI.Read10.Simple': 'pass'|'fail'|'skip'}`` from iscsi-test-cu's verbose output.

    A test's block runs from its ``Test: NAME ...`` line to the next test or suite line. Its
    verdict is CUnit's: the last ``passed`` or ``FAILED`` that starts a line of the block or
    follows the ``...`` at once (the suite's own ``[FAILED] ...`` log lines do not count, nor
    does what a suite's clean-up prints after a verdict on the same line).  A passed test whose
    block says ``[SKIPPED]`` was skipped.  A test with no verdict (the process died or hung in
    it) is left out; the caller reports its suite as hung.
    """
    results: dict[str, str] = {}
    current: str | None = None
    verdict: str | None = None
    skipped = False

    def close() -> None:
        if current is not None and verdict is not None:
            results[current] = SKIP if verdict == PASS and skipped else verdict

    for line in text.splitlines():
        m = _TEST_RE.match(line)
        if m:
            close()
            current, verdict, skipped = f"{suite}.{m.group('name')}", None, False
            line = m.group("rest")
        elif _SUITE_RE.match(line) or line.startswith("Run Summary"):
            close()
            current = None
            continue
        if current is None:
            continue
        if "[SKIPPED]" in line:
            skipped = True
        m = _VERDICT_RE.search(line)
        if m:
            verdict = PASS if m.group(1) == "passed" else FAIL
    close()
    return results


def list_suites(families: Sequence[str] = ("SCSI", "iSCSI")) -> list[str]:
    """``FAMILY.SUITE`` names offered by this iscsi-test-cu (from ``--list``)."""
    out = guest.run(["iscsi-test-cu", "--list"]).stdout
    suites: list[str] = []
    for word in out.split():
        parts = word.split(".")
        if len(parts) >= 2 and parts[0] in families:
            name = ".".join(parts[:2])
            if name not in suites:
                suites.append(name)
    return suites


@dataclass
class SuiteRun:
    """One suite on one backstore."""

    suite: str
    results: dict[str, str]
    seconds: float
    hung: bool
    output: str = field(repr=False)


def run_suite(url: str, suite: str, *, timeout: float = SUITE_TIMEOUT) -> SuiteRun:
    """Run one suite (``--dataloss``: the LUN is scratch) and parse its verbose output."""
    cmd = ["iscsi-test-cu", "--dataloss", "-i", INITIATOR_1, "-I", INITIATOR_2, "-t", suite,
           url]
    t0 = time.monotonic()
    hung = False
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        hung = True
        raw = exc.stdout or b""
        out = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return SuiteRun(suite, parse_output(suite, out), time.monotonic() - t0, hung, out)


def export_two_acls(so: Any, iqn: str) -> str:
    """Export ``so`` over iSCSI as ``iqn`` (LUN 0) with node ACLs for both suite initiators;
    returns the libiscsi URL."""
    from rtslib_fb import LUN, TPG, FabricModule, MappedLUN, NetworkPortal, NodeACL, Target

    target = Target(FabricModule("iscsi"), wwn=iqn)
    try:
        tpg = TPG(target, 1)
        tpg.set_attribute("authentication", "0")
        tpg.set_attribute("generate_node_acls", "0")
        NetworkPortal(tpg, guest.PORTAL_IP, guest.PORTAL_PORT)
        lun = LUN(tpg, lun=0, storage_object=so)
        for name in (INITIATOR_1, INITIATOR_2):
            MappedLUN(NodeACL(tpg, name), 0, lun)
        tpg.enable = True
    except BaseException:
        target.delete()
        raise
    return url_for(iqn)


def url_for(iqn: str) -> str:
    return f"iscsi://{guest.PORTAL_IP}:{guest.PORTAL_PORT}/{iqn}/0"


def prepare_pr_dirs() -> None:
    """LIO's APTPL metadata directories (see the module docstring)."""
    for d in ("/etc/target/pr", "/etc/rtslib-fb-target/pr"):
        Path(d).mkdir(parents=True, exist_ok=True)


def setup_luns(work: Path, runner: guest.TcmuRunner, daemon: Any) -> dict[str, str]:
    """Create the three LUNs (64 MiB, guest tmpfs) and return ``{backstore: url}``.

    ``daemon`` is a running :class:`tests.lab.mirrord.Mirrord`.
    """
    from tests.lab.mirrord import cli

    prepare_pr_dirs()
    urls: dict[str, str] = {}
    iqn = f"{guest.IQN_PREFIX}:conf-mirror"
    cli("create", "conf_mirror", "--size", str(SIZE), "--image-a", str(work / "m-a.img"),
        "--image-b", str(work / "m-b.img"), "--create-images", "--iqn", iqn,
        "--initiator", INITIATOR_1, "--initiator", INITIATOR_2)
    daemon.wait_serving("conf_mirror")
    urls["user:mirror"] = url_for(iqn)
    so = guest.create_user_file("conf_file", work / "file.img", SIZE)
    runner.wait_for_device(so.name)
    urls["user:file"] = export_two_acls(so, f"{guest.IQN_PREFIX}:conf-file")
    so = guest.create_fileio("conf_fileio", work / "fileio.img", SIZE)
    urls["fileio"] = export_two_acls(so, f"{guest.IQN_PREFIX}:conf-fileio")
    return urls


@dataclass
class Table:
    """Per-backstore results: ``results[backstore][test] = pass|fail|skip|hung``."""

    results: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    hung_suites: dict[str, list[str]] = field(default_factory=dict)

    def add(self, backstore: str, run: SuiteRun) -> None:
        self.results.setdefault(backstore, {}).update(run.results)
        self.seconds[backstore] = self.seconds.get(backstore, 0.0) + run.seconds
        if run.hung:
            self.hung_suites.setdefault(backstore, []).append(run.suite)

    def counts(self, backstore: str) -> dict[str, int]:
        c = {PASS: 0, FAIL: 0, SKIP: 0, HUNG: len(self.hung_suites.get(backstore, []))}
        for outcome in self.results.get(backstore, {}).values():
            c[outcome] += 1
        return c

    def tests(self) -> list[str]:
        names: set[str] = set()
        for per in self.results.values():
            names.update(per)
        return sorted(names)

    def regressions(self, ours: str = "user:mirror",
                    others: Sequence[str] = ("user:file", "fileio")) -> list[str]:
        """Tests that pass on every other backstore but not on ours."""
        out = []
        for test in self.tests():
            if all(self.results.get(o, {}).get(test) == PASS for o in others) and \
                    self.results.get(ours, {}).get(test) != PASS:
                out.append(test)
        return out

    def render(self) -> str:
        cols = list(self.results)
        lines = [f"{'backstore':12} {'pass':>5} {'fail':>5} {'skip':>5} {'hung suites':>11} "
                 f"{'seconds':>8}"]
        for b in cols:
            c = self.counts(b)
            lines.append(f"{b:12} {c[PASS]:5} {c[FAIL]:5} {c[SKIP]:5} {c[HUNG]:11} "
                         f"{self.seconds.get(b, 0.0):8.0f}")
        lines.append("")
        lines.append(f"{'test':55} " + " ".join(f"{b:>11}" for b in cols))
        for test in self.tests():
            row = [self.results[b].get(test, "-") for b in cols]
            if len(set(row)) > 1 or row[0] != PASS:
                lines.append(f"{test:55} " + " ".join(f"{r:>11}" for r in row))
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {"counts": {b: self.counts(b) for b in self.results},
                "seconds": self.seconds, "hung_suites": self.hung_suites,
                "results": self.results}


def run_all(urls: dict[str, str], suites: Iterable[str], *, log: Path | None = None,
            echo: bool = True, parallel: bool = True) -> Table:
    """Every suite on every backstore; outputs appended to ``log``.

    With ``parallel`` each backstore gets its own thread (its own LUN, target and initiator
    sessions, so the runs do not interact): the suite is latency-bound under TCG, and this
    cuts the wall time to about that of the slowest backstore.
    """
    table = Table()
    suites = list(suites)
    lock = threading.Lock()

    def one(backstore: str, url: str) -> None:
        for run in _runs(url, suites):
            with lock:
                table.add(backstore, run)
                if log is not None:
                    with log.open("a") as fh:
                        fh.write(f"===== {backstore} {run.suite} ({run.seconds:.1f} s"
                                 f"{', HUNG' if run.hung else ''})\n{run.output}\n")
                if echo:
                    c = {o: sum(1 for v in run.results.values() if v == o)
                         for o in (PASS, FAIL, SKIP)}
                    print(f"{backstore:12} {run.suite:32} {run.seconds:6.1f} s  pass "
                          f"{c[PASS]:3} fail {c[FAIL]:3} skip {c[SKIP]:3}"
                          f"{'  HUNG' if run.hung else ''}", flush=True)

    if not parallel:
        for backstore, url in urls.items():
            one(backstore, url)
        return table
    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        for fut in [pool.submit(one, b, u) for b, u in urls.items()]:
            fut.result()
    # the table's columns in the order given, whatever order the threads finished in
    table.results = {b: table.results.get(b, {}) for b in urls}
    return table


def _runs(url: str, suites: Iterable[str]) -> Iterator[SuiteRun]:
    for suite in suites:
        yield run_suite(url, suite)


def env_suites(default: Sequence[str]) -> list[str]:
    """Suites from ``TARGETMIRROR_GUEST_CONFORMANCE`` (``all`` or a comma list) or ``default``."""
    value = os.environ.get("TARGETMIRROR_GUEST_CONFORMANCE", "").strip()
    if not value:
        return list(default)
    if value.lower() == "all":
        return list_suites()
    return [s.strip() for s in value.split(",") if s.strip()]
