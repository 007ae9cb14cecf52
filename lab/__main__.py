"""``python3 -m lab``: build the lab image, run a command in the guest, or open a shell there.

Examples (from the repository root)::

    python3 -m lab build                     # build (or reuse) the cached image
    python3 -m lab run -- uname -a           # boot, run, power off; exit status is uname's
    python3 -m lab run --console -- python3 -m pytest -v tests/lab
    python3 -m lab shell                     # interactive bash in the guest (Ctrl-A X quits)
    python3 -m lab info                      # where the cache is and what it holds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lab import REPO_ROOT, LabError, image, vm


def _cmd_build(args: argparse.Namespace) -> int:
    start = time.monotonic()
    img = image.ensure_image(force=args.force)
    print(f"{img.root} ({time.monotonic() - start:.0f} s)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("lab run: no command given (python3 -m lab run -- CMD ...)", file=sys.stderr)
        return 2
    img = image.ensure_image()
    env = dict(kv.split("=", 1) for kv in args.env)
    result = vm.run(cmd, image=img, out_dir=Path(args.out), repo=REPO_ROOT,
                    timeout=args.timeout, env=env, echo=sys.stdout if args.console else None,
                    memory=args.memory, cpus=args.cpus)
    boot = f", init after {result.boot_s:.1f} s" if result.boot_s is not None else ""
    print(f"[lab] exit status {result.status} in {result.duration_s:.1f} s{boot}; "
          f"console: {result.console_log}", file=sys.stderr)
    if not args.console and result.status != 0:
        print(result.console_tail(40), file=sys.stderr)
    return result.status


def _cmd_shell(args: argparse.Namespace) -> int:
    img = image.ensure_image()
    return vm.shell(image=img, out_dir=Path(args.out), repo=REPO_ROOT,
                    memory=args.memory, cpus=args.cpus)


def _cmd_info(args: argparse.Namespace) -> int:
    img = image.cached_image()
    info = {
        "cache": str(image.cache_root()),
        "recipe_hash": image.recipe_hash(),
        "image": str(img.root) if img else None,
        "qemu": vm.qemu_available(),
        "missing_build_tools": image.missing_host_tools(),
    }
    if img:
        manifest = json.loads(img.manifest.read_text())
        info["kernel"] = manifest.get("kernel")
        info["built"] = manifest.get("built")
        info["build_timings_s"] = manifest.get("timings_s")
    print(json.dumps(info, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build the guest image unless cached")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_cmd_build)

    def vm_options(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument("--out", default=str(REPO_ROOT / "lab-out" / out),
                       help="host folder shared writable as /out (default %(default)s)")
        p.add_argument("--memory", default=vm.DEFAULT_MEMORY)
        p.add_argument("--cpus", type=int, default=vm.DEFAULT_CPUS)

    p = sub.add_parser("run", help="boot, run CMD in the repository, power off")
    vm_options(p, "run")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds (default %(default)s)")
    p.add_argument("--console", action="store_true", help="echo the guest console to stdout")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for CMD (repeatable)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("shell", help="boot into an interactive shell (Ctrl-A X quits)")
    vm_options(p, "shell")
    p.set_defaults(func=_cmd_shell)

    p = sub.add_parser("info", help="show the cache and image state")
    p.set_defaults(func=_cmd_info)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except LabError as exc:
        print(f"[lab] error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
