"""Mirror policy: legs, range locks (later epochs, bitmaps and resync). No mmap, no configfs."""

from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.rangelock import RangeLock

__all__ = ["Mirror", "RangeLock"]
