"""Lab benchmark: libiscsi's iscsi-test-cu against user:mirror, tcmu-runner user:file and kernel
fileio in one guest; prints the per-backstore pass/fail/skip table and every test where the
backstores differ, and writes JSON (and the raw outputs) next to --out.

From the host (boots the guest; the whole suite takes long under TCG):

    flock /tmp/targetmirror-lab.lock python3 -m lab run --timeout 5400 --out lab-out/conf -- \\
        python3 benchmarks/lab_conformance.py --out /out/conformance.json

``--suites`` takes a comma list of FAMILY.SUITE names (default: every SCSI and iSCSI suite).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab import conformance, guest
from tests.lab.mirrord import Mirrord


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="JSON results (raw outputs go to OUT.log)")
    ap.add_argument("--suites", default="", help="comma list (default: all)")
    ap.add_argument("--backstores", default=",".join(conformance.BACKSTORES))
    args = ap.parse_args()
    guest.setup_kernel()
    guest.iscsi_logout_all()
    guest.clear_lio()
    work = Path(tempfile.mkdtemp(prefix="conf-"))
    runner = guest.TcmuRunner(work / "runner-log")
    runner.start()
    daemon = Mirrord(work / "mirrord.log")
    daemon.start()
    t0 = time.monotonic()
    try:
        urls = conformance.setup_luns(work, runner, daemon)
        wanted = args.backstores.split(",")
        urls = {b: u for b, u in urls.items() if b in wanted}
        suites = ([s for s in args.suites.split(",") if s] if args.suites
                  else conformance.list_suites())
        print(f"{len(suites)} suites: {' '.join(suites)}", flush=True)
        log = Path(args.out + ".log") if args.out else None
        table = conformance.run_all(urls, suites, log=log)
        print("\n" + table.render())
        print(f"\nregressions (pass on user:file and fileio, not on user:mirror): "
              f"{table.regressions()}")
        print(f"total {time.monotonic() - t0:.0f} s")
        if args.out:
            Path(args.out).write_text(json.dumps({"date": time.strftime("%F %T"),
                                                  "suites": suites, **table.as_json()},
                                                 indent=1))
    finally:
        guest.iscsi_logout_all()
        guest.clear_lio()
        status = daemon.stop()
        runner.stop()
        log_text = daemon.log_text()
        shutil.rmtree(work, ignore_errors=True)
        print(f"targetmirrord exit status {status}")
        print("\n".join(line for line in log_text.splitlines()
                        if "Traceback" in line or "ERROR" in line or "WARNING" in line)[-4000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
