"""Source records: register raw inputs (files, bundled entries, MP documents) once, by their identity."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from pymatgen.core import Structure as PmgStructure
from sqlalchemy import select
from sqlalchemy.orm import Session

from hopflow.models import Source, Structure


def register_sources(session: Session, raws: Iterable[Any]) -> list[int]:
    """Store each raw input as a source (or find the stored one with the same kind and key); ids in input order."""
    ids: list[int] = []
    for raw in raws:
        found = session.scalars(select(Source).where(Source.kind == raw.kind, Source.key == raw.key)).first()
        if found is None:
            meta = asdict(raw.metadata) if is_dataclass(raw.metadata) else dict(raw.metadata or {})
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


def import_outcomes(session: Session, source_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Per source: its location, the structure it gave (new or duplicate), or the error recorded for it."""
    from hopflow.models import Run

    out = []
    for source in session.scalars(select(Source).where(Source.id.in_(list(source_ids))).order_by(Source.id)):
        run = session.scalars(select(Run).where(Run.stage == "import", Run.input_id == source.id)
                              .order_by(Run.id.desc())).first()
        out.append({"source_id": source.id, "location": source.location, "structure_id": source.structure_id,
                    "state": run.state if run else "queued", "error": run.error if run else None})
    return out
