"""The settings mirror: stage targets and cutoffs kept in step between the database (the truth) and Prefect Variables
that users edit in the UI."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from sqlalchemy.orm import Session

from hopflow import queue
from hopflow.registry import STAGES, get_stage

TARGETS_VARIABLE = "hopflow_targets"
"""Prefect Variable {stage: live flow runs wanted}; edit it in the UI, the next tick reads it into the database."""
CUTOFFS_VARIABLE = "hopflow_cutoffs"
"""Prefect Variable {stage: {cutoff: value}} for stages that have cutoffs; same round trip as the targets."""
MIRROR_STAGE = "_prefect"
"""stage_settings rows under this pseudo-stage hold the value last written to each Variable (to tell UI edits)."""
UI_EDIT_REASON = "edited in the Prefect UI (variable {name})"


@dataclass(frozen=True)
class MirrorReport:
    """What one settings mirror did: values read back from UI edits, edits rejected, Variables written."""

    read_back: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()
    pushed: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Mirrored:
    """One mirrored Variable: how to read the database's values and apply one edited entry."""

    variable: str
    read: Callable[[Session], dict[str, Any]]
    apply: Callable[[Session, str, str | None, Any, str], None]


def _read_targets(session: Session) -> dict[str, Any]:
    return {name: queue.target(session, stage) for name, stage in sorted(STAGES.items())}


def _apply_target(session: Session, stage_name: str, _key: str | None, value: Any, reason: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"target of {stage_name!r} must be a whole number >= 0, got {value!r}")
    queue.set_target(session, get_stage(stage_name), value, reason)


def _read_cutoffs(session: Session) -> dict[str, Any]:
    return {name: queue.cutoff_values(session, stage) for name, stage in sorted(STAGES.items()) if stage.cutoffs}


def _apply_cutoff(session: Session, stage_name: str, key: str | None, value: Any, reason: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"cutoff {stage_name}.{key} must be a finite number, got {value!r}")
    queue.set_cutoff(session, get_stage(stage_name), str(key), float(value), reason)


_UNSET = object()
MIRRORED = (_Mirrored(TARGETS_VARIABLE, _read_targets, _apply_target),
            _Mirrored(CUTOFFS_VARIABLE, _read_cutoffs, _apply_cutoff))


def _entries(value: Any) -> dict[tuple[str, str | None], Any]:
    """Flatten {stage: n} or {stage: {name: x}} into {(stage, name or None): value}."""
    if not isinstance(value, Mapping):
        return {}
    flat: dict[tuple[str, str | None], Any] = {}
    for stage, inner in value.items():
        if isinstance(inner, Mapping):
            flat.update({(str(stage), str(k)): v for k, v in inner.items()})
        else:
            flat[(str(stage), None)] = inner
    return flat


def mirror_settings(client: SyncPrefectClient, session: Session) -> MirrorReport:
    """Read UI edits of the Variables into the database, then write the database's values to the Variables.

    An entry counts as edited in the UI when it differs from what the controller last wrote there; such an edit is
    recorded in the database with a reason. Everything else flows from the database (the truth) to the Variable, so a
    `hopflow target` or a cutoff broadened by the queue shows up in the UI at the next tick. An invalid edit is
    rejected (reported, then overwritten by the database's value).
    """
    read_back: list[str] = []
    rejected: list[str] = []
    pushed: list[str] = []
    last_written = queue.stage_settings(session, MIRROR_STAGE)
    for mirrored in MIRRORED:
        variable = client.read_variable_by_name(mirrored.variable)
        current = variable.value if variable is not None else None
        last = last_written.get(mirrored.variable)
        if current is not None and last is not None:
            if not isinstance(current, Mapping):
                rejected.append(f"{mirrored.variable}: not a JSON object")
            before, stored = _entries(last), _entries(mirrored.read(session))
            for (stage, key), value in _entries(current).items():
                if before.get((stage, key), _UNSET) == value or stored.get((stage, key), _UNSET) == value:
                    continue
                label = f"{stage}.{key}" if key else stage
                try:
                    mirrored.apply(session, stage, key, value, UI_EDIT_REASON.format(name=mirrored.variable))
                    read_back.append(f"{mirrored.variable}: {label}={value!r}")
                except (KeyError, ValueError) as exc:
                    rejected.append(f"{mirrored.variable}: {label}: {exc}")
        wanted = mirrored.read(session)
        if variable is None:
            client.create_variable(VariableCreate(name=mirrored.variable, value=wanted))
            pushed.append(mirrored.variable)
        elif current != wanted:
            client.update_variable(VariableUpdate(name=mirrored.variable, value=wanted))
            pushed.append(mirrored.variable)
        queue.set_stage_setting(session, MIRROR_STAGE, mirrored.variable, wanted, "mirrored to the Prefect Variable")
    return MirrorReport(tuple(read_back), tuple(rejected), tuple(pushed))
