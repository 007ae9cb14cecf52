"""Build glue for the one compiled part, the express lane (targetmirror/express/_lane.c).

Everything else is in setup.cfg.  The extension is optional: without a C compiler or Python's
headers the install still succeeds and the daemon serves every command from Python
(``targetmirror.express.WHY_NOT`` says so).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("targetmirror.express._lane", ["targetmirror/express/_lane.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=vla",
                                                 "-std=gnu11"],
                             optional=True)])
