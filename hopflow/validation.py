"""One validation layer for numbers: checks the storing functions call, and the typer parameter types every command
option that takes a number uses (finite floats, ints within bounds and within SQL's 64-bit integers)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import typer

from hopflow.errors import InvalidValueError
from hopflow.settings import INT64_MAX

INT64_MIN = -(2**63)
SEED_MAX = 2**32 - 1
"""numpy and scikit-learn seeds are unsigned 32-bit integers."""


def check_float(value: Any, name: str, *, ge: float | None = None, gt: float | None = None,
                le: float | None = None) -> float:
    """`value` as a finite float within the bounds, or InvalidValueError naming `name` and the value."""
    if isinstance(value, bool):
        raise InvalidValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InvalidValueError(f"{name} must be a finite number, got {value!r}")
    if ge is not None and number < ge:
        raise InvalidValueError(f"{name} must be >= {ge:g}, got {value!r}")
    if gt is not None and number <= gt:
        raise InvalidValueError(f"{name} must be > {gt:g}, got {value!r}")
    if le is not None and number > le:
        raise InvalidValueError(f"{name} must be <= {le:g}, got {value!r}")
    return number


def check_int(value: Any, name: str, *, ge: int | None = None, le: int = INT64_MAX) -> int:
    """`value` as a whole number within the bounds (at most 64-bit), or InvalidValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        else:
            raise InvalidValueError(f"{name} must be a whole number, got {value!r}")
    if ge is not None and value < ge:
        raise InvalidValueError(f"{name} must be >= {ge}, got {value}")
    if value < INT64_MIN:
        raise InvalidValueError(f"{name} must be >= -2**63, got {value}")
    if value > le:
        raise InvalidValueError(f"{name} must be " + ("< 2**63" if le == INT64_MAX else f"<= {le}") + f", got {value}")
    return value


def check_parameters(parameters: Mapping[str, Any], name: str = "parameter") -> None:
    """Refuse a parameter set holding a float that is not finite (JSON has no NaN; SQLite's json_extract fails on
    it) or an integer beyond 64 bits, anywhere in its nesting."""
    for key, value in parameters.items():
        label = f"{name} {key}"
        if isinstance(value, Mapping):
            check_parameters(value, label)
        elif isinstance(value, (list, tuple)):
            check_parameters({str(i): item for i, item in enumerate(value)}, label)
        elif isinstance(value, float):
            check_float(value, label)
        elif isinstance(value, int) and not isinstance(value, bool):
            check_int(value, label, le=INT64_MAX)


def check_cutoff(cutoff: Any, value: Any) -> float:
    """A stage cutoff's new value: finite and not below the cutoff's `minimum`."""
    return check_float(value, f"cutoff {cutoff.name}", ge=cutoff.minimum)


def check_target(value: Any) -> int:
    """A stage target: a whole number of live runs, >= 0."""
    return check_int(value, "target", ge=0)


# ---------------------------------------------------------------- command-line option callbacks


Callback = Callable[[Any], Any]


def finite_float(*, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Callback:
    """`typer.Option(callback=finite_float(ge=0))`: refuses nan, inf and values out of bounds (typer's `min=` lets
    nan through); None (an option not given) and lists pass through element by element."""
    return _callback(lambda v: check_float(v, "value", ge=ge, gt=gt, le=le))


def bounded_int(*, ge: int | None = None, le: int = INT64_MAX) -> Callback:
    """`typer.Option(callback=bounded_int(ge=1))`: a whole number within bounds, never above 64 bits."""
    return _callback(lambda v: check_int(v, "value", ge=ge, le=le))


def row_id() -> Callback:
    """A row id (ids start at 1 and are 64-bit)."""
    return bounded_int(ge=1)


def _callback(check: Callable[[Any], Any]) -> Callback:
    def validate(value: Any) -> Any:
        if value is None:
            return None
        try:
            return [check(v) for v in value] if isinstance(value, (list, tuple)) else check(value)
        except InvalidValueError as exc:
            # click names the option itself ("Invalid value for '-n': ..."); keep the reason
            raise typer.BadParameter(str(exc).removeprefix("value ")) from None

    return validate
