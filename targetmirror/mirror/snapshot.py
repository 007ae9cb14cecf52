"""A split mirror's image A served read-only, so a backup tool can read it over iSCSI (claim 5).

Only an image that the state store records as the A leg of a *split* mirror may be exported:
exporting a live leg read-only would show a backup tool data that changes under it.
"""

from __future__ import annotations

from collections.abc import Sequence

from targetmirror.errors import MirrorError, StoreError
from targetmirror.mirror.state import State, StateStore
from targetmirror.store.image import Image


def owning_split_mirror(store: StateStore, image: str) -> str:
    """The name of the split mirror whose A is ``image``; raise if there is none."""
    for st in store.all():
        if st.image_a == image:
            if st.state != State.SPLIT:
                raise MirrorError(f"image {image} is A of mirror {st.name}, which is "
                                  f"{st.state}: only a split copy may be exported")
            return st.name
    raise MirrorError(f"image {image} is not the A image of any mirror this daemon knows")


class SnapshotVolume:
    """``BlockBackend`` over one image opened read-only; writes are refused."""

    write_cache = True

    def __init__(self, image: Image, size: int, block_size: int, mirror: str) -> None:
        if image.size < size:
            raise MirrorError(f"snapshot image {image.path} has {image.size} bytes, the LUN "
                              f"needs {size}")
        self.image = image
        self.mirror = mirror
        self.size = size
        self.block_size = block_size
        self.num_blocks = size // block_size

    def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        self.image.readv(offset, iov)

    def _refuse(self) -> None:
        raise StoreError(f"snapshot of {self.mirror} is read-only", kind="write",
                         path=self.image.path)

    def write(self, offset: int, iov: Sequence[memoryview], fua: bool) -> None:
        self._refuse()

    def flush(self) -> None:
        """Nothing to flush on a read-only copy."""

    def unmap(self, offset: int, length: int) -> None:
        self._refuse()

    def write_zeroes(self, offset: int, length: int) -> None:
        self._refuse()

    def compare_and_write(self, offset: int, verify: memoryview,
                          data: memoryview) -> int | None:
        self._refuse()
        return None

    def status(self) -> dict[str, object]:
        return {"name": "", "state": "snapshot", "of": self.mirror, "image": self.image.path,
                "size": self.size}

    def close(self) -> None:
        self.image.close()
