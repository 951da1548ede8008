"""Error types shared by every stage: an item-level problem is recorded against the item, the stage goes on."""


class HopflowError(Exception):
    """Base class of hopflow's own errors."""


class InputError(HopflowError, ValueError):
    """An input item cannot be processed (bad file, no migrating ion, disorder ...): recorded, not retried."""


class EngineError(HopflowError, RuntimeError):
    """A calculation failed in a way that a retry may fix (crash, timeout, unconverged beyond its limit)."""


class ArchiveError(HopflowError):
    """An archive cannot be exported or imported; nothing was written."""


class ArchiveCorruptError(ArchiveError):
    """The archive file is truncated, not a zip, or a member's bytes differ from its manifest checksum."""


class ArchiveSchemaError(ArchiveError):
    """The archive's format or schema revision is one this hopflow cannot read (e.g. newer than its own)."""


class ArchiveConflictError(ArchiveError):
    """The archive's rows clash with live work in this database (a run of the same identity is claimed or running)."""


NEVER_RETRIED: tuple[type[BaseException], ...] = (
    ValueError, TypeError, AttributeError, NameError, LookupError, AssertionError, ImportError, NotImplementedError,
    ArithmeticError,
)
"""Bad input (InputError is a ValueError, and so are the libraries' parse errors) and programming errors: the same
item fails the same way on every attempt."""


def is_retryable(exc: BaseException) -> bool:
    """The retry policy by type: engine, OS, time-out and lost-worker errors (and whatever else a crash raises) may
    pass on another attempt; bad input and programming errors never do."""
    if isinstance(exc, (EngineError, OSError, TimeoutError, MemoryError)):
        return True
    return not isinstance(exc, NEVER_RETRIED)


# ---------------------------------------------------------------- numbers (hopflow/validation.py)


class InvalidValueError(HopflowError, ValueError):
    """A number given to hopflow (a cutoff, target, parameter or option) is not finite or out of its bounds."""
