"""Host unit tests of the iscsi-test-cu output parser and the result table (no guest needed)."""

from __future__ import annotations

from tests.lab.conformance import FAIL, PASS, SKIP, SuiteRun, Table, parse_output

OUTPUT = """
     CUnit - A unit testing framework for C - Version 2.1-3

Suite: Write10
  Test: Simple ...passed
  Test: BeyondEol ...    [FAILED] WRITE10 successful but should have failed
    [FAILED] WRITE10 successful but should have failed
FAILED
    1. test_write10_beyond_eol.c:40  - CU_ASSERT_EQUAL(ret,0)
  Test: Protect ...    [SKIPPED] Logical unit is not formatted with protection
passed
  Test: Dying ...
"""


def test_verdicts_skips_and_a_test_that_never_finished() -> None:
    got = parse_output("SCSI.Write10", OUTPUT)
    assert got == {"SCSI.Write10.Simple": PASS, "SCSI.Write10.BeyondEol": FAIL,
                   "SCSI.Write10.Protect": SKIP}


def test_a_failure_log_line_alone_is_not_a_verdict() -> None:
    text = "Suite: X\n  Test: T ...    [FAILED] something FAILED here (0x05)\npassed\n"
    assert parse_output("SCSI.X", text) == {"SCSI.X.T": PASS}


def test_clean_up_output_after_the_verdict_does_not_change_it() -> None:
    text = ("Suite: Reserve6\n  Test: LUNReset ...passed    [FAILED] PRIN command: failed "
            "with sense. UNIT_ATTENTION\n\n\nRun Summary: ...\n")
    assert parse_output("SCSI.Reserve6", text) == {"SCSI.Reserve6.LUNReset": PASS}


def test_table_counts_and_regressions() -> None:
    t = Table()
    t.add("user:mirror", SuiteRun("SCSI.A", {"SCSI.A.x": PASS, "SCSI.A.y": FAIL}, 1.0, False, ""))
    t.add("user:file", SuiteRun("SCSI.A", {"SCSI.A.x": PASS, "SCSI.A.y": PASS}, 1.0, False, ""))
    t.add("fileio", SuiteRun("SCSI.A", {"SCSI.A.x": FAIL, "SCSI.A.y": PASS}, 1.0, False, ""))
    t.add("fileio", SuiteRun("SCSI.B", {}, 9.0, True, ""))
    assert t.counts("user:mirror") == {"pass": 1, "fail": 1, "skip": 0, "hung": 0}
    assert t.counts("fileio") == {"pass": 1, "fail": 1, "skip": 0, "hung": 1}
    assert t.regressions() == ["SCSI.A.y"]
    assert "SCSI.A.y" in t.render()
