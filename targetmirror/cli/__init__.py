"""``targetmirror``: the admin's command line.

One module per area, like targetcli-fb's ``ui_*.py``; each adds its subcommands' parsers with
``register(sub)`` and holds their ``cmd_*`` functions:

* :mod:`~targetmirror.cli.ui_lio` -- ``create`` / ``create-volume2`` / ``delete`` /
  ``export-snapshot`` / ``check-config``: ``user:mirror`` backstores and iSCSI exports through
  rtslib-fb (optionally creating the image files);
* :mod:`~targetmirror.cli.ui_config` -- ``apply`` makes LIO match the YAML configuration
  (:mod:`targetmirror.config.plan`); ``list`` shows the ``user:mirror`` backstores LIO has, with
  exports and ownership;
* :mod:`~targetmirror.cli.ui_mirror` -- ``split``, ``status``, ``group``, ``cancel``,
  ``rejoin``, ``repair``, ``sync``, ``verify``: talk to ``targetmirrord`` over its control
  socket; the daemon does the work, the CLI only asks and shows;
* :mod:`~targetmirror.cli.ui_backup` -- ``backup`` and ``rbd-snapshots``.

Every failure prints one line ``targetmirror: <code>: <message>`` and exits non-zero; nothing is
left half made.  ``--json`` prints the daemon's machine-readable answer instead of a table.

Exit codes: 0 success, 1 a targetmirror error (bad input, refused operation, daemon
unreachable), 2 usage error, 3 the backup command run by ``backup --exec`` failed.
"""

from __future__ import annotations

import argparse

from targetmirror import __version__
from targetmirror.boundary import report
from targetmirror.cli import ui_backup, ui_config, ui_lio, ui_mirror

EXIT_CODES = """\
exit status:
  0  success (apply: LIO matches the file, whether or not something changed)
  1  targetmirror error: bad input or configuration, refused operation, daemon
     unreachable, LIO absent or refusing (stderr: one line 'targetmirror: CODE:
     WHY', a config error lists every problem of the file on its own line;
     CODE is the error's stable code: config, mirror, lio, store, device, os,
     protocol, internal, ...; --debug adds the traceback)
  2  usage error (unknown command or option)
  3  the command run by 'backup --exec' failed (the mirror stays split)

The configuration file is $TARGETMIRROR_CONFIG or /etc/targetmirror/targetmirror.yaml
unless --config is given; see docs/operations.md."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also the source of the man page)."""
    p = argparse.ArgumentParser(prog="targetmirror",
                                description="Split-mirror block service for LIO (TCMU).",
                                epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="on a failure, also print the traceback (env TARGETMIRROR_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for area in (ui_lio, ui_config, ui_mirror, ui_backup):
        area.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``targetmirror``: every failure of every command goes through the one
    error boundary (:mod:`targetmirror.boundary`): one line, exit 1; a traceback only with
    ``--debug``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SystemExit:
        raise
    except BaseException as exc:  # the boundary: every failure is one line
        return report(exc, "targetmirror", debug=args.debug)


__all__ = ["build_parser", "main"]
