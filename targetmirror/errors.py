"""The one exception hierarchy of targetmirror.

Every error the project raises on purpose derives from :class:`TargetMirrorError` and carries a
stable, documented ``code`` (a short string) so that the CLI, the control API and logs can report
it without parsing messages (the targetd convention).  Callers catch the narrowest class they can
handle; anything else is a bug.
"""

from __future__ import annotations

from enum import StrEnum


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


class ArgumentsError(ConfigError):
    """A command's arguments have one or more problems; ``problems`` lists every one (one line
    each: the option, what was expected, what was given).  Raised before anything is made."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class RingError(TargetMirrorError):
    """The TCMU shared-memory ring is not what the protocol promises (version, size, entries)."""

    code = "ring"


class DeviceError(TargetMirrorError):
    """A UIO/TCMU device cannot be found, opened, mapped or talked to."""

    code = "device"


class StoreErrorKind(StrEnum):
    """Which operation of an image failed (:attr:`StoreError.kind`).

    A ``StrEnum``: ``err.kind == "read"`` keeps working where a plain string was compared."""

    IO = "io"
    OPEN = "open"
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    DISCARD = "discard"
    TIMEOUT = "timeout"
    SNAPSHOT = "snapshot"
    CLOSED = "closed"
    """The mirror was closing: the call was not made (never a leg failure)."""
    FAILED = "failed"
    """The leg was failed already: the call was not made."""
    REPLACED = "replace"
    """The admin replaced the leg's image (``repair --replace`` of a healthy leg)."""


class StoreError(TargetMirrorError):
    """An image (backing file or block device) failed an open, read, write, flush or discard.

    ``kind`` says which operation failed (a :class:`StoreErrorKind`; a kind it does not list
    stays the plain string it was given) so the SCSI layer can pick the right sense (MEDIUM
    ERROR unrecovered read error vs write error) and the mirror can decide which leg failed.
    """

    code = "store"

    def __init__(self, message: str, *, kind: str = "io", path: str | None = None,
                 errno: int | None = None) -> None:
        super().__init__(message)
        self.kind: StoreErrorKind | str = (StoreErrorKind(kind)
                                           if kind in StoreErrorKind.__members__.values()
                                           else kind)
        self.path = path
        self.errno = errno


class FrozenImageError(StoreError):
    """A write reached an image that is frozen (a split copy): a bug guard, never a failure of
    the leg.  Its message still says "frozen" for code that looked for the word."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message, kind=StoreErrorKind.WRITE, path=path)


class MirrorError(TargetMirrorError):
    """A mirror operation is not allowed in the mirror's current state."""

    code = "mirror"


class LioError(TargetMirrorError):
    """Creating, finding or deleting a LIO object through rtslib-fb failed."""

    code = "lio"


class ProtocolError(TargetMirrorError):
    """A control request or reply that is not valid JSON, too large, of an unknown version or
    operation, or whose arguments do not fit the operation."""

    code = "protocol"


class AccessDenied(TargetMirrorError):
    """The daemon refused a control connection from a user it does not accept."""

    code = "permission"


class BusyError(TargetMirrorError):
    """The daemon serves as many control connections as it allows; try again."""

    code = "busy"


class MirrorBusy(MirrorError, BusyError):
    """Another lifecycle operation is running on the mirror; the message names it.  Both a
    :class:`MirrorError` (a refused mirror operation) and a :class:`BusyError` (try again)."""

    code = "busy"


class InternalError(TargetMirrorError):
    """An operation failed in a way its code did not foresee (a bug; the daemon logs it)."""

    code = "internal"


class LabError(TargetMirrorError):
    """The QEMU lab could not build its image, boot, or run the requested command."""

    code = "lab"
