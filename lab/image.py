"""Build and cache the lab guest: an ext4 disk image of a Debian bookworm tree plus the kernel
and initrd taken from that tree's /boot.

Why this shape:

* ``mmdebstrap --mode=root`` builds the tree as a plain directory and ``mkfs.ext4 -d`` turns it
  into an image without loop mounts, so the build needs root but no kernel modules on the host.
* The guest has no network, so everything the tests run or import must be in the image: Debian's
  own ``python3-*`` packages, and tcmu-runner's ``file`` handler, which Debian does not ship and
  which we compile on the host from Debian's source package.
* A build takes minutes, so the result is cached under ``$TARGETMIRROR_LAB_CACHE`` (default
  ``~/.cache/targetmirror/lab``) in a folder named by a hash of the recipe (package list,
  mirrors, init script, ...). Change the recipe and the next run rebuilds; otherwise it is
  reused. A build goes to a temporary folder that is renamed into place only when complete,
  so an interrupted build never leaves a half image that looks valid.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab import LabError, initramfs

#: Bump to force a rebuild when something not covered by the hash changes.
RECIPE_VERSION = 2

SUITE = "bookworm"
SUITES = (SUITE, f"{SUITE}-updates", f"{SUITE}-security")
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_D = Path("/etc/apt/sources.list.d")


def host_mirrors() -> tuple[str, ...]:
    """One-line ``deb URI SUITE main`` entries for the guest, taken from the host's apt sources.

    The guest is built from whatever Debian mirror this host already uses (both deb822
    ``.sources`` files and classic ``sources.list`` lines are read), so no archive address is
    written into the project.
    """
    entries: list[tuple[str, str]] = []
    for path in sorted(APT_SOURCES_D.glob("*.sources")):
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.strip() and not line.startswith("#") and ":" in line:
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    entries.append((uri, suite))
    files = [APT_SOURCES, *sorted(APT_SOURCES_D.glob("*.list"))]
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and not words[1].startswith("["):
                entries.append((words[1], words[2]))
    out = []
    for uri, suite in entries:
        line = f"deb {uri} {suite} main"
        if suite in SUITES and line not in out:
            out.append(line)
    if not any(f" {SUITE} " in line for line in out):
        raise LabError(f"the host's apt sources name no Debian {SUITE} mirror to build the "
                       "lab guest from (checked /etc/apt/sources.list and sources.list.d)")
    return tuple(out)

#: Everything the lab tests may run or import inside the guest (it has no network).
PACKAGES: tuple[str, ...] = (
    "linux-image-amd64",
    "kmod",
    "python3",
    "python3-rtslib-fb",
    "python3-configshell-fb",
    "python3-yaml",
    "python3-pytest",
    "python3-hypothesis",
    "python3-pyroute2",
    "python3-prometheus-client",
    "python3-dbus",
    "python3-jeepney",  # targetmirrord's D-Bus face (targetcli lists user:mirror)
    "dbus",
    "targetcli-fb",
    "tcmu-runner",
    "open-iscsi",
    "libiscsi-bin",
    "sg3-utils",
    "fio",
    "e2fsprogs",
    "iproute2",
    "dmsetup",
    "util-linux",
    "procps",
    "python3-tqdm",
    # tests/lab/test_lab_deb.py: systemd-analyze (verify the installed unit, expand its system
    # call groups; systemd is not PID 1 here) and python3-seccomp (the unit's syscall filter)
    "systemd",
    "python3-seccomp",
    "busybox-static",  # for the lab's own initramfs (lab/initramfs.py)
    "strace",  # benchmarks/lab_fio.py counts each user backstore's syscalls per command
    "linux-perf",  # where the kernel's share of a command goes (docs/performance.md)
    "liburing2",  # the express lane submits both legs' I/O through io_uring when built so
    # the RBD leg's lab test runs a one-node Ceph cluster inside the guest (no network)
    "ceph-mon",
    "ceph-osd",
    "ceph-common",
    "python3-rbd",
    "python3-rados",
)

#: Modules the initrd needs to mount the root disk; nothing else goes in. The default
#: (MODULES=most) makes a 36 MB initrd whose unpacking plus udev's module loading cost ~8 s of
#: every boot under TCG.
INITRD_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")

#: Runs after the essential packages, before linux-image-amd64's postinst builds the initrd.
_INITRD_HOOK = (
    'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"'
    ' && echo MODULES=list > "$1/etc/initramfs-tools/conf.d/targetmirror-lab"'
    f" && printf '%s\\n' {' '.join(INITRD_MODULES)}"
    ' > "$1/usr/share/initramfs-tools/modules.d/targetmirror-lab"'
)

#: Options that keep the tree small: no recommends, no documentation, no translations.
MMDEBSTRAP_OPTIONS: tuple[str, ...] = (
    "--mode=root",
    "--variant=minbase",
    "--format=directory",
    '--aptopt=APT::Install-Recommends "false"',
    '--aptopt=Acquire::Languages "none"',
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/lintian/*",
    "--essential-hook=" + _INITRD_HOOK,
)

#: The disk is sparse; tests put their backing files on guest tmpfs, not here.
IMAGE_SIZE = "3G"

#: A fixed initiator name, so that tests can create ACLs for it without reading the guest.
INITIATOR_NAME = "iqn.2024-01.org.targetmirror:lab-guest"

#: The PID-1 script, installed as /sbin/tm-lab-init.
INIT_SCRIPT = Path(__file__).resolve().parent / "tm-lab-init"
GUEST_INIT_PATH = "/sbin/tm-lab-init"

#: How tcmu-runner's `file` handler is compiled (SRC is the unpacked Debian source).
HANDLER_BUILD = ("gcc", "-O2", "-fPIC", "-shared", "-I", "SRC", "-I", "SRC/ccan",
                 "-o", "OUT", "SRC/file_example.c")

REQUIRED_HOST_TOOLS = ("mmdebstrap", "mkfs.ext4", "gcc", "apt-get", "dpkg-source", "dpkg-query")

Log = Callable[[str], None]


def _stderr_log(msg: str) -> None:
    print(f"[lab] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """The lab cache folder; ``$TARGETMIRROR_LAB_CACHE`` overrides the default."""
    env = os.environ.get("TARGETMIRROR_LAB_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "targetmirror" / "lab"


def recipe() -> dict[str, object]:
    """Everything that determines the image's content, in a hashable form."""
    return {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "mirrors": list(host_mirrors()),
        "packages": sorted(PACKAGES),
        "mmdebstrap": list(MMDEBSTRAP_OPTIONS),
        "image_size": IMAGE_SIZE,
        "initiator_name": INITIATOR_NAME,
        "init_script": hashlib.sha256(INIT_SCRIPT.read_bytes()).hexdigest(),
        "handler_build": list(HANDLER_BUILD),
        "initramfs_init": hashlib.sha256(initramfs.INIT_SCRIPT.read_bytes()).hexdigest(),
        "initramfs_modules": list(initramfs.INITRAMFS_MODULES),
    }


def recipe_hash() -> str:
    """Short hash naming the cache folder of the image built from :func:`recipe`."""
    blob = json.dumps(recipe(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    """A complete, cached guest: disk image, kernel, initrd and a manifest.

    Two ways to boot are kept: the fast one (``vmlinux`` through PVH plus our busybox
    initramfs, see :mod:`lab.initramfs`) and Debian's own ``vmlinuz`` + ``initrd.img``, used
    when ``TARGETMIRROR_LAB_DEBIAN_BOOT=1`` (for telling a lab bug from a kernel one).
    """

    root: Path

    @property
    def debian_boot(self) -> bool:
        return (os.environ.get("TARGETMIRROR_LAB_DEBIAN_BOOT") == "1"
                or not (self.root / "vmlinux").is_file())

    @property
    def disk(self) -> Path:
        return self.root / "image.raw"

    @property
    def kernel(self) -> Path:
        return self.root / ("vmlinuz" if self.debian_boot else "vmlinux")

    @property
    def initrd(self) -> Path:
        return self.root / ("initrd.img" if self.debian_boot else "initramfs.cpio")

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def is_complete(self) -> bool:
        return all(p.is_file() for p in (self.disk, self.kernel, self.initrd, self.manifest))


def images_dir() -> Path:
    return cache_root() / "images"


def cached_image() -> Image | None:
    """The image for the current recipe if it has been built, else None."""
    img = Image(images_dir() / recipe_hash())
    return img if img.is_complete() else None


def missing_host_tools() -> list[str]:
    return [t for t in REQUIRED_HOST_TOOLS if shutil.which(t) is None]


def ensure_image(*, force: bool = False, log: Log = _stderr_log) -> Image:
    """Return the cached image for the current recipe, building it first if needed.

    Concurrent callers (two pytest sessions, a CI matrix on one runner) serialise on a lock
    file, so one builds and the others reuse its result.
    """
    if not force:
        img = cached_image()
        if img is not None:
            return img
    images_dir().mkdir(parents=True, exist_ok=True)
    with (images_dir() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force:
            img = cached_image()
            if img is not None:
                return img
        return build_image(log=log)


def _run(cmd: Sequence[str], *, logfile: Path, log: Log, cwd: Path | None = None) -> None:
    """Run one build step with its output appended to the build log; fail with its tail."""
    log("$ " + shlex.join(cmd))
    with logfile.open("ab") as fh:
        fh.write(("\n$ " + shlex.join(cmd) + "\n").encode())
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, check=False)
    if proc.returncode != 0:
        raise LabError(f"build step failed with status {proc.returncode}: {shlex.join(cmd)}",
                       _tail(logfile))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _dpkg_query(tree: Path, *args: str) -> str:
    return subprocess.run(
        ["dpkg-query", f"--admindir={tree}/var/lib/dpkg", *args],
        check=True, capture_output=True, text=True,
    ).stdout


def build_image(*, log: Log = _stderr_log) -> Image:
    """Build the image for the current recipe from nothing and install it in the cache.

    Needs root (mmdebstrap --mode=root) and network access to the Debian mirrors.
    """
    if os.geteuid() != 0:
        raise LabError("building the lab image needs root (mmdebstrap --mode=root)")
    missing = missing_host_tools()
    if missing:
        raise LabError(f"missing host tools: {', '.join(missing)}; run lab/install-host-deps.sh")

    digest = recipe_hash()
    images = images_dir()
    images.mkdir(parents=True, exist_ok=True)
    final = images / digest
    work = images / f".build-{digest}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    tree = work / "tree"
    logfile = work / "build.log"
    timings: dict[str, float] = {}
    t_all = time.monotonic()
    try:
        log(f"building lab image {digest} in {work} (log: {logfile})")
        t0 = time.monotonic()
        _run(["mmdebstrap", *MMDEBSTRAP_OPTIONS, "--include=" + ",".join(PACKAGES),
              SUITE, str(tree), *host_mirrors()], logfile=logfile, log=log)
        timings["mmdebstrap"] = time.monotonic() - t0

        t0 = time.monotonic()
        _install_file_handler(tree, logfile=logfile, log=log)
        timings["file_handler"] = time.monotonic() - t0

        _customize_tree(tree)
        kernel, initrd = _boot_files(tree)
        shutil.copy2(kernel, work / "vmlinuz")
        shutil.copy2(initrd, work / "initrd.img")
        _fast_boot_files(tree, kernel, work, log=log)
        versions = _dpkg_query(tree, "-W", "-f=${Package} ${Version}\n")

        t0 = time.monotonic()
        _run(["mkfs.ext4", "-q", "-F", "-L", "tm-lab", "-E", "root_owner=0:0",
              "-d", str(tree), str(work / "image.raw"), IMAGE_SIZE], logfile=logfile, log=log)
        timings["mkfs"] = time.monotonic() - t0
        shutil.rmtree(tree)

        timings["total"] = time.monotonic() - t_all
        manifest = {
            "hash": digest,
            "recipe": recipe(),
            "kernel": kernel.name,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "packages": sorted(versions.splitlines()),
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():  # a concurrent build won; keep the one in place
            shutil.rmtree(work)
        else:
            os.rename(work, final)
    except BaseException:
        shutil.rmtree(tree, ignore_errors=True)  # keep build.log for inspection, drop the GBs
        raise
    _prune_old_images(keep=digest, log=log)
    log(f"lab image ready: {final} ({timings['total']:.0f} s)")
    return Image(final)


KEEP_IMAGES = 3
"""Images of other recipes kept besides the newest (each ~1 GB): branches with different
recipes (several worktrees, a bisect) then do not keep rebuilding each other's image."""


def _prune_old_images(*, keep: str, log: Log) -> None:
    """Drop all but the newest few images of other recipes, and leftovers of failed builds."""
    others = []
    for entry in images_dir().iterdir():
        if entry.name in (keep, ".lock"):
            continue
        if entry.name.startswith(".build-"):
            pid = entry.name.rsplit("-", 1)[-1]
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                continue  # another build in progress
            log(f"removing a failed build {entry}")
            shutil.rmtree(entry, ignore_errors=True)
            continue
        others.append(entry)
    others.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    for entry in others[KEEP_IMAGES:]:
        log(f"removing old lab image {entry}")
        shutil.rmtree(entry, ignore_errors=True)


def _customize_tree(tree: Path) -> None:
    """Files the guest needs that no package provides."""
    iscsi = tree / "etc/iscsi"
    iscsi.mkdir(parents=True, exist_ok=True)
    (iscsi / "initiatorname.iscsi").write_text(f"InitiatorName={INITIATOR_NAME}\n")
    # LIO writes persistent-reservation (APTPL) metadata here; without them PR fails NOT READY.
    for d in ("etc/target/pr", "etc/rtslib-fb-target/pr", "src", "out", "root"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "etc/hostname").write_text("tm-lab\n")
    (tree / "etc/fstab").write_text("# the lab guest's init script mounts everything\n")
    init = tree / GUEST_INIT_PATH.lstrip("/")
    shutil.copyfile(INIT_SCRIPT, init)
    init.chmod(0o755)


def _boot_files(tree: Path) -> tuple[Path, Path]:
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise LabError(f"expected one kernel in {tree}/boot, found {[k.name for k in kernels]}")
    kernel = kernels[0]
    initrd = tree / "boot" / ("initrd.img-" + kernel.name.removeprefix("vmlinuz-"))
    if not initrd.is_file():
        raise LabError(f"no initrd beside {kernel}")
    return kernel, initrd


def _fast_boot_files(tree: Path, kernel: Path, work: Path, *, log: Log) -> None:
    """vmlinux (if the kernel can boot through PVH) and the lab initramfs; see lab.initramfs."""
    release = kernel.name.removeprefix("vmlinuz-")
    try:
        (work / "initramfs.cpio").write_bytes(initramfs.build_initramfs(tree, release))
    except (OSError, KeyError) as exc:
        raise LabError(f"cannot build the lab initramfs: {exc}") from exc
    vmlinux = initramfs.extract_vmlinux(kernel) if initramfs.kernel_supports_pvh(
        tree, release) else None
    if vmlinux is None:
        log("kernel cannot boot through PVH: the lab will boot Debian's vmlinuz + initrd")
        (work / "initramfs.cpio").unlink()
        return
    (work / "vmlinux").write_bytes(vmlinux)


def _install_file_handler(tree: Path, *, logfile: Path, log: Log) -> None:
    """Compile tcmu-runner's example `file` handler and put it in the tree's handler dir.

    The .so is built from Debian's source package of the very version installed in the tree,
    and cached per version so image rebuilds for other reasons do not fetch sources again.
    """
    version = _dpkg_query(tree, "-W", "-f=${Version}", "tcmu-runner").strip()
    files = _dpkg_query(tree, "-L", "tcmu-runner").splitlines()
    handler_dirs = {str(Path(f).parent) for f in files if Path(f).name.startswith("handler_")
                    and f.endswith(".so")}
    if len(handler_dirs) != 1:
        raise LabError(f"cannot find tcmu-runner's handler directory (found {handler_dirs})")
    handler_dir = handler_dirs.pop()

    key = hashlib.sha256(json.dumps([version, HANDLER_BUILD]).encode()).hexdigest()[:12]
    cached = cache_root() / "handler" / f"{version}-{key}" / "handler_file.so"
    if not cached.is_file():
        build = cached.parent.with_name(cached.parent.name + f".tmp-{os.getpid()}")
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        try:
            _run(["apt-get", "source", "-qq", f"tcmu={version}"], logfile=logfile, log=log,
                 cwd=build)
            srcs = [p for p in build.iterdir() if p.is_dir() and (p / "file_example.c").is_file()]
            if len(srcs) != 1:
                raise LabError(f"no unpacked tcmu source with file_example.c in {build}",
                               _tail(logfile))
            out = build / "handler_file.so"
            cmd = [str(out) if a == "OUT" else a.replace("SRC", str(srcs[0]))
                   for a in HANDLER_BUILD]
            _run(cmd, logfile=logfile, log=log)
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.replace(out, cached)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    dest = tree / handler_dir.lstrip("/") / "handler_file.so"
    shutil.copyfile(cached, dest)
    dest.chmod(0o644)
    log(f"installed tcmu-runner file handler ({version}) as {handler_dir}/handler_file.so")
