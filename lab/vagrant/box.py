"""Build and cache the Vagrant lab's box: Debian bookworm for vagrant-libvirt, everything baked in.

Why this shape:

* The VMs run under QEMU's software emulation (TCG) on our hosts, where installing one package
  that triggers ``update-initramfs`` (open-iscsi does) costs ~12 minutes inside a VM. So every
  package the provisioning and the tests use is in the box, and the VMs need no mirror at all:
  they talk only to each other and to the host on the lab's own networks.
* No Vagrant Cloud here: the box is built from the host's own Debian mirror with ``mmdebstrap``,
  like the QEMU lab image (:mod:`lab.image`), and cached the same way: in a folder named by a
  hash of the recipe (package list, mirrors, files written into the tree, the box's own
  Vagrantfile, ...), built in a temporary folder and renamed into place only when complete.
* The disk is assembled without mounting anything and without loop devices: ``mkfs.ext4 -d``
  writes the tree at a 1 MiB offset of a raw file, ``sfdisk`` puts one partition around it, and
  GRUB's ``boot.img`` and a ``core.img`` made by ``grub-mkimage`` (with the disk and ext4
  modules built in) go into the MBR and the gap after it. (``grub-install`` wants a block device
  and udev's ``/dev/disk/by-uuid`` links, which a container host lacks.) The kernel command line
  is fixed (root by filesystem UUID, ``net.ifnames=0`` so the NICs are eth0/eth1, serial
  console), GRUB waits zero seconds, and the initrd carries only the virtio/ext4 modules.
* The box's own Vagrantfile (``box.Vagrantfile``) carries the provider settings for software
  emulation, merged under the project's ``vagrant/Vagrantfile``, which stays unchanged for a
  user with KVM.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab import LabError
from lab import image as labimage

#: Bump to force a rebuild when something not covered by the hash changes.
RECIPE_VERSION = 1

SUITE = labimage.SUITE

#: What every VM of the lab has: a bootable systemd system that Vagrant can reach over ssh, our
#: runtime dependencies (Debian's packages; the ones the project's .deb depends on), and what
#: the initiators and the tests run. Nothing is fetched in a VM.
PACKAGES: tuple[str, ...] = (
    # boot and Vagrant's needs (ssh, sudo, rsync for the synced folder, ifupdown for its
    # private-network configuration, dbus for hostnamectl)
    "linux-image-amd64",
    "grub-pc-bin",
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "sudo",
    "ifupdown",
    "isc-dhcp-client",
    "rsync",
    "netbase",
    "iproute2",
    "iputils-ping",
    "procps",
    "kmod",
    # targetmirror's runtime (the target)
    "python3",
    "python3-rtslib-fb",
    "python3-configshell-fb",
    "python3-yaml",
    "python3-pyroute2",
    "python3-prometheus-client",
    "python3-jeepney",
    "python3-tqdm",
    "targetcli-fb",
    # the initiators and the checks
    "open-iscsi",
    "fio",
    "e2fsprogs",
    "sg3-utils",
    "util-linux",
    "curl",
)

#: Modules the initrd needs to mount the root disk (vagrant-libvirt's default disk bus is
#: virtio); nothing else goes in, which saves seconds of every boot under TCG.
INITRD_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")

#: Runs after the essential packages, before linux-image-amd64's postinst builds the initrd.
_INITRD_HOOK = (
    'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"'
    ' && printf "MODULES=list\\nRESUME=none\\n" > "$1/etc/initramfs-tools/conf.d/targetmirror-box"'
    f" && printf '%s\\n' {' '.join(INITRD_MODULES)}"
    ' > "$1/usr/share/initramfs-tools/modules.d/targetmirror-box"'
)

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

#: Kernel module folders no VM of the lab loads (graphics, sound, radio, media, ...): removed
#: to keep the box small (it is copied into libvirt's storage pool on every fresh host).
PRUNED_MODULE_DIRS: tuple[str, ...] = (
    "kernel/drivers/gpu", "kernel/drivers/media", "kernel/drivers/net/wireless",
    "kernel/drivers/infiniband", "kernel/drivers/staging", "kernel/drivers/bluetooth",
    "kernel/drivers/iio", "kernel/drivers/isdn", "kernel/drivers/net/ethernet",
    "kernel/drivers/usb", "kernel/drivers/hid", "kernel/drivers/input", "kernel/sound",
    "kernel/net/bluetooth", "kernel/net/wireless", "kernel/net/mac80211",
)

#: Timers and jobs that only cost CPU in a throwaway VM.
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "e2scrub_reap.service",
    "fstrim.timer", "man-db.timer", "systemd-timesyncd.service",
)

#: Virtual disk size in GiB (sparse; the images of the target's mirrors live on it).
DISK_GIB = 10
PART_OFFSET = 1 << 20

SSH_HOST_KEYS = ("ed25519", "ecdsa")

KERNEL_ARGS = "ro net.ifnames=0 biosdevname=0 console=tty0 console=ttyS0,115200n8 quiet"
GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "normal", "linux", "configfile", "echo",
                "search", "test", "boot")

BOX_VAGRANTFILE = Path(__file__).resolve().parent / "box.Vagrantfile"
BOX_FILE = "targetmirror-lab.box"

REQUIRED_HOST_TOOLS = ("mmdebstrap", "mkfs.ext4", "sfdisk", "qemu-img", "chroot",
                       "systemctl", "dd")

#: Where Debian's vagrant package keeps Vagrant's well-known insecure public key (replaced by a
#: fresh key pair at the first ``vagrant up``); HashiCorp's own package keeps it under /opt.
VAGRANT_KEY_GLOBS = ("/usr/share/rubygems-integration/all/gems/vagrant-*/keys/*.pub",
                     "/usr/share/vagrant/keys/*.pub",
                     "/opt/vagrant/embedded/gems/gems/vagrant-*/keys/*.pub")

Log = Callable[[str], None]


def _stderr_log(msg: str) -> None:
    print(f"[vagrant-box] {msg}", file=sys.stderr, flush=True)


def vagrant_public_keys() -> str:
    """Vagrant's insecure public key(s), as an authorized_keys text."""
    keys: list[str] = []
    for pattern in VAGRANT_KEY_GLOBS:
        for path in sorted(Path("/").glob(pattern.lstrip("/"))):
            text = path.read_text().strip()
            if text and text not in keys:
                keys.append(text)
    if not keys:
        raise LabError("Vagrant's insecure public key was not found (is vagrant installed? "
                       f"looked in {', '.join(VAGRANT_KEY_GLOBS)})")
    return "\n".join(keys) + "\n"


def box_dir() -> Path:
    return labimage.cache_root() / "vagrant-box"


def recipe() -> dict[str, object]:
    """Everything that determines the box's content, in a hashable form."""
    return {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "mirrors": list(labimage.host_mirrors()),
        "packages": sorted(PACKAGES),
        "mmdebstrap": list(MMDEBSTRAP_OPTIONS),
        "pruned_modules": list(PRUNED_MODULE_DIRS),
        "masked": list(MASKED_UNITS),
        "disk_gib": DISK_GIB,
        "kernel_args": KERNEL_ARGS,
        "grub_modules": list(GRUB_MODULES),
        "keys": hashlib.sha256(vagrant_public_keys().encode()).hexdigest(),
        "vagrantfile": hashlib.sha256(BOX_VAGRANTFILE.read_bytes()).hexdigest(),
        "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }


def recipe_hash() -> str:
    blob = json.dumps(recipe(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Box:
    """A built box: the ``.box`` file for ``vagrant box add`` and its manifest."""

    root: Path

    @property
    def digest(self) -> str:
        return self.root.name

    @property
    def path(self) -> Path:
        return self.root / BOX_FILE

    @property
    def name(self) -> str:
        """The name the box is added to Vagrant under: the recipe hash is part of it, so a
        changed recipe is a new box (and a new volume in libvirt's pool), never a stale one."""
        return f"targetmirror-lab-{self.digest}"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def is_complete(self) -> bool:
        return self.path.is_file() and self.manifest.is_file()

    def timings(self) -> dict[str, float]:
        data = json.loads(self.manifest.read_text())
        return dict(data.get("timings_s", {}))


def cached_box() -> Box | None:
    box = Box(box_dir() / recipe_hash())
    return box if box.is_complete() else None


def missing_host_tools() -> list[str]:
    return [t for t in REQUIRED_HOST_TOOLS if shutil.which(t) is None]


def ensure_box(*, force: bool = False, log: Log = _stderr_log) -> Box:
    """The cached box for the current recipe, built first if needed (serialised on a lock)."""
    if not force:
        box = cached_box()
        if box is not None:
            return box
    box_dir().mkdir(parents=True, exist_ok=True)
    with (box_dir() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force:
            box = cached_box()
            if box is not None:
                return box
        return build_box(log=log)


def build_box(*, log: Log = _stderr_log) -> Box:
    """Build the box for the current recipe from nothing and put it in the cache (root)."""
    if os.geteuid() != 0:
        raise LabError("building the Vagrant box needs root (mmdebstrap --mode=root, chroot)")
    missing = missing_host_tools()
    if missing:
        raise LabError(f"missing host tools: {', '.join(missing)}; run "
                       "lab/install-host-deps.sh and lab/vagrant/install-host-deps.sh")
    keys = vagrant_public_keys()
    digest = recipe_hash()
    final = box_dir() / digest
    work = box_dir() / f".build-{digest}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tree = work / "tree"
    logfile = work / "build.log"
    disk = work / "disk.raw"
    timings: dict[str, float] = {}
    t_all = time.monotonic()
    try:
        log(f"building Vagrant box {digest} in {work} (log: {logfile})")
        t0 = time.monotonic()
        labimage._run(["mmdebstrap", *MMDEBSTRAP_OPTIONS, "--include=" + ",".join(PACKAGES),
                       SUITE, str(tree), *labimage.host_mirrors()], logfile=logfile, log=log)
        timings["mmdebstrap"] = time.monotonic() - t0

        t0 = time.monotonic()
        fs_uuid = str(uuid.UUID(hashlib.sha256(digest.encode()).hexdigest()[:32]))
        release = _customize_tree(tree, fs_uuid=fs_uuid, keys=keys, logfile=logfile, log=log)
        core = _grub_core(tree, logfile=logfile, log=log)
        versions = labimage._dpkg_query(tree, "-W", "-f=${Package} ${Version}\n")
        timings["customize"] = time.monotonic() - t0

        t0 = time.monotonic()
        _assemble_disk(tree, disk, core, fs_uuid=fs_uuid, logfile=logfile, log=log)
        shutil.rmtree(tree)
        timings["disk"] = time.monotonic() - t0

        t0 = time.monotonic()
        img = work / "box.img"
        labimage._run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(img)],
                      logfile=logfile, log=log)
        disk.unlink()
        metadata = {"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_GIB}
        (work / "metadata.json").write_text(json.dumps(metadata) + "\n")
        shutil.copyfile(BOX_VAGRANTFILE, work / "Vagrantfile")
        with tarfile.open(work / BOX_FILE, "w") as tar:  # qcow2 is not worth compressing twice
            for name in ("metadata.json", "Vagrantfile", "box.img"):
                tar.add(work / name, arcname=name)
                (work / name).unlink()
        timings["package"] = time.monotonic() - t0

        timings["total"] = time.monotonic() - t_all
        manifest = {
            "hash": digest,
            "recipe": recipe(),
            "kernel": release,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "box_bytes": (work / BOX_FILE).stat().st_size,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "packages": sorted(versions.splitlines()),
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():  # a concurrent build won
            shutil.rmtree(work)
        else:
            os.rename(work, final)
    except BaseException:
        shutil.rmtree(tree, ignore_errors=True)  # keep build.log, drop the GBs
        disk.unlink(missing_ok=True)
        raise
    _prune_old_boxes(keep=digest, log=log)
    size = Box(final).path.stat().st_size >> 20
    log(f"Vagrant box ready: {Box(final).path} ({size} MiB, {timings['total']:.0f} s)")
    return Box(final)


def _prune_old_boxes(*, keep: str, log: Log) -> None:
    for entry in box_dir().iterdir():
        if entry.name in (keep, ".lock"):
            continue
        if entry.name.startswith(".build-"):
            pid = entry.name.rsplit("-", 1)[-1]
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                continue
        log(f"removing old Vagrant box {entry}")
        shutil.rmtree(entry, ignore_errors=True)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _customize_tree(tree: Path, *, fs_uuid: str, keys: str, logfile: Path, log: Log) -> str:
    """Make the tree a Vagrant box: user, ssh, network, fstab, GRUB's configuration."""
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise LabError(f"expected one kernel in {tree}/boot, found {[k.name for k in kernels]}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    if not (tree / "boot" / f"initrd.img-{release}").is_file():
        raise LabError(f"no initrd for kernel {release} in {tree}/boot")

    moddir = tree / "lib/modules" / release
    for sub in PRUNED_MODULE_DIRS:
        shutil.rmtree(moddir / sub, ignore_errors=True)
    labimage._run(["chroot", str(tree), "depmod", "-a", release], logfile=logfile, log=log)

    _write(tree / "etc/hostname", "targetmirror-box\n")
    _write(tree / "etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\ttargetmirror-box\n"
           "::1\tlocalhost ip6-localhost ip6-loopback\n")
    _write(tree / "etc/fstab", f"UUID={fs_uuid}\t/\text4\terrors=remount-ro\t0\t1\n")
    # allow-hotplug, not auto: with an "auto" interface ifupdown-pre.service waits for udev's
    # whole coldplug to settle (a minute under TCG) before networking starts; this way udev
    # brings eth0 up as soon as the NIC is there.
    _write(tree / "etc/network/interfaces",
           "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\n"
           "# Vagrant's management network (ssh from the host)\nallow-hotplug eth0\n"
           "iface eth0 inet dhcp\n")
    # Every VM gets its own identity at first boot: machine-id, ssh host keys, initiator name.
    _write(tree / "etc/machine-id", "")
    (tree / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # Host keys made at first boot, Ed25519 and ECDSA only: a 3072-bit RSA key took most of
    # the 50 s ssh.service needed under TCG. Debian's ssh.service tests its configuration
    # first (sshd -t), which fails without keys: they are made before that test (an empty
    # ExecStartPre= clears the list).
    keygen = " && ".join(
        f"(test -e /etc/ssh/ssh_host_{t}_key || ssh-keygen -q -t {t} -N '' "
        f"-f /etc/ssh/ssh_host_{t}_key)" for t in SSH_HOST_KEYS)
    _write(tree / "etc/systemd/system/ssh.service.d/host-keys.conf",
           f'[Service]\nExecStartPre=\nExecStartPre=/bin/sh -c "{keygen}"\n'
           "ExecStartPre=/usr/sbin/sshd -t\n")
    _write(tree / "etc/ssh/sshd_config.d/targetmirror-box.conf",
           "".join(f"HostKey /etc/ssh/ssh_host_{t}_key\n" for t in SSH_HOST_KEYS)
           + "UseDNS no\n")
    _write(tree / "etc/iscsi/initiatorname.iscsi", "GenerateName=yes\n", 0o600)
    # The VMs never look for packages (everything is baked in), and have nowhere to.
    for unit in MASKED_UNITS:
        labimage._run(["systemctl", f"--root={tree}", "mask", unit], logfile=logfile, log=log)

    labimage._run(["chroot", str(tree), "useradd", "--create-home", "--shell", "/bin/bash",
                   "--user-group", "vagrant"], logfile=logfile, log=log)
    _write(tree / "etc/sudoers.d/vagrant", "vagrant ALL=(ALL) NOPASSWD: ALL\n", 0o440)
    ssh_dir = tree / "home/vagrant/.ssh"
    _write(ssh_dir / "authorized_keys", keys, 0o600)
    ssh_dir.chmod(0o700)
    ids = (tree / "etc/passwd").read_text().splitlines()
    uid, gid = next((int(f[2]), int(f[3])) for f in (line.split(":") for line in ids)
                    if f[0] == "vagrant")
    for path in (ssh_dir, ssh_dir / "authorized_keys"):
        os.chown(path, uid, gid)

    grub = tree / "boot/grub"
    shutil.copytree(tree / "usr/lib/grub/i386-pc", grub / "i386-pc", dirs_exist_ok=True)
    _write(grub / "grub.cfg",
           "# written by lab/vagrant/box.py: no update-grub in the box\n"
           "set timeout=0\nset default=0\n"
           f"search --no-floppy --fs-uuid --set=root {fs_uuid}\n"
           "menuentry 'Debian GNU/Linux (targetmirror lab box)' {\n"
           f"  linux /boot/vmlinuz-{release} root=UUID={fs_uuid} {KERNEL_ARGS}\n"
           f"  initrd /boot/initrd.img-{release}\n"
           "}\n")
    return release


def _grub_core(tree: Path, *, logfile: Path, log: Log) -> bytes:
    """GRUB's core.img for a BIOS boot from the first partition (built with the tree's GRUB)."""
    out = "/root/targetmirror-core.img"  # inside the tree (chroot); removed below
    labimage._run(["chroot", str(tree), "grub-mkimage", "-O", "i386-pc", "-o", out,
                   "-d", "/usr/lib/grub/i386-pc", "-p", "(hd0,msdos1)/boot/grub",
                   *GRUB_MODULES], logfile=logfile, log=log)
    core_path = tree / out.lstrip("/")
    core = core_path.read_bytes()
    core_path.unlink()
    if len(core) > PART_OFFSET - 512:
        raise LabError(f"GRUB's core.img ({len(core)} bytes) does not fit before the partition")
    return core


def _assemble_disk(tree: Path, disk: Path, core: bytes, *, fs_uuid: str, logfile: Path,
                   log: Log) -> None:
    """A raw disk: MBR with GRUB's boot.img, core.img after it, one ext4 partition at 1 MiB."""
    fs_kib = (DISK_GIB << 20) - (PART_OFFSET >> 10)
    labimage._run(["mkfs.ext4", "-q", "-F", "-L", "tm-box", "-U", fs_uuid,
                   "-E", f"offset={PART_OFFSET},root_owner=0:0", "-d", str(tree), str(disk),
                   f"{fs_kib}k"], logfile=logfile, log=log)
    table = f"label: dos\nstart={PART_OFFSET // 512}, type=83, bootable\n"
    with logfile.open("ab") as fh:
        proc = subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", str(disk)],
                              input=table.encode(), stdout=fh, stderr=subprocess.STDOUT,
                              check=False)
    if proc.returncode != 0:
        raise LabError(f"sfdisk failed on {disk}", labimage._tail(logfile))
    boot = (tree / "usr/lib/grub/i386-pc/boot.img").read_bytes()
    with disk.open("r+b") as f:
        f.seek(0)
        f.write(boot[:440])  # the code only: the disk signature and partition table stay
        f.seek(512)
        f.write(core)
    log(f"disk assembled: {disk} (ext4 {fs_uuid} at {PART_OFFSET} bytes, GRUB in the MBR)")
