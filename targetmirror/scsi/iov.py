"""Helpers over scatter-gather lists (sequences of memoryviews), without copying on the hot path.

READ and WRITE hand the backend slices of the caller's own memoryviews (the TCMU data area), so
data is never copied in Python.  Only emulated replies and small parameter lists are copied, with
:func:`copy_out` and :func:`gather`.
"""

from __future__ import annotations

from collections.abc import Sequence


def _bytes_view(view: memoryview) -> memoryview:
    """A 1-D byte view of ``view``, so that slicing counts bytes whatever the caller's format."""
    if view.ndim == 1 and view.itemsize == 1:
        return view
    return view.cast("B")


def iov_len(iov: Sequence[memoryview]) -> int:
    """Total bytes in ``iov``."""
    return sum(v.nbytes for v in iov)


def slice_iov(iov: Sequence[memoryview], length: int) -> list[memoryview]:
    """The first ``length`` bytes of ``iov`` as views into the same memory (no copy).

    The caller has checked that ``iov`` holds at least ``length`` bytes.  Empty segments are
    dropped so the backend never sees a zero-length iovec.
    """
    out: list[memoryview] = []
    remaining = length
    for view in iov:
        if remaining <= 0:
            break
        n = min(view.nbytes, remaining)
        if n == 0:
            continue
        flat = _bytes_view(view)
        out.append(flat if n == flat.nbytes else flat[:n])
        remaining -= n
    return out


def copy_out(data: bytes, iov: Sequence[memoryview]) -> int:
    """Copy ``data`` into ``iov`` as far as it fits; return the number of bytes copied."""
    pos = 0
    for view in iov:
        if pos >= len(data):
            break
        n = min(view.nbytes, len(data) - pos)
        if n == 0:
            continue
        _bytes_view(view)[:n] = data[pos : pos + n]
        pos += n
    return pos


def gather(iov: Sequence[memoryview], start: int, length: int) -> bytes:
    """Copy bytes ``[start, start + length)`` of ``iov`` (the caller checked they exist)."""
    parts: list[bytes] = []
    skip = start
    remaining = length
    for view in iov:
        if remaining <= 0:
            break
        size = view.nbytes
        if skip >= size:
            skip -= size
            continue
        n = min(size - skip, remaining)
        parts.append(_bytes_view(view)[skip : skip + n].tobytes())
        remaining -= n
        skip = 0
    return b"".join(parts)


def first_difference(a: bytes | memoryview, b: bytes | memoryview) -> int | None:
    """Index of the first byte where equal-length ``a`` and ``b`` differ, or None.

    Compares 4 KiB windows with C-speed equality first, so only one window is walked in Python.
    """
    window = 4096
    for base in range(0, len(a), window):
        x = a[base : base + window]
        y = b[base : base + window]
        if x != y:
            for i, (p, q) in enumerate(zip(bytes(x), bytes(y), strict=True)):
                if p != q:
                    return base + i
    return None
