"""Chaos, scaled down: benchmarks/chaos.py on fewer items (injected exceptions, hangs and exits, SIGKILLed flow runs,
a controller killed mid-tick, PostgreSQL connections dropped twice) ends with nothing lost and nothing written twice."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import Engine

from hopflow.db import init_db, make_engine
from hopflow.models import RunState

ROOT = Path(__file__).resolve().parents[1]
ITEMS = 300  # the benchmark runs 1,000; 300 keep the test within a few minutes on 2 cores
KILLS = 8  # the benchmark kills 20 flow-run processes


def _chaos_module() -> ModuleType:
    """benchmarks/ is no package: load the benchmark module from its file."""
    spec = importlib.util.spec_from_file_location("hopflow_chaos", ROOT / "benchmarks" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def postgres_engine(monkeypatch: pytest.MonkeyPatch, postgres_database) -> Iterator[Engine]:
    url = postgres_database()
    monkeypatch.setenv("HOPFLOW_DATABASE_URL", url)
    engine = init_db(make_engine(url))
    yield engine
    engine.dispose()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.prefect
def test_chaos_run_loses_nothing_and_writes_nothing_twice(postgres_engine, prefect_client, tmp_path, capsys):
    chaos = _chaos_module()
    config = dataclasses.replace(chaos.ChaosConfig(), items=ITEMS, kills=KILLS, timeout_s=540.0)
    report = chaos.run_chaos(postgres_engine, prefect_client, config, tmp_path)
    with capsys.disabled():
        print("\n" + "\n".join(report.lines()))
    audit, events = report.audit, report.events

    # the faults really happened
    assert audit.injected == {"exception": 30, "hang": 30, "exit": 30}
    assert audit.permanent == 15
    # every injected failure was seen, each costing its own item alone: a hang its item process killed at the time
    # limit, an exit its item process dead (a random kill of the flow run may end either first)
    assert all(audit.injected_seen[k] > 0 for k in ("exception", "hang", "exit")), audit.injected_seen
    assert audit.reasons.get("time limit", 0) > 0 and audit.reasons.get("item process died", 0) > 0
    assert len(events.kills) == KILLS
    assert events.controller_killed and events.controller_claimed > 0
    assert len(events.db_drops) == 2
    killed = chaos.flow_run_states(prefect_client, events.kills)  # not all are the ticks' (one, the killed tick's)
    assert killed == {"CRASHED": KILLS}, killed

    # and nothing was lost or written twice; every item ended with its attempts and reasons
    assert audit.items == ITEMS and audit.runs == ITEMS
    assert audit.lost == 0
    assert audit.results_twice == 0 and audit.done_without_one_result == 0 and audit.failed_with_result == 0
    assert set(audit.by_state) <= {RunState.DONE, RunState.FAILED}
    assert audit.permanent_failed_at_limit == audit.permanent  # raising every time: failed for good, at the limit
    assert audit.innocent_failed == 0  # every other item ends done
    assert audit.by_state == {RunState.DONE: ITEMS - audit.permanent, RunState.FAILED: audit.permanent}
    assert audit.over_retry_limit == 0 and max(audit.attempts) <= audit.max_attempts
    assert audit.missing_reasons == 0
    assert audit.reasons.get("flow run crashed", 0) > 0
    assert audit.clean
