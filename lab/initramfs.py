"""Fast-boot files for the lab guest, made from the image tree: an uncompressed kernel and a
tiny initramfs.

Measured under TCG on the project's kind of machine: Debian's xz-compressed bzImage spends
~4 s decompressing itself before the kernel's clock even starts, and Debian's initramfs spends
~7 s starting udev and coldplugging devices. QEMU can boot the decompressed ELF ``vmlinux``
directly through the PVH entry point (Debian builds with CONFIG_PVH=y), and a busybox-static
initramfs that insmods the few modules needed for the root disk and 9p does the rest in a
fraction of a second. Together that halves the boot.

Pure stdlib: ``lzma`` for the kernel and a hand-written ``newc`` cpio archive.
"""

from __future__ import annotations

import lzma
import stat
from collections.abc import Iterable
from pathlib import Path

#: Modules the initramfs loads (their dependencies are added from modules.dep).
INITRAMFS_MODULES: tuple[str, ...] = (
    "virtio_pci", "virtio_blk", "crc32c_generic", "ext4",
    "9pnet_virtio", "9p", "configfs",
)

INIT_SCRIPT = Path(__file__).resolve().parent / "tm-lab-initramfs-init"
_XZ_MAGIC = b"\xfd7zXZ\x00"


def extract_vmlinux(bzimage: Path) -> bytes | None:
    """The ELF kernel inside an xz-compressed bzImage, or None if there is none."""
    data = bzimage.read_bytes()
    pos = data.find(_XZ_MAGIC)
    while pos >= 0:
        try:
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[pos:])
        except lzma.LZMAError:
            out = b""
        if out[:4] == b"\x7fELF":
            return out
        pos = data.find(_XZ_MAGIC, pos + 1)
    return None


def kernel_supports_pvh(tree: Path, release: str) -> bool:
    config = tree / "boot" / f"config-{release}"
    return config.is_file() and "\nCONFIG_PVH=y\n" in config.read_text(errors="replace")


def module_order(modules_dir: Path, wanted: Iterable[str]) -> list[str]:
    """Paths (relative to ``modules_dir``) of ``wanted`` and their dependencies, each after
    everything it depends on, read from modules.dep."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0]
        by_name[name] = by_name[name.replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name not in by_name:
            raise KeyError(f"module {name} not in {modules_dir}/modules.dep")
        visit(by_name[name])
    return order


class CpioWriter:
    """Writes a ``newc`` cpio archive, the format the kernel unpacks as an initramfs."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
               ) -> None:
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        blob = header + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4)
        self.parts.append(blob + data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        out = b"".join(self.parts)
        return out + b"\0" * (-len(out) % 512)


def build_initramfs(tree: Path, release: str) -> bytes:
    """The lab initramfs for kernel ``release`` of the image tree ``tree``."""
    busybox = tree / "bin" / "busybox"
    if not busybox.is_file():
        raise FileNotFoundError(f"{busybox} (package busybox-static) is missing")
    modules_dir = tree / "lib" / "modules" / release
    order = module_order(modules_dir, INITRAMFS_MODULES)
    cpio = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "root", "lib", "lib/modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    names = []
    for rel in order:
        name = Path(rel).name
        cpio.file(f"lib/modules/{name}", (modules_dir / rel).read_bytes())
        names.append(name)
    cpio.file("modules", ("\n".join(names) + "\n").encode())
    return cpio.finish()
