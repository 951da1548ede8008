"""Maintenance flows: clean-up deletes only old finished flow runs (real Prefect server, hopflow's tables untouched);
checkpoint snapshots SQLite and PostgreSQL and writes one CSV and one Parquet file per table with the right rows."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from prefect import flow
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.states import Cancelled, Completed, Crashed, Failed, Running
from sqlalchemy import func, inspect, select, text

from hopflow import queue
from hopflow.db import is_sqlite, make_engine, session_scope
from hopflow.flows import maintenance
from hopflow.models import Run, RunState
from hopflow.registry import get_stage
from hopflow.tasks.synthetic import SyntheticOutcome

from prefect_helpers import add_synthetic_items

OLD_FINISHED = 52  # more than one bulk-delete call (50 per call)


@flow(name="maintenance-probe")
def probe() -> None:
    """Only its name is used: flow runs are created and moved through states by the test."""


def _flow_run(client, tag: str, *states) -> str:
    run = client.create_flow_run(probe, tags=[tag])
    for state in states:
        client.set_flow_run_state(run.id, state, force=True)
    return str(run.id)


def _tagged(client, tag: str) -> set[str]:
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])), limit=200)
    return {str(r.id) for r in runs}


@pytest.mark.prefect
def test_cleanup_deletes_only_old_finished_flow_runs(engine, prefect_client):
    tag = f"cleanup-test-{uuid.uuid4().hex[:8]}"
    finals = [Completed, Failed, Cancelled, Crashed]
    old = {_flow_run(prefect_client, tag, Running(), finals[i % 4]()) for i in range(OLD_FINISHED)}
    still_running = _flow_run(prefect_client, tag, Running())  # started long ago, not finished
    scheduled = _flow_run(prefect_client, tag)
    time.sleep(1.0)
    boundary = datetime.now(UTC)
    time.sleep(1.0)
    recent_done = _flow_run(prefect_client, tag, Running(), Completed())
    recent_failed = _flow_run(prefect_client, tag, Running(), Failed())
    untagged_old = _flow_run(prefect_client, f"{tag}-other", Running(), Completed())
    add_synthetic_items(engine, 3)
    runs = queue.claim("synthetic", 3, engine=engine, refresh=True)
    owner = sorted(old)[0]
    with session_scope(engine, write=True) as session:  # hopflow runs pointing at a flow run about to go
        queue.attach_flow_run(session, [r.id for r in runs], owner)

    with pytest.raises(ValueError, match="finished flow runs only"):
        maintenance.delete_old_flow_runs(prefect_client, 0, states=["RUNNING"])
    age_days = (datetime.now(UTC) - boundary).total_seconds() / 86400
    report = maintenance.delete_old_flow_runs(prefect_client, age_days, tags=[tag])

    assert report.deleted == OLD_FINISHED
    assert _tagged(prefect_client, tag) == {recent_done, recent_failed, still_running, scheduled}
    assert _tagged(prefect_client, f"{tag}-other") == {untagged_old}
    with session_scope(engine) as session:
        kept = session.scalars(select(Run).where(Run.stage == "synthetic")).all()
    assert len(kept) == 3 and {r.flow_run_id for r in kept} == {owner}

    state = maintenance.cleanup(older_than_days=0, states=["FAILED"], tags=[tag], return_state=True)
    assert state.is_completed() and state.result().deleted == 1
    assert _tagged(prefect_client, tag) == {recent_done, still_running, scheduled}


def _fill(engine) -> None:
    """Items, queued and finished runs with JSON and timestamps, settings, results: every kind of column."""
    items = add_synthetic_items(engine, 25)
    stage = get_stage("synthetic")
    claimed = queue.claim("synthetic", 10, engine=engine, refresh=True)
    with session_scope(engine, write=True) as session:
        queue.set_target(session, stage, 3, "checkpoint test")
        queue.start(session, [c.id for c in claimed])
        for c in claimed[:6]:
            assert queue.complete(session, c.id, SyntheticOutcome(value=float(c.input_id), elapsed_s=0.01))
        queue.fail(session, claimed[6].id, "injected: checkpoint test")
    assert len(items) == 25


def _row_counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {name: conn.execute(select(func.count()).select_from(text(f'"{name}"'))).scalar_one()
                for name in inspect(conn).get_table_names()}


def _restore_postgres(dump: Path, url: str) -> None:
    """Restore `dump` into the empty database at `url`."""
    target = make_engine(url).url
    restore = str(Path(maintenance.find_pg_dump()).with_name("pg_restore"))
    done = subprocess.run([restore, "--no-owner", "--dbname", target.database, str(dump)],
                          env=maintenance._pg_environment(target), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_checkpoint_writes_a_snapshot_and_every_table(engine, tmp_path, postgres_database):
    _fill(engine)
    expected = _row_counts(engine)
    report = maintenance.checkpoint_database(engine, dest=tmp_path / "ck")

    assert report.folder.parent == tmp_path / "ck"
    assert datetime.strptime(report.folder.name, "%Y-%m-%dT%H%M%SZ")
    assert report.rows() == expected and expected["runs"] == 25 and expected["synthetic_results"] == 6
    for table in report.tables:
        assert pq.read_table(table.parquet).num_rows == expected[table.name]
        assert pacsv.read_csv(table.csv).num_rows == expected[table.name]
    runs = pq.read_table(report.folder / "tables" / "runs.parquet").to_pylist()
    assert pa.types.is_timestamp(pq.read_schema(report.folder / "tables" / "runs.parquet").field("claimed_at").type)
    assert {json.loads(r["parameters"])["engine"] for r in runs} == {"synthetic"}
    failed = next(r for r in runs if r["state"] == RunState.FAILED)
    assert json.loads(failed["history"])[-1]["error"] == "injected: checkpoint test"
    manifest = json.loads((report.folder / "manifest.json").read_text())
    assert manifest["tables"] == expected
    assert engine.url.password is None or engine.url.password not in (report.folder / "manifest.json").read_text()

    if is_sqlite(engine):
        assert report.snapshot.name == "hopflow.sqlite"
        copy = make_engine(f"sqlite:///{report.snapshot}")
        assert _row_counts(copy) == expected
        copy.dispose()
    else:
        assert report.snapshot.name == "hopflow.pgdump"
        url = postgres_database()
        _restore_postgres(report.snapshot, url)
        restored = make_engine(url)
        assert _row_counts(restored) == expected
        restored.dispose()


def test_checkpoint_flow_uses_the_home_folder(engine):
    _fill(engine)
    state = maintenance.checkpoint(return_state=True)
    assert state.is_completed()
    report = state.result()
    from hopflow.settings import get_settings

    assert report.folder.parent == get_settings().home / "checkpoints"
    assert {t.name for t in report.tables} >= {"runs", "synthetic_items", "synthetic_results", "stage_settings"}
