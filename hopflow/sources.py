"""Source records: register raw inputs (files, bundled entries, MP documents) once, by their identity."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from pymatgen.core import Structure as PmgStructure
from sqlalchemy import select
from sqlalchemy.orm import Session

from hopflow.models import RunState, Source, Structure

UNKNOWN_FORMAT = "unknown"
"""The format part of the key of a file no reader recognises (migration 0007 writes the same word)."""


def file_key(content_sha256: str, fmt: str | None) -> str:
    """A file source's identity: its content and the format it is read as (a renamed file read another way is
    another input)."""
    return f"{content_sha256}:{fmt or UNKNOWN_FORMAT}"


def register_sources(session: Session, raws: Iterable[Any]) -> list[int]:
    """Store each raw input as a source (or find the stored one with the same kind and key); ids in input order."""
    ids: list[int] = []
    for raw in raws:
        found = session.scalars(select(Source).where(Source.kind == raw.kind, Source.key == raw.key)).first()
        if found is None:
            meta = (asdict(raw.metadata) if is_dataclass(raw.metadata) and not isinstance(raw.metadata, type)
                    else dict(raw.metadata or {}))
            if raw.read_error:
                meta["read_error"] = raw.read_error
            found = Source(kind=raw.kind, key=raw.key, location=raw.location, format=raw.format,
                           payload=raw.payload, meta=meta)
            session.add(found)
            session.flush()
        ids.append(found.id)
    return ids


def stored_with_formula(session: Session, formula: str) -> list[tuple[int, PmgStructure]]:
    """Stored structures of one reduced formula (the cheap pre-filter before StructureMatcher)."""
    rows = session.execute(select(Structure.id, Structure.structure).where(Structure.formula == formula))
    return [(i, PmgStructure.from_dict(d)) for i, d in rows]


def import_outcomes(session: Session, source_ids: Sequence[int], phash: str,
                    locations: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per input (in order, repeats kept): its location, the structure its source gave (new or duplicate), and the
    state and error of its import run under the parameter set `phash` ("queued" when it has none).

    `locations` are the names this command used: a source keeps the name it was first seen under, and an error
    recorded against that name is reported under the name given now.
    """
    from hopflow.models import Run

    ids = list(dict.fromkeys(source_ids))
    sources = {s.id: s for s in session.scalars(select(Source).where(Source.id.in_(ids)))}
    runs = {r.input_id: r for r in session.scalars(
        select(Run).where(Run.stage == "import", Run.param_hash == phash, Run.input_id.in_(ids)))}
    out = []
    for index, source_id in enumerate(source_ids):
        source, run = sources[source_id], runs.get(source_id)
        location = locations[index] if locations is not None else source.location
        error = run.error if run is not None and run.state == RunState.FAILED else None
        if error is not None and location != source.location:
            error = error.replace(source.location, location, 1)
        out.append({"source_id": source.id, "location": location, "structure_id": source.structure_id,
                    "state": run.state if run else RunState.QUEUED, "error": error})
    return out
