"""The one error boundary of the admin faces (``targetmirror``, ``targetmirror-shell``).

Whatever a command raises ends here and becomes one line on stderr,
``PROG: CODE: why and what to do`` (a configuration file's problems one line each), with exit
status 1; a traceback only with ``--debug`` (or ``TARGETMIRROR_DEBUG=1``).  Expected failures
carry their code (:mod:`targetmirror.errors`); rtslib's and the OS's own exceptions are named
here (LIO absent, configfs not mounted, a file that cannot be opened); anything else is a bug
and says so.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import TextIO

from targetmirror.errors import ArgumentsError, ConfigFileError, TargetMirrorError
from targetmirror.lio.rts import FIX as LIO_FIX

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def debug_wanted(flag: bool = False) -> bool:
    return flag or os.environ.get("TARGETMIRROR_DEBUG", "") not in ("", "0")


def describe(exc: BaseException) -> tuple[str, list[str]]:
    """(code, lines) for one exception: what the admin reads."""
    if isinstance(exc, ConfigFileError):
        if len(exc.problems) == 1:
            return exc.code, exc.problems
        return exc.code, [f"{len(exc.problems)} problems in {exc.path}:", *exc.problems]
    if isinstance(exc, ArgumentsError) and len(exc.problems) > 1:
        return exc.code, [f"{len(exc.problems)} problems with the arguments:", *exc.problems]
    if isinstance(exc, TargetMirrorError):
        return exc.code, str(exc).splitlines() or [type(exc).__name__]
    if type(exc).__module__.startswith("rtslib"):
        return "lio", [f"LIO refused: {exc}"
                       + (f"; {LIO_FIX}" if "configfs" in str(exc).lower() else "")]
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        if exc.filename in ("/proc/modules", "/sys/kernel/config") or str(
                exc.filename or "").startswith("/sys/kernel/config"):
            return "lio", [f"{LIO_FIX} ({exc.strerror or exc}{where})"]
        return "os", [f"{exc.strerror or exc}{where}"]
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", ["interrupted"]
    return "internal", [f"{type(exc).__name__}: {exc} (a bug: run again with --debug for "
                        "the traceback and report it)"]


def report(exc: BaseException, prog: str, *, debug: bool = False,
           stream: TextIO | None = None) -> int:
    """Print ``exc`` as the boundary does and return the exit status."""
    out = stream or sys.stderr
    if debug_wanted(debug):
        traceback.print_exception(exc, file=out)
    code, lines = describe(exc)
    print(f"{prog}: {code}: {lines[0]}", file=out)
    for line in lines[1:]:
        print(f"  {line}", file=out)
    return EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else EXIT_FAILED
