"""hopflow's errors in one hierarchy (all under HopflowError), and the retry policy by type (`is_retryable`): bad
input and set-up never, engine, OS, service and lost-worker failures yes, programming errors never.

An item-level problem is recorded against the item, and the stage goes on."""

from __future__ import annotations

import sys


class HopflowError(Exception):
    """Base class of hopflow's own errors."""


# ---------------------------------------------------------------- never retried: the same input fails the same way


class InputError(HopflowError, ValueError):
    """An input item cannot be processed (bad file, no migrating ion, disorder ...): recorded, not retried."""


class InvalidValueError(HopflowError, ValueError):
    """A number given to hopflow (a cutoff, target, parameter or option) is not finite or out of its bounds
    (hopflow/validation.py)."""


class InsufficientDataError(HopflowError, ValueError):
    """A model or calibration cannot be fitted to the data given (too few samples, no spread, non-finite values)."""


class ConfigurationError(HopflowError):
    """hopflow is set up wrongly (a cluster profile, a missing key ...): not retried, the set-up must change."""


class ProfileError(ConfigurationError, ValueError):
    """A cluster profile is missing or malformed (unknown key, wrong cluster kind ...)."""


class MissingAPIKeyError(ConfigurationError, RuntimeError):
    """No Materials Project API key is configured (the message never contains a key)."""


class ProgrammingError(HopflowError):
    """hopflow's own code broke one of its rules (a bug): not retried, the same code breaks it again."""


class ImmutableResultError(ProgrammingError, RuntimeError):
    """Raised when code tries to change or delete a result row that is already written."""


# ---------------------------------------------------------------- retried: another attempt may pass


class EngineError(HopflowError, RuntimeError):
    """A calculation failed in a way that a retry may fix (crash, timeout, unconverged beyond its limit)."""


class SyntheticFailure(EngineError):
    """The exception the synthetic stage (test machinery, tasks/synthetic.py) raises when told to: it stands for an
    engine failure, so it is retried like one."""


class WorkerLostError(EngineError):
    """The process running an item died under it (its isolated item process, or a Dask worker with the item alone in
    its chunk, so the item likely killed it: a segfault, the OOM killer, an os._exit): retried like an engine failure;
    the message says how it died."""


class TimeLimitError(EngineError):
    """An item ran past its stage's time limit and the process running it was killed (hopflow.isolation): retried,
    since a hang may be the machine's (a stalled file system) rather than the input's."""


class ServiceError(HopflowError, RuntimeError):
    """An outside service failed (network, server, authentication): a retry may pass."""


class MaterialsProjectError(ServiceError):
    """A Materials Project query failed (network, authentication, server); the message never contains the key."""


# ---------------------------------------------------------------- archives (`hopflow export` / `import-archive`)


class ArchiveError(HopflowError):
    """An archive cannot be exported or imported; nothing was written."""


class ArchiveCorruptError(ArchiveError):
    """The archive file is truncated, not a zip, or a member's bytes differ from its manifest checksum."""


class ArchiveSchemaError(ArchiveError):
    """The archive's format or schema revision is one this hopflow cannot read (e.g. newer than its own)."""


class ArchiveConflictError(ArchiveError):
    """The archive's rows clash with live work in this database (a run of the same identity is claimed or running)."""


# ---------------------------------------------------------------- the retry policy


NEVER_RETRIED_HOPFLOW: tuple[type[HopflowError], ...] = (
    InputError, InvalidValueError, InsufficientDataError, ConfigurationError, ProgrammingError, ArchiveCorruptError,
    ArchiveSchemaError,
)
"""hopflow's own verdicts that no attempt changes; they win over any other base an error has."""

RETRIED: tuple[type[BaseException], ...] = (
    EngineError, ServiceError, ArchiveConflictError, OSError, TimeoutError, MemoryError,
)
"""Engine and service failures, OS errors (distributed's CommClosedError among them), time-outs and memory
exhaustion: another attempt, perhaps on another worker, may pass (an archive conflict passes once the live work
ends)."""

LOST_WORKER_ERRORS = ("KilledWorker", "CommClosedError")
"""distributed's errors for a worker that died or dropped its connection (looked up on the `distributed` module only
when it is imported: an error of it cannot exist otherwise)."""

NEVER_RETRIED: tuple[type[BaseException], ...] = (
    ValueError, TypeError, AttributeError, NameError, LookupError, AssertionError, ImportError, NotImplementedError,
    ArithmeticError,
)
"""Bad input (InputError is a ValueError, and so are the libraries' parse errors) and programming errors: the same
item fails the same way on every attempt."""


def is_lost_worker(exc: BaseException) -> bool:
    """Whether `exc` is distributed's error for a worker that died or dropped its connection (LOST_WORKER_ERRORS)."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return False
    modules = (distributed, sys.modules.get("distributed.comm"))  # CommClosedError is not exported at the top
    types = tuple(t for name in LOST_WORKER_ERRORS for module in modules
                  if isinstance(t := getattr(module, name, None), type))
    return bool(types) and isinstance(exc, types)


def is_retryable(exc: BaseException) -> bool:
    """The retry policy by type. Never: hopflow's bad-input, set-up and programming errors (NEVER_RETRIED_HOPFLOW).
    Yes: engine, service, OS, time-out, memory and lost-worker errors (RETRIED, LOST_WORKER_ERRORS). Never: other bad
    input and programming errors (NEVER_RETRIED). Yes: whatever else a crash raises."""
    if isinstance(exc, NEVER_RETRIED_HOPFLOW):
        return False
    if isinstance(exc, RETRIED) or is_lost_worker(exc):
        return True
    return not isinstance(exc, NEVER_RETRIED)
