"""What several stage modules share: the oldest-first ranker, input queries and row loading, the stage factory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, Select, select
from sqlalchemy.orm import Session

from hopflow.models import Structure
from hopflow.registry import Ranker, Stage

BY_ID = Ranker("id", "oldest input first", expression=lambda c: c.item_id)


def item_query(model: Any, *columns: Any) -> Select[Any]:
    """A stage's input query over the rows of `model`: the row id as `item_id`, then the columns rankers and cutoffs
    read."""
    return select(model.id.label("item_id"), *columns)


def rows_by_id(session: Session, model: Any, ids: Sequence[int]) -> Sequence[Any]:
    """The rows of `model` with these ids."""
    return session.scalars(select(model).where(model.id.in_(list(ids)))).all()


def rows_with_structure(session: Session, model: Any, ids: Sequence[int]) -> Sequence[Row[Any]]:
    """The rows of `model` with these ids, each as (row, its structure's stored cell, the structure's formula)."""
    return session.execute(select(model, Structure.structure, Structure.formula)
                           .join(Structure, Structure.id == model.structure_id)
                           .where(model.id.in_(list(ids)))).all()


def result_stage(name: str, input_model: Any, output_model: Any, **fields: Any) -> Stage:
    """A stage run by the flow `flows/<name>.py:<name>` on the rows of `input_model` (each found again by its content
    `fingerprint`), writing rows of `output_model`; `fields` give the rest (description, inputs, params, load ...)."""
    return Stage(name=name, input_table=input_model.__tablename__, output_table=output_model.__tablename__,
                 output_model=output_model, fingerprint=lambda c: c.fingerprint, entrypoint=f"flows/{name}.py:{name}",
                 **fields)
