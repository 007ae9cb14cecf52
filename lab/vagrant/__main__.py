"""``python3 -m lab.vagrant``: build the Vagrant lab's box, add it to Vagrant, show the cache.

    sudo python3 -m lab.vagrant box              # build (or reuse) the cached box; its path
    sudo python3 -m lab.vagrant box --add        # ... and add it to Vagrant (targetmirror-lab)
    python3 -m lab.vagrant info                  # recipe hash, cache, build timings

Then ``cd vagrant && TM_BOX=targetmirror-lab vagrant up`` (libvirtd must be running; the test,
tests/vagrant, starts it by hand on hosts without systemd).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from lab import LabError
from lab.vagrant import box


def _cmd_box(args: argparse.Namespace) -> int:
    start = time.monotonic()
    b = box.ensure_box(force=args.force)
    print(f"{b.path} ({time.monotonic() - start:.0f} s)")
    if args.add:
        subprocess.run(["vagrant", "box", "add", "--force", "--name", args.name, str(b.path)],
                       check=True)
    return 0


def _cmd_info(_args: argparse.Namespace) -> int:
    b = box.cached_box()
    info: dict[str, object] = {"cache": str(box.box_dir()), "recipe_hash": box.recipe_hash(),
                               "box": str(b.path) if b else None}
    if b is not None:
        manifest = json.loads(b.manifest.read_text())
        info.update(built=manifest.get("built"), box_bytes=manifest.get("box_bytes"),
                    timings_s=manifest.get("timings_s"), kernel=manifest.get("kernel"))
    print(json.dumps(info, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m lab.vagrant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("box", help="build (or reuse) the cached box")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--add", action="store_true", help="add it to Vagrant (vagrant box add)")
    b.add_argument("--name", default="targetmirror-lab", help="box name for --add")
    b.set_defaults(func=_cmd_box)
    i = sub.add_parser("info", help="where the box is and how it was built")
    i.set_defaults(func=_cmd_info)
    args = p.parse_args(argv)
    try:
        return int(args.func(args))
    except LabError as exc:
        print(f"lab.vagrant: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
