"""``targetmirror-shell``: the targetcli-style shell over ``targetmirrord``.

Interactive with no arguments; with arguments it runs them as one command line and exits, like
targetcli (``targetmirror-shell /mirrors/db split``, ``targetmirror-shell ls``), which is what
scripts and tests use.  Exit status: 0 success, 1 the command failed (the reason is printed on
stderr as ``targetmirror-shell: <reason>``), 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys

from targetmirror import __version__
from targetmirror.client import Client
from targetmirror.errors import TargetMirrorError
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
    p.add_argument("--prefs-dir", default=os.environ.get("TARGETMIRROR_SHELL_PREFS",
                                                         "~/.targetmirror-shell"),
                   help="history and preferences (default %(default)s)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="[PATH] COMMAND [ARGS...] [key=value...] to run once, then exit")
    return p


def make_shell(socket: str, prefs_dir: str | None) -> object:
    """A ConfigShell with our tree attached (the root is read from the daemon once here)."""
    try:
        from configshell_fb import ConfigShell
    except ImportError:  # pragma: no cover - depends on the installed flavour
        from configshell import ConfigShell

    from targetmirror.shell.nodes import RootNode

    shell = ConfigShell(prefs_dir)
    RootNode(shell, Client(socket))
    return shell


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``targetmirror-shell``."""
    args = build_parser().parse_args(argv)
    try:
        from configshell_fb import ExecutionError
    except ImportError:  # pragma: no cover
        from configshell import ExecutionError

    one_shot = bool(args.command)
    # one-shot runs keep no history and never write preferences (scripts, tests, cron)
    shell = make_shell(args.socket, None if one_shot else args.prefs_dir)
    if not one_shot:
        shell.run_interactive()  # type: ignore[attr-defined]
        return 0
    try:
        shell.run_cmdline(" ".join(args.command))  # type: ignore[attr-defined]
    except (ExecutionError, TargetMirrorError) as exc:
        print(f"targetmirror-shell: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
