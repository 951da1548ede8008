"""Secrets and injection: a known fake MP key and database password appear nowhere hopflow writes or prints;
ranker and cutoff names are checked against the registry and cutoff values reach SQL as bound parameters."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from hopflow import queue
from hopflow.db import get_engine, make_engine, session_scope
from hopflow.models import Run, SyntheticItem
from hopflow.registry import Cutoff, NoParams, Stage, get_stage
from hopflow.settings import get_settings

FAKE_MP_KEY = "FAKEmpKEYsecret0123456789abcdefg"  # 32 characters, like a real key, so mp-api goes on to the network
FAKE_DB_PASSWORD = "pw-FAKE-" + "s3cr3t-Zq7"
INJECTION = "x; DROP TABLE runs"


@pytest.fixture
def secret_database(monkeypatch, tmp_path, postgres_url):
    """A database on the test PostgreSQL server owned by a new role whose password is FAKE_DB_PASSWORD."""
    suffix = uuid.uuid4().hex[:10]
    role, name = f"hopflow_role_{suffix}", f"hopflow_secret_{suffix}"
    admin = make_engine(postgres_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{FAKE_DB_PASSWORD}'"))
        conn.execute(text(f'CREATE DATABASE "{name}" OWNER {role}'))
    url = make_url(postgres_url).set(username=role, password=FAKE_DB_PASSWORD, database=name)
    url_text = url.render_as_string(hide_password=False)
    assert FAKE_DB_PASSWORD in url_text
    monkeypatch.setenv("HOPFLOW_DATABASE_URL", url_text)
    monkeypatch.setenv("MP_API_KEY", FAKE_MP_KEY)
    get_settings.cache_clear()
    get_engine.cache_clear()
    yield url_text
    get_engine().dispose()
    get_engine.cache_clear()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
    admin.dispose()


def _files_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in sorted(root.rglob("*")) if p.is_file())


def test_secrets_never_appear(secret_database, tmp_path, caplog) -> None:
    from hopflow.cli.main import app
    from hopflow.errors import MaterialsProjectError
    from hopflow.flows.batch import import_raw_inputs
    from hopflow.flows.pathways import pathways
    from hopflow.tasks.structures import MPApiClient, MPCriteria, bundled_inputs, file_inputs

    assert get_settings().mp_api_key.get_secret_value() == FAKE_MP_KEY
    caplog.set_level(logging.DEBUG)
    produced: list[str] = []
    runner = CliRunner()
    for args in (["status"], ["status", "--json"], ["init"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        produced.append(result.output)
    status = json.loads(produced[1])
    assert status["database"].startswith("postgresql") and "***" in status["database"]

    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\nnot a cif\n")
    outcomes = import_raw_inputs([*file_inputs([bad]), *(r for r in bundled_inputs() if r.location == "CaF2")])
    assert {o["state"] for o in outcomes} == {"done", "failed"}
    produced += [str(o["error"]) for o in outcomes]

    with pytest.raises(MaterialsProjectError) as info:
        MPApiClient().search(MPCriteria(limit=1))  # offline: the query fails
    produced += [str(info.value), repr(info.value), repr(MPApiClient())]

    report = pathways(parameters={"max_hop": 4.0})
    assert report.done, report.summary
    produced.append(report.summary)

    with session_scope() as session:
        runs = session.scalars(select(Run)).all()
        assert {r.stage for r in runs} == {"import", "pathways"}
        produced += [json.dumps([r.error, r.history, r.parameters, r.versions, r.claimant, r.host], default=str)
                     for r in runs]
    produced.append(caplog.text)
    produced.append(_files_text(tmp_path))  # HOPFLOW_HOME and everything else the test wrote
    everything = "\n".join(produced)
    assert "Materials Project query failed" in everything and "unreadable CIF" in everything
    assert FAKE_MP_KEY not in everything
    assert FAKE_DB_PASSWORD not in everything


# ---------------------------------------------------------------- injection


def test_ranker_and_cutoff_names_are_checked(engine) -> None:
    stage = get_stage("pathways")
    with session_scope(write=True) as session:
        with pytest.raises(KeyError, match="has no cutoff"):
            queue.set_cutoff(session, stage, INJECTION, 1.0)
        with pytest.raises(KeyError, match="has no ranker"):
            queue.set_active_ranker(session, stage, INJECTION)
        with pytest.raises(KeyError, match="has no ranker"):
            queue.rank(session, stage, INJECTION)
    with pytest.raises(KeyError, match="has no ranker"):
        queue.claim("pathways", 5, ranker=INJECTION, engine=engine)
    with pytest.raises(KeyError, match="unknown stage"):
        queue.claim(INJECTION, 5, engine=engine)
    runner = CliRunner()
    from hopflow.cli.main import app

    result = runner.invoke(app, ["target", INJECTION, "3"])
    assert result.exit_code != 0 and "unknown stage" in result.output
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 0  # the runs table is still there
        assert queue.stage_settings(session, "pathways") == {}


def test_cutoff_values_are_bound_parameters(engine, register_stage) -> None:
    marker = 0.123456789
    stage = Stage(
        name="secrets-cutoff-test", description="test stage with a cutoff", input_table="synthetic_items",
        inputs=lambda: select(SyntheticItem.id.label("item_id"), SyntheticItem.priority),
        params=NoParams, load=lambda session, ids: {}, store=lambda session, run, result: None,
        reuse=lambda session, run, old: None,
        rankers=(get_stage("synthetic").ranker("id"),), default_ranker="id",
        cutoffs=(Cutoff("max_priority", "priority at most", 1.0, lambda c, v: c.priority <= v),),
    )
    register_stage(stage)
    with session_scope(write=True) as session:
        session.add_all(SyntheticItem(priority=p) for p in (0.1, 0.2, 5.0))
        session.flush()
        queue.enqueue(session, stage)
        assert session.scalar(select(func.count()).select_from(Run).where(Run.stage == stage.name)) == 3
        with pytest.raises(ValueError):
            queue.set_cutoff(session, stage, "max_priority", "1 OR 1=1")  # type: ignore[arg-type]
        queue.set_cutoff(session, stage, "max_priority", marker)
        cutoffs = queue.cutoff_values(session, stage)
        stmt = queue.claim_statement(session, stage, 10, "id", queue.param_hash(queue.stage_parameters(stage)),
                                     "c", 60, cutoffs)
        compiled = stmt.compile(dialect=session.get_bind().dialect)
        assert str(marker) not in str(compiled) and "0.1234" not in str(compiled)
        assert marker in compiled.params.values()
        claimed = session.execute(stmt).all()
        assert len(claimed) == 1  # only priority 0.1 <= 0.123456789
