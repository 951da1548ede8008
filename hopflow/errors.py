"""Error types shared by every stage: an item-level problem is recorded against the item, the stage goes on."""


class HopflowError(Exception):
    """Base class of hopflow's own errors."""


class InputError(HopflowError, ValueError):
    """An input item cannot be processed (bad file, no migrating ion, disorder ...): recorded, not retried."""


class EngineError(HopflowError, RuntimeError):
    """A calculation failed in a way that a retry may fix (crash, timeout, unconverged beyond its limit)."""
