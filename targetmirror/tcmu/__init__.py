"""The kernel side of targetmirror: the TCMU protocol, and nothing about SCSI or mirrors.

* :mod:`.layout` — constants, offsets and precompiled structs of the shared map and netlink.
* :mod:`.ring` — :class:`~.ring.Ring`, the command ring as pure code over a buffer.
* :mod:`.uio` — finding ``/dev/uioN`` devices in sysfs, opening and mapping them, configfs.
* :mod:`.netlink` — TCM-USER generic netlink events and their ``*_DONE`` replies.

Submodules are imported explicitly (``from targetmirror.tcmu.ring import Ring``) so that using
the ring does not import pyroute2.
"""
