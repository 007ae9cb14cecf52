"""pytest integration of the lab: tests marked ``lab`` run inside one guest boot per session.

On the host, the lab items are never set up or called. The first time pytest reaches one, this
plugin boots the guest once and runs ``python3 -m pytest <every selected lab node id>`` in it;
the guest side of the same plugin records every test report as a JSON line in the output
share. Each host item then replays the guest's reports for its own node id, so a guest
failure, skip or xfail shows up on the host exactly as if the test had run there. A test the
guest never reported (crash, timeout, collection error) becomes an error, never a pass.

Inside the guest (``TARGETMIRROR_IN_GUEST=1``) the lab items are ordinary pytest tests; the
only addition is the recorder. The guest has Debian's pytest 7.2 while the host may have a much
newer pytest, so the guest side uses only long-stable report attributes.

When the host lacks QEMU (or lacks mmdebstrap and has no cached image), lab items are skipped
with the reason, unless ``CI=true``: a CI job that silently skips its real-kernel tests is
worse than a red one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import IO, Any

import pytest

LAB_MARK = "lab"
ENV_IN_GUEST = "TARGETMIRROR_IN_GUEST"
ENV_RESULTS = "TARGETMIRROR_LAB_RESULTS"
RESULTS_FILE = "results.jsonl"
DEFAULT_TIMEOUT = 3600.0
KEEP_OUT_DIRS = 5


#: Host environment variables with this prefix reach the guest's pytest unchanged: how a
#: lab test's long mode is asked for (``TARGETMIRROR_GUEST_SOAK_SECONDS=600 pytest -m lab``).
GUEST_ENV_PREFIX = "TARGETMIRROR_GUEST_"


def guest_env_from_host() -> dict[str, str]:
    """The ``TARGETMIRROR_GUEST_*`` variables of this (host) process, for the guest."""
    return {k: v for k, v in os.environ.items() if k.startswith(GUEST_ENV_PREFIX)}


def in_guest() -> bool:
    """True inside the lab guest, where lab tests really run."""
    return os.environ.get(ENV_IN_GUEST) == "1"


def addoption(parser: pytest.Parser) -> None:
    """Options of the host side (harmless in the guest). Called from tests/conftest.py."""
    group = parser.getgroup("targetmirror-lab", "targetmirror real-kernel lab")
    group.addoption("--lab-timeout", type=float,
                    default=float(os.environ.get("TARGETMIRROR_LAB_TIMEOUT", DEFAULT_TIMEOUT)),
                    help="seconds the whole guest run may take (default %(default)s; "
                         "env TARGETMIRROR_LAB_TIMEOUT)")
    group.addoption("--lab-out", default=None,
                    help="folder for the guest's console log, junit.xml and results "
                         "(cleared first; default: a new <repo>/lab-out/pytest-<time>-<pid>)")
    group.addoption("--lab-console", action="store_true", default=False,
                    help="echo the guest console (the guest's pytest -v output) live")


def configure(config: pytest.Config) -> None:
    """Register the guest recorder or the host runner. Called from tests/conftest.py."""
    if in_guest():
        results = os.environ.get(ENV_RESULTS)
        if results:
            config.pluginmanager.register(GuestRecorder(Path(results)), "targetmirror-lab-rec")
    else:
        config.pluginmanager.register(HostLabRunner(config), "targetmirror-lab-host")


# --------------------------------------------------------------------------- guest side


class GuestRecorder:
    """Writes one JSON line per test report (and per failed collection) for the host."""

    def __init__(self, path: Path) -> None:
        self._fh: IO[str] = path.open("a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record: dict[str, Any] = {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "duration": report.duration,
            "sections": [list(s) for s in report.sections],
        }
        if hasattr(report, "wasxfail"):
            record["wasxfail"] = report.wasxfail
        longrepr = report.longrepr
        if report.skipped and isinstance(longrepr, tuple) and len(longrepr) == 3:
            record["skip"] = [str(longrepr[0]), longrepr[1], str(longrepr[2])]
        elif longrepr is not None:
            record["longrepr"] = report.longreprtext
            crash = getattr(longrepr, "reprcrash", None)
            if crash is not None:
                record["crash"] = str(getattr(crash, "message", ""))
        self._write(record)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._write({"nodeid": report.nodeid, "when": "collect", "outcome": "failed",
                         "longrepr": report.longreprtext})

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self._fh.close()


# --------------------------------------------------------------------------- host side


class HostLabRunner:
    """Boots the guest once for all selected lab items and replays the guest's reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.lab_items: list[pytest.Item] = []
        self.ran = False
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.collect_errors: dict[str, str] = {}
        self.lab_failure: str | None = None  # the lab itself broke: every lab item errors
        self.skip_reason: str | None = None  # no emulator here (and not CI): skip them all
        self.summary: list[str] = []
        self.failure_shown = False
        self.booted = False  # QEMU was started (results may exist even if it then failed)

    # -- collection

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.lab_items = [i for i in session.items if i.get_closest_marker(LAB_MARK)]

    # -- running

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None
                                ) -> bool | None:
        if item.get_closest_marker(LAB_MARK) is None:
            return None
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        if not self.ran:
            self.ran = True
            self._run_guest()
        for report in self._reports_for(item):
            ihook.pytest_runtest_logreport(report=report)
        # pytest's own protocol ends every item by tearing down the host-side collectors the
        # next item does not share (teardown_exact). Skipping that here left a package set up
        # by a host test beside the lab tests (tests/lab/test_conformance_parser.py) on the
        # stack, and the first host test after the lab items errored with "previous item was
        # not torn down properly". There is no public hook for it, hence the private name.
        item.session._setupstate.teardown_exact(nextitem)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _say(self, msg: str) -> None:
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"[lab] {msg}")
        else:
            print(f"[lab] {msg}", file=sys.stderr, flush=True)

    def _out_dir(self) -> Path:
        """A fresh folder for this session's guest output.

        Several pytest sessions may share a checkout (parallel developers, CI jobs), so the
        default is one folder per session, ``lab-out/pytest-<time>-<pid>``, with the newest
        few kept and ``lab-out/pytest-latest`` pointing at the newest.
        """
        from lab import REPO_ROOT

        opt = self.config.getoption("--lab-out")
        if opt:
            out = Path(opt).resolve()
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            return out
        base = REPO_ROOT / "lab-out"
        base.mkdir(exist_ok=True)
        out = base / f"pytest-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        out.mkdir()
        latest = base / "pytest-latest"
        tmp = base / f".pytest-latest-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(out.name)
        os.replace(tmp, latest)
        old = sorted(p for p in base.glob("pytest-2*") if p.is_dir())[:-KEEP_OUT_DIRS]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        return out

    def _availability(self) -> str | None:
        """Why the lab cannot run on this host, or None if it can."""
        from lab import image, vm

        if not vm.qemu_available():
            return f"{vm.QEMU} is not installed (run lab/install-host-deps.sh)"
        if image.cached_image() is None and shutil.which("mmdebstrap") is None:
            return "mmdebstrap is not installed and no lab image is cached " \
                   "(run lab/install-host-deps.sh)"
        return None

    def _run_guest(self) -> None:
        from lab import GUEST_OUT, REPO_ROOT, LabError, image, vm

        missing = self._availability()
        if missing is not None:
            if os.environ.get("CI", "").lower() == "true":
                self.lab_failure = f"lab unavailable on a CI host (CI=true): {missing}"
            else:
                self.skip_reason = f"real-kernel lab unavailable: {missing}"
            return

        guest_ids = [self._guest_id(i) for i in self.lab_items]
        out_dir = self._out_dir()
        echo = self.config.getoption("--lab-console")
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        start = time.monotonic()
        try:
            img = image.cached_image()
            if img is None:
                self._say("no lab image for this recipe yet: building it (takes minutes)")
                img = image.ensure_image(log=self._say)
            self._say(f"booting the lab guest for {len(guest_ids)} test(s); "
                      f"console: {out_dir / vm.CONSOLE_LOG}")
            cmd = ["python3", "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rA",
                   "--color=no", f"--junitxml={GUEST_OUT}/junit.xml", *guest_ids]
            self.booted = True
            ctx = (capman.global_and_fixture_disabled() if echo and capman is not None
                   else nullcontext())
            with ctx:
                result = vm.run(cmd, image=img, out_dir=out_dir, repo=REPO_ROOT,
                                timeout=float(self.config.getoption("--lab-timeout")),
                                env={ENV_RESULTS: f"{GUEST_OUT}/{RESULTS_FILE}",
                                     **guest_env_from_host()},
                                echo=sys.stdout if echo else None)
        except LabError as exc:
            self.lab_failure = f"lab run failed: {exc}"
            self.summary.append(f"lab run failed after {time.monotonic() - start:.0f} s: "
                                f"{str(exc).splitlines()[0]}")
            self._load_results(out_dir)  # whatever the guest managed to report
            return
        self._load_results(out_dir)
        boot = f", boot {result.boot_s:.1f} s" if result.boot_s is not None else ""
        line = (f"guest pytest exit status {result.status} after {result.duration_s:.0f} s"
                f"{boot}; console: {result.console_log}; junit: {out_dir / 'junit.xml'}")
        self._say(line)
        self.summary.append(line)
        if result.status not in (0, 1):
            self.lab_failure = (f"guest pytest exited with status {result.status} "
                                f"(see {result.console_log})\n--- console tail ---\n"
                                f"{result.console_tail()}")

    def _load_results(self, out_dir: Path) -> None:
        path = out_dir / RESULTS_FILE
        if not path.is_file():
            return
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if rec.get("when") == "collect":
                self.collect_errors[rec["nodeid"]] = rec.get("longrepr", "")
            else:
                self.results.setdefault(rec["nodeid"], []).append(rec)

    @staticmethod
    def _guest_id(item: pytest.Item) -> str:
        """The node id as the guest sees it (rootdir = the repository at /src)."""
        from lab import REPO_ROOT

        rel = item.path.resolve().relative_to(REPO_ROOT).as_posix()
        _, sep, rest = item.nodeid.partition("::")
        return rel + sep + rest

    # -- reports

    def _reports_for(self, item: pytest.Item) -> Iterator[pytest.TestReport]:
        if self.skip_reason is not None:
            yield _report(item, "setup", "skipped", _skip_longrepr(item, self.skip_reason))
            yield _report(item, "teardown", "passed", None)
            return
        records = self.results.get(self._guest_id(item), [])
        for rec in records:
            yield _replay(item, rec)
        if any(r["when"] == "teardown" for r in records):
            return
        # The guest never finished this test: it is an error, whatever came before.
        why = self._missing_reason(item, records)
        when = "call" if records and records[-1]["when"] == "setup" and \
            records[-1]["outcome"] == "passed" else ("teardown" if records else "setup")
        yield _report(item, when, "failed", why)
        if when != "teardown":
            yield _report(item, "teardown", "passed", None)

    def _missing_reason(self, item: pytest.Item, records: list[dict[str, Any]]) -> str:
        gid = self._guest_id(item)
        for nodeid, text in self.collect_errors.items():
            if gid == nodeid or gid.startswith(nodeid + "::") or not nodeid:
                return f"[lab guest] collection of {nodeid or 'the session'} failed:\n{text}"
        if not self.booted and self.lab_failure:
            return f"[lab] {self.lab_failure}"
        state = "did not finish" if records else "was never reported by"
        msg = f"[lab guest] {gid} {state} the guest run"
        if self.lab_failure:
            if self.failure_shown:  # the full story (with log tail) went with the first one
                msg += f": {self.lab_failure.splitlines()[0]} (details: first lab error above)"
            else:
                msg += f":\n{self.lab_failure}"
                self.failure_shown = True
        return msg

    # -- summary

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.ran:
            return
        terminalreporter.section("targetmirror lab")
        if self.skip_reason:
            terminalreporter.write_line(f"lab tests skipped: {self.skip_reason}")
        for line in self.summary:
            terminalreporter.write_line(line)


class _Crash:
    """Stands in for pytest's ReprFileLocation: the short summary shows ``message``."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.path = ""
        self.lineno = 0


class GuestLongrepr:
    """A failure text from the guest, printed as the guest printed it, with its one-line
    crash message (for the short summary and junit) when the guest had one."""

    def __init__(self, text: str, crash: str | None) -> None:
        self.text = text
        if crash:
            self.reprcrash = _Crash(f"[lab guest] {crash}")

    def toterminal(self, tw: Any) -> None:
        tw.line("[ran in the lab guest]")
        for line in self.text.splitlines():
            tw.line(line)

    def __str__(self) -> str:
        return "[ran in the lab guest]\n" + self.text


def _report(item: pytest.Item, when: str, outcome: str, longrepr: Any,
            duration: float = 0.0, sections: list[tuple[str, str]] | None = None
            ) -> pytest.TestReport:
    return pytest.TestReport(
        nodeid=item.nodeid, location=item.location,
        keywords=dict.fromkeys(item.keywords, 1), outcome=outcome,  # type: ignore[arg-type]
        longrepr=longrepr, when=when, sections=sections or [],  # type: ignore[arg-type]
        duration=duration, user_properties=item.user_properties,
    )


def _skip_longrepr(item: pytest.Item, reason: str, lineno: int | None = None
                   ) -> tuple[str, int, str]:
    line = lineno if lineno is not None else (item.location[1] or 0) + 1
    return (str(item.path), line, f"Skipped: {reason}" if not reason.startswith("Skipped")
            else reason)


def _replay(item: pytest.Item, rec: dict[str, Any]) -> pytest.TestReport:
    """A host report equal to one the guest made (paths mapped back to the host)."""
    from lab import GUEST_SRC, REPO_ROOT

    longrepr: Any = None
    if "skip" in rec:
        path, lineno, reason = rec["skip"]
        if path.startswith(GUEST_SRC + "/"):
            path = str(REPO_ROOT / path[len(GUEST_SRC) + 1:])
        longrepr = (path, lineno, reason)
    elif rec.get("longrepr"):
        longrepr = GuestLongrepr(rec["longrepr"], rec.get("crash"))
    report = _report(item, rec["when"], rec["outcome"], longrepr,
                     duration=float(rec.get("duration") or 0.0),
                     sections=[(s[0], s[1]) for s in rec.get("sections", [])])
    if "wasxfail" in rec:
        report.wasxfail = rec["wasxfail"]
    return report
