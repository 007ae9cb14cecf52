"""Build glue for the one compiled part, the express lane (targetmirror/express/_lane.c).

Everything else is in setup.cfg.  The extension is optional: without a C compiler or Python's
headers the install still succeeds and the daemon serves every command from Python
(``targetmirror.express.WHY_NOT`` says so).  liburing (Debian ``liburing-dev``) is optional
too: with it the lane submits both legs' I/O of a batch of commands in one ``io_uring_enter``;
without it (or with ``TARGETMIRROR_URING=0`` at build time) it makes one ``pwritev``/``preadv``
per leg (``targetmirror.express.HAVE_URING`` says which).
"""

import os
import tempfile

from setuptools import Extension, setup


def _have_liburing() -> bool:
    """True if a program using liburing compiles and links here."""
    if os.environ.get("TARGETMIRROR_URING") == "0":
        return False
    try:
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler

        cc = new_compiler()
        customize_compiler(cc)
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write("#include <liburing.h>\nint main(void) { struct io_uring r;\n"
                        "  return io_uring_queue_init(8, &r, 0); }\n")
            objs = cc.compile([src], output_dir=tmp)
            cc.link_executable(objs, os.path.join(tmp, "probe"), libraries=["uring"])
    except Exception:  # no compiler, no header, no library: build without it
        return False
    return True


_URING = _have_liburing()

setup(ext_modules=[Extension("targetmirror.express._lane", ["targetmirror/express/_lane.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=vla",
                                                 "-std=gnu11"],
                             define_macros=[("TM_HAVE_URING", "1")] if _URING else [],
                             libraries=["uring"] if _URING else [],
                             optional=True)])
