"""targetmirror-shell has the CLI's error boundary: one line per failure (one-shot: exit 1;
interactive: the prompt comes back), a traceback only with --debug."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from targetmirror.shell import main as shell_main
from targetmirror.shell import nodes
from tests.cli import fakertslib

DEAD = ("device: cannot reach targetmirrord at {sock}: No such file or directory (is it "
        "running? 'systemctl status targetmirrord')")


def test_one_shot_failures_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    lio = fakertslib.install(monkeypatch)
    lio.absent = "proc-modules"
    sock = str(tmp_path / "nope.sock")
    for words, line in (
            (["status"], DEAD.format(sock=sock)),
            (["/mirrors/db", "status"], "usage: No such path /mirrors/db"),
            (["/exports", "status"], "lio: LIO (the kernel's SCSI target) is not available on "
             "this host"),
            (["/groups", "create"], "usage: "),
    ):
        assert shell_main.main(["--socket", sock, *words]) == 1, words
        err = capsys.readouterr().err
        assert err.startswith(f"targetmirror-shell: {line}") and err.count("\n") == 1, err
        assert "Traceback" not in err


def test_interactive_failures_print_one_line_and_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(tmp_path / "nope.sock")
    shell: Any = shell_main.make_shell(sock, None, interactive=True)
    shell.run_cmdline("status")
    shell.run_cmdline("/nowhere ls")

    def broken(self: Any) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(nodes.RootNode, "ui_command_refresh", broken)
    shell.run_cmdline("refresh")
    err = capsys.readouterr().err.splitlines()
    assert err == [f"targetmirror-shell: {DEAD.format(sock=sock)}",
                   "targetmirror-shell: usage: No such path /nowhere",
                   "targetmirror-shell: internal: KeyError: 'bug' (a bug: run again with "
                   "--debug for the traceback and report it)"]
    debug: Any = shell_main.make_shell(sock, None, interactive=True, debug=True)
    debug.run_cmdline("refresh")
    err2 = capsys.readouterr().err
    assert err2.startswith("Traceback") and "targetmirror-shell: internal: KeyError" in err2
