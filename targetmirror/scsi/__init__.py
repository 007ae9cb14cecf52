"""The SCSI semantics layer: CDB parsing, sense data, emulated replies, dispatch to a backend.

Pure code over bytes: nothing here touches files, mmap or the ring.  The entry point is
:class:`targetmirror.scsi.handler.ScsiDevice`; what it needs from below is
:class:`targetmirror.scsi.backend.BlockBackend`.
"""

from targetmirror.scsi.backend import BlockBackend
from targetmirror.scsi.handler import DeviceIdentity, ScsiDevice, ScsiResult

__all__ = ["BlockBackend", "DeviceIdentity", "ScsiDevice", "ScsiResult"]
