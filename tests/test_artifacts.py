"""What the Prefect UI shows: every stage flow run publishes a markdown summary with its failures and the report's
path (read back from the real Prefect server), and data strings are escaped for markdown and HTML."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from hopflow.db import init_db, session_scope
from hopflow.flows.artifacts import md, md_table, report_path
from hopflow.flows.batch import run_batch
from hopflow.models import Run, SyntheticItem
from hopflow.settings import get_settings

from prefect_helpers import add_synthetic_items, latest_artifact

HOSTILE = "<img src=x onerror=alert(1)>[bold]x.cif | *y*"


def test_data_strings_are_literal_markdown() -> None:
    text = md(HOSTILE)
    assert "<" not in text and "onerror=alert\\(1\\)" in text and "\\[bold\\]" in text and "\\|" in text
    table = md_table(["file"], [(HOSTILE,)])
    assert table.splitlines()[2].count(" | ") == 0  # the cell's pipe does not split the row


@pytest.mark.prefect
def test_stage_flow_run_publishes_its_summary_and_the_report_path(prefect_client, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setenv("HOPFLOW_DASK_PROFILE", "local-threads")
    get_settings.cache_clear()  # settings are read once per process
    engine = init_db()
    ids = add_synthetic_items(engine, 6, cpu_ms=1.0)
    with session_scope(engine, write=True) as session:
        session.get(SyntheticItem, ids[0]).failure = "exception"
        session.get(SyntheticItem, ids[0]).fail_attempts = 5
    report = run_batch("synthetic")
    assert len(report.done) == 5 and len(report.failed) == 1

    artifact = latest_artifact(prefect_client, "hopflow-stage-synthetic")
    with session_scope(engine) as session:
        flow_runs = set(session.scalars(select(Run.flow_run_id).where(Run.stage == "synthetic")))
    assert artifact.type == "markdown" and {str(artifact.flow_run_id)} == flow_runs
    assert "synthetic: 5 done \\(0 from cache\\), 1 failed" in artifact.data
    (failed_run,) = report.failed
    assert f"| {failed_run} | SyntheticFailure: injected failure" in artifact.data
    assert f"hopflow trace {failed_run}" in artifact.data
    assert f"`{report_path().resolve().as_uri()}`" in artifact.data
