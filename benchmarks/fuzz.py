"""Coverage-guided fuzzing (atheris/libFuzzer) of the CDB dispatch and the TCMU ring reader.

The targets and their invariants are in ``tests/fuzz/harness.py``; the committed seeds in
``tests/fuzz/corpus/<target>/``.  Each target runs in its own process (libFuzzer exits the
process when it is done) for ``--seconds``, starting from the seeds; inputs it finds that
reach new code go to a scratch directory (or ``--corpus-out``), never into the seeds.  Prints,
per target: executions, executions per second, libFuzzer's edge coverage (``cov``) and
features (``ft``), then the share of the fuzzed modules' function lines run when the final corpus is
replayed, and how the inputs ended (ring refused, bad entry, command status).  A crash (a
broken invariant) leaves ``crash-*`` in the scratch directory, prints its traceback, and makes
the exit status 1.

    python3 benchmarks/fuzz.py [--seconds 60] [--target cdb|ring|all] [--corpus-out DIR]

The test suite runs this for a few seconds per target (tests/fuzz/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import subprocess  # nosec B404 - runs this very script, argument list only
import sys
import tempfile
import types
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
FUZZED = ("targetmirror/scsi/", "targetmirror/tcmu/ring.py", "targetmirror/tcmu/layout.py")
"""The modules whose line coverage is reported."""


def worker(target: str, seconds: int, corpus: Path, artifacts: Path) -> None:
    """Inside the child: instrument the fuzzed modules, then hand over to libFuzzer."""
    import atheris

    sys.path.insert(0, str(ROOT))
    with atheris.instrument_imports(include=["targetmirror"]):
        from tests.fuzz.harness import TARGETS
    args = [sys.argv[0], f"-max_total_time={seconds}", "-print_final_stats=1",
            "-max_len=2048", "-timeout=20", f"-artifact_prefix={artifacts}/",
            str(corpus), str(CORPUS / target)]
    atheris.Setup(args, TARGETS[target])
    atheris.Fuzz()


def line_coverage(target: str, corpus: list[Path]
                  ) -> tuple[dict[str, tuple[int, int]], Counter[str]]:
    """Replay *corpus* with a line tracer: (lines run, lines) of functions, per fuzzed module."""
    sys.path.insert(0, str(ROOT))
    from tests.fuzz import harness

    executable: set[tuple[str, int]] = set()
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None) or ""
        rel = os.path.relpath(path, ROOT) if path else ""
        if any(rel.startswith(f) for f in FUZZED):
            code = compile(Path(path).read_text(), path, "exec")
            stack = [code]
            while stack:
                c = stack.pop()
                # function bodies only: module and class bodies ran at import, not per input
                if c.co_flags & inspect.CO_OPTIMIZED:
                    executable.update((path, ln) for _, _, ln in c.co_lines() if ln)
                stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    files = {p for p, _ in executable}
    hit: set[tuple[str, int]] = set()

    def tracer(frame: types.FrameType, _event: str, _arg: object) -> object:
        if frame.f_code.co_filename not in files:
            return None

        def local(f: types.FrameType, event: str, _a: object) -> object:
            if event == "line":
                hit.add((f.f_code.co_filename, f.f_lineno))
            return local

        hit.add((frame.f_code.co_filename, frame.f_lineno))
        return local

    harness.OUTCOMES.clear()
    sys.settrace(tracer)
    try:
        for p in corpus:
            harness.TARGETS[target](p.read_bytes())
    finally:
        sys.settrace(None)
    per_file: dict[str, tuple[int, int]] = {}
    for path in sorted(files):
        lines = {x for x in executable if x[0] == path}
        per_file[os.path.relpath(path, ROOT)] = (len(lines & hit), len(lines))
    return per_file, Counter(harness.OUTCOMES)


def run(target: str, seconds: int, out: Path) -> bool:
    out.mkdir(parents=True, exist_ok=True)
    artifacts = out / "artifacts"
    artifacts.mkdir(exist_ok=True)
    proc = subprocess.run(  # nosec B603 - our own interpreter and script, no shell
        [sys.executable, __file__, "--worker", target, "--seconds", str(seconds),
         "--corpus-out", str(out)],
        capture_output=True, text=True, check=False)
    log = proc.stderr
    done = re.findall(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", log)
    rate = re.search(r"stat::average_exec_per_sec:\s+(\d+)", log)
    execs = re.search(r"stat::number_of_executed_units:\s+(\d+)", log)
    ok = proc.returncode == 0
    if done:
        _n, cov, ft, corp = done[-1]
        print(f"{target}: {execs.group(1) if execs else _n} executions in {seconds} s, "
              f"{rate.group(1) if rate else '?'} exec/s, cov {cov} edges, ft {ft}, "
              f"corpus {corp} inputs")
    if not ok:
        print(f"{target}: FAILED (exit {proc.returncode}); libFuzzer output follows")
        print(log[-6000:])
        return False
    inputs = sorted(p for p in out.iterdir() if p.is_file())
    inputs += sorted((CORPUS / target).iterdir())
    per_file, outcomes = line_coverage(target, inputs)
    hit = sum(h for h, _ in per_file.values())
    total = sum(n for _, n in per_file.values())
    print(f"{target}: replaying {len(inputs)} corpus inputs runs {hit}/{total} function lines "
          f"({100 * hit / max(total, 1):.0f}%) of {', '.join(FUZZED)}")
    print(f"{target}: per module " + ", ".join(
        f"{Path(p).name} {100 * h / max(n, 1):.0f}%" for p, (h, n) in per_file.items() if n))
    print(f"{target}: outcomes {dict(sorted(outcomes.items()))}")
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--target", choices=("cdb", "ring", "all"), default="all")
    ap.add_argument("--corpus-out", type=Path, default=None,
                    help="keep the inputs found here (default: a temporary directory)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.worker:
        worker(opts.worker, opts.seconds, opts.corpus_out, opts.corpus_out / "artifacts")
        return 0
    targets = ("cdb", "ring") if opts.target == "all" else (opts.target,)
    scratch = Path(tempfile.mkdtemp(prefix="targetmirror-fuzz-"))
    ok = True
    try:
        for t in targets:
            base = opts.corpus_out if opts.corpus_out is not None else scratch
            ok = run(t, opts.seconds, base / t) and ok
    finally:
        if opts.corpus_out is None and ok:
            shutil.rmtree(scratch, ignore_errors=True)
        elif not ok:
            print(f"inputs and crash artifacts kept in {opts.corpus_out or scratch}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
