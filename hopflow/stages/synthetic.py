"""TEST MACHINERY: the synthetic stage burns CPU or sleeps per item and fails on request; it exercises the queue and
the orchestration at scale, no science."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from sqlalchemy import select
from sqlalchemy.orm import Session

from hopflow.models import Run, RunState, SyntheticItem, SyntheticResult
from hopflow.registry import Ranker, StageParams, input_column, register
from hopflow.settings import Settings
from hopflow.stages.common import BY_ID, item_query, result_stage, rows_by_id


@dataclass(frozen=True)
class SyntheticParams(StageParams):
    """The synthetic engine's name and version (a change recomputes every item)."""

    engine: str = "synthetic"
    version: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls()


def _inputs() -> Any:
    return item_query(SyntheticItem, SyntheticItem.priority, SyntheticItem.fingerprint)


def _load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    attempts: dict[int, int] = {item_id: n for item_id, n in session.execute(select(Run.input_id, Run.attempts).where(
        Run.stage == "synthetic", Run.input_id.in_(list(ids)), Run.state.in_(RunState.LIVE)))}
    return {r.id: {"item_id": r.id, "cpu_ms": r.cpu_ms, "sleep_ms": r.sleep_ms, "failure": r.failure,
                   "fail_attempts": r.fail_attempts, "attempt": attempts.get(r.id, 1)}
            for r in rows_by_id(session, SyntheticItem, ids)}


def _store(session: Session, run: Run, result: Any) -> None:
    session.add(SyntheticResult(run_id=run.id, item_id=run.input_id, value=result.value, elapsed_s=result.elapsed_s))


SYNTHETIC = register(result_stage(
    "synthetic", SyntheticItem, SyntheticResult,
    description="TEST MACHINERY: burns CPU or sleeps per item and fails on request; exercises queue and orchestration.",
    input_columns=input_column("item_id"),
    inputs=_inputs,
    params=SyntheticParams,
    load=_load,
    store=_store,
    rankers=(BY_ID, Ranker("priority", "lowest priority value first", expression=lambda c: c.priority)),
    default_ranker="priority",
    resources="local",
    batch_size=20,
    retry_limit=3,
    lease_seconds=300,
))
