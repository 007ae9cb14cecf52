"""libiscsi's ``iscsi-test-cu`` against ``user:mirror``, tcmu-runner ``user:file`` and kernel
``fileio``, in one guest, suite by suite (see ``tests/lab/conformance.py``).

Asserts: ``user:mirror`` passes at least :data:`MIN_PASS` tests of the chosen suites (a number
that only goes up), no suite hangs on it, and every test that passes on *both* other backstores
passes on ours unless :data:`KNOWN_DIFFERENCES` lists it with its reason (docs/conformance.md).
The table is printed and written to the lab's output folder as ``conformance.json``.

CI runs :data:`CI_SUITES` (a few minutes under TCG).  The whole suite:
``TARGETMIRROR_GUEST_CONFORMANCE=all`` (or a comma list of FAMILY.SUITE) in the host environment;
``benchmarks/lab_conformance.py`` runs it outside pytest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.lab import conformance, guest
from tests.lab.mirrord import Mirrord

pytestmark = pytest.mark.lab

#: The CI subset: every cheap suite that covers the SBC/SPC commands initiators rely on, plus one
#: read, write, write-and-verify, write-same and compare-and-write suite.  Under TCG the
#: Read*/Write*/Verify*/Unmap suites loop over 1..256-block transfers and take 30-140 s each on
#: user:mirror (the whole suite: ~19 min per backstore), so the rest runs in the long mode.
CI_SUITES: tuple[str, ...] = (
    "SCSI.TestUnitReady",
    "SCSI.Mandatory",
    "SCSI.Inquiry",
    "SCSI.ReadCapacity10",
    "SCSI.ReadCapacity16",
    "SCSI.ModeSense6",
    "SCSI.ReportSupportedOpcodes",
    "SCSI.StartStopUnit",
    "SCSI.NoMedia",
    "SCSI.PreventAllow",
    "SCSI.PrinReadKeys",
    "SCSI.PrinServiceactionRange",
    "SCSI.PrinReportCapabilities",
    "SCSI.ProutRegister",
    "SCSI.ProutReserve",
    "SCSI.ProutClear",
    "SCSI.ProutPreempt",
    "SCSI.Reserve6",
    "SCSI.Read10",
    "SCSI.Write16",
    "SCSI.WriteVerify16",
    "SCSI.WriteSame10",
    "SCSI.CompareAndWrite",
)

#: For :data:`CI_SUITES`: user:mirror must pass at least this many, not counting
#: :data:`UNSTEADY` tests.  Only ever raise it (it went from 76 to 75 only when
#: Reserve6.ITNexusLoss joined UNSTEADY: the same bar over the steady tests).
MIN_PASS = 75
#: For the whole suite (``TARGETMIRROR_GUEST_CONFORMANCE=all``).  Only ever raise it.
MIN_PASS_ALL = 135

#: Tests that pass on user:file and fileio but not on user:mirror, with the reason; each is
#: explained in docs/conformance.md.
#: Tests whose outcome is decided in LIO's core, not in the backstore, and that were seen to flip
#: under TCG load: left out of the pass count (still run, and still checked by the
#: no-regression rule when both other backstores pass them).
UNSTEADY: dict[str, str] = {
    "SCSI.Reserve6.Logout":
        "RESERVE(6) release on logout is LIO core's; in one CI run (two guests on the host) it "
        "failed on user:mirror and user:file alike and passed on fileio, and passed in others",
    "SCSI.Reserve6.ITNexusLoss":
        "runs right after Reserve6.Logout: when Logout's reservation is still held (LIO core "
        "has not yet released the logged-out session's RESERVE), this test's first RESERVE(6) "
        "gets RESERVATION CONFLICT (seen once, on user:mirror, 2026-11-26)",
}

KNOWN_DIFFERENCES: dict[str, str] = {
    "SCSI.Reserve6.Logout":
        "flips on every backstore (LIO core's RESERVE release on logout): in five runs of "
        "2026-11-26 it failed on user:mirror three times, user:file once and fileio once; "
        "also in UNSTEADY; see docs/conformance.md",
    "SCSI.Reserve6.ITNexusLoss":
        "inherits Reserve6.Logout's leftover reservation when Logout flips (see UNSTEADY)",
    "SCSI.ReceiveCopyResults.OpParams":
        "third-party copy (EXTENDED COPY, RECEIVE COPY RESULTS) is not implemented (3PC=0); "
        "the test is skipped as unsupported on user:mirror",
}


def test_iscsi_test_cu_three_backstores(lio: object, tcmu_runner: guest.TcmuRunner,
                                        tmp_path: Path) -> None:
    suites = conformance.env_suites(CI_SUITES)
    whole = os.environ.get("TARGETMIRROR_GUEST_CONFORMANCE", "").lower() == "all"
    daemon = Mirrord(tmp_path / "targetmirrord.log")
    daemon.start()
    try:
        urls = conformance.setup_luns(tmp_path, tcmu_runner, daemon)
        out_dir = Path(os.environ.get("TARGETMIRROR_LAB_OUT", str(tmp_path)))
        table = conformance.run_all(urls, suites, log=out_dir / "conformance.log")
        (out_dir / "conformance.json").write_text(
            json.dumps({"suites": suites, **table.as_json()}, indent=1))
        print("\n" + table.render())
        ours = table.counts("user:mirror")
        ours["pass"] -= sum(1 for t, v in table.results.get("user:mirror", {}).items()
                            if v == conformance.PASS and t in UNSTEADY)
        print(f"user:mirror (passes not counting {sorted(UNSTEADY)}): {ours}")
        assert not table.hung_suites.get("user:mirror"), table.hung_suites
        unexplained = [t for t in table.regressions() if t not in KNOWN_DIFFERENCES]
        assert not unexplained, f"pass on user:file and fileio, not on user:mirror: {unexplained}"
        if whole:
            assert ours["pass"] >= MIN_PASS_ALL, ours
        elif list(suites) == list(CI_SUITES):
            assert ours["pass"] >= MIN_PASS, ours
    finally:
        guest.iscsi_logout_all()
        guest.clear_lio()
        status = daemon.stop()
        log = daemon.log_text()
        print(f"--- targetmirrord log (exit status {status}) ---\n{log[-3000:]}")
        assert status == 0, "targetmirrord did not shut down cleanly on SIGTERM"
        assert "Traceback" not in log, "targetmirrord logged a traceback"
