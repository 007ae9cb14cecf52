"""Images: the raw files and block devices that back a mirror's legs."""

from targetmirror.store.image import Image

__all__ = ["Image"]
