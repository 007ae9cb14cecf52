"""The one exception hierarchy of targetmirror.

Every error the project raises on purpose derives from :class:`TargetMirrorError` and carries a
stable, documented ``code`` (a short string) so that the CLI, the control API and logs can report
it without parsing messages (the targetd convention).  Callers catch the narrowest class they can
handle; anything else is a bug.
"""

from __future__ import annotations


class TargetMirrorError(Exception):
    """Base class: a failure targetmirror knows how to name."""

    code = "error"


class ConfigError(TargetMirrorError):
    """A configuration value (file, key or cfgstring) is missing or malformed."""

    code = "config"


class ConfigFileError(ConfigError):
    """A configuration file has one or more problems; ``problems`` lists every one.

    Each problem is one line naming the file, the key path and what was expected, so an admin
    fixes the whole file in one pass.
    """

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems in {path}:\n  " + "\n  ".join(self.problems)
        super().__init__(text)


class RingError(TargetMirrorError):
    """The TCMU shared-memory ring is not what the protocol promises (version, size, entries)."""

    code = "ring"


class DeviceError(TargetMirrorError):
    """A UIO/TCMU device cannot be found, opened, mapped or talked to."""

    code = "device"


class StoreError(TargetMirrorError):
    """An image (backing file or block device) failed an open, read, write, flush or discard.

    ``kind`` says which operation failed ("open", "read", "write", "flush", "discard") so the SCSI
    layer can pick the right sense (MEDIUM ERROR unrecovered read error vs write error) and the
    mirror can decide which leg failed.
    """

    code = "store"

    def __init__(self, message: str, *, kind: str = "io", path: str | None = None,
                 errno: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path
        self.errno = errno


class FrozenImageError(StoreError):
    """A write reached an image frozen as a split copy: a bug guard, never a leg failure."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message, kind="frozen", path=path)


class MirrorError(TargetMirrorError):
    """A mirror operation is not allowed in the mirror's current state."""

    code = "mirror"


class MirrorBusy(MirrorError):
    """Another lifecycle operation is running on the mirror; the message names it."""

    code = "busy"


class LioError(TargetMirrorError):
    """Creating, finding or deleting a LIO object through rtslib-fb failed."""

    code = "lio"


class LabError(TargetMirrorError):
    """The QEMU lab could not build its image, boot, or run the requested command."""

    code = "lab"
