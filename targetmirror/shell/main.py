"""``targetmirror-shell``: the targetcli-style shell over ``targetmirrord``.

Interactive with no arguments; with arguments it runs them as one command line and exits, like
targetcli (``targetmirror-shell /mirrors/db split``, ``targetmirror-shell ls``), which is what
scripts and tests use.  Exit status: 0 success, 1 the command failed (the reason is printed on
stderr as ``targetmirror-shell: <code>: <reason>``), 2 usage error.

The shell has the CLI's error boundary (:mod:`targetmirror.boundary`): whatever a command
raises is one line -- in the interactive shell the prompt comes back, one-shot it is exit 1 --
and a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback

from targetmirror import __version__
from targetmirror.boundary import EXIT_INTERRUPTED, debug_wanted, describe
from targetmirror.client import Client
from targetmirror.protocol import DEFAULT_SOCKET


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also the source of the man page)."""
    p = argparse.ArgumentParser(
        prog="targetmirror-shell",
        description="A targetcli-style shell for targetmirror: /mirrors, /groups, /exports. "
                    "Without a command it is interactive (tab completes paths, names and "
                    "parameters; 'help' in any node lists its commands).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--socket", default=DEFAULT_SOCKET,
                   help="targetmirrord's control socket (default %(default)s)")
    p.add_argument("--debug", action="store_true",
                   help="on a failure, also print the traceback (env TARGETMIRROR_DEBUG=1)")
    p.add_argument("--prefs-dir", default=os.environ.get("TARGETMIRROR_SHELL_PREFS",
                                                         "~/.targetmirror-shell"),
                   help="history and preferences (default %(default)s)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="[PATH] COMMAND [ARGS...] [key=value...] to run once, then exit")
    return p


def one_line(exc: BaseException) -> str:
    """``CODE: why`` for a failed shell command: a refusal of the daemon carries its code
    already (``_run`` in nodes.py); configshell's own complaints (no such path, command or
    parameter) are usage errors; everything else goes through the CLI's boundary."""
    try:
        from configshell_fb import ExecutionError
    except ImportError:  # pragma: no cover - depends on the installed flavour
        from configshell import ExecutionError

    if isinstance(exc, ExecutionError):
        text = str(exc).strip() or "the command failed"
        return text if re.match(r"^[a-z][a-z-]*: ", text) else f"usage: {text}"
    code, lines = describe(exc)
    return f"{code}: " + " ".join(lines)


def make_shell(socket: str, prefs_dir: str | None, *, interactive: bool = False,
               debug: bool = False) -> object:
    """A ConfigShell with our tree attached (the root is read from the daemon once here)."""
    try:
        from configshell_fb import ConfigShell
    except ImportError:  # pragma: no cover - depends on the installed flavour
        from configshell import ConfigShell

    from targetmirror.shell.nodes import RootNode

    class Shell(ConfigShell):  # type: ignore[misc]
        """In the interactive shell a failed command is one line and the prompt returns."""

        def run_cmdline(self, cmdline: str) -> None:
            if not interactive:
                super().run_cmdline(cmdline)
                return
            try:
                super().run_cmdline(cmdline)
            except Exception as exc:  # the boundary: one line, then the prompt again
                if debug_wanted(debug):
                    traceback.print_exception(exc, file=sys.stderr)
                print(f"targetmirror-shell: {one_line(exc)}", file=sys.stderr)

    shell = Shell(prefs_dir)
    RootNode(shell, Client(socket))
    return shell


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``targetmirror-shell``."""
    args = build_parser().parse_args(argv)
    one_shot = bool(args.command)
    try:
        # one-shot runs keep no history and never write preferences (scripts, tests, cron)
        shell = make_shell(args.socket, None if one_shot else args.prefs_dir,
                           interactive=not one_shot, debug=args.debug)
        if not one_shot:
            shell.run_interactive()  # type: ignore[attr-defined]
            return 0
        shell.run_cmdline(" ".join(args.command))  # type: ignore[attr-defined]
    except SystemExit:
        raise
    except BaseException as exc:  # the boundary: every failure is one line
        if debug_wanted(args.debug):
            traceback.print_exception(exc, file=sys.stderr)
        print(f"targetmirror-shell: {one_line(exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
