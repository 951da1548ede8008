"""Stored results stay immutable even under raw SQL on PostgreSQL: a trigger on every result table (derived from the
models) refuses UPDATE and DELETE unless a migration sets hopflow.allow_result_rewrite for its transaction."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from hopflow.db import allow_result_rewrite, init_db, install_result_guards, make_engine, result_tables, session_scope
from hopflow.models import Run, SyntheticItem, SyntheticResult

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pg_engine(postgres_database):
    url = postgres_database()
    engine = init_db(make_engine(url))
    yield engine
    engine.dispose()


def _one_result(engine) -> int:
    with session_scope(engine, write=True) as session:
        item = SyntheticItem(cpu_ms=0.0)
        session.add(item)
        session.flush()
        run = Run(stage="synthetic", input_id=item.id, param_hash="p", parameters={}, state="done")
        session.add(run)
        session.flush()
        result = SyntheticResult(run_id=run.id, item_id=item.id, value=1.5, elapsed_s=0.1)
        session.add(result)
        session.flush()
        return result.id


def _row(engine, result_id: int) -> tuple:
    with engine.connect() as conn:
        return tuple(conn.execute(text("SELECT * FROM synthetic_results WHERE id = :id"), {"id": result_id}).one())


def test_result_tables_come_from_the_models() -> None:
    assert {"structures", "pathways", "features", "vacancies", "estimates", "neb", "barrier_models", "calibrations",
            "synthetic_results"} <= set(result_tables())
    assert not {"runs", "sources", "stage_settings", "scores", "archives"} & set(result_tables())  # queue and settings


def test_raw_update_and_delete_of_results_fail(pg_engine) -> None:
    result_id = _one_result(pg_engine)
    before = _row(pg_engine, result_id)
    for statement in ("UPDATE synthetic_results SET value = 99 WHERE id = :id",
                      "DELETE FROM synthetic_results WHERE id = :id"):
        with pytest.raises(IntegrityError, match="stored results are immutable"), pg_engine.begin() as conn:
            conn.execute(text(statement), {"id": result_id})
        assert _row(pg_engine, result_id) == before
    with pg_engine.begin() as conn:  # every result table has the trigger
        guarded = set(conn.scalars(text("SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                                        "WHERE t.tgname = 'hopflow_immutable_result'")))
    assert guarded == set(result_tables())
    # the queue is not a result table: runs still change
    with pg_engine.begin() as conn:
        conn.execute(text("UPDATE runs SET error = 'x'"))
    # idempotent: init again, guards again
    assert sorted(install_result_guards(init_db(pg_engine))) == result_tables()


def test_a_migration_may_rewrite_results_when_it_says_so(pg_engine) -> None:
    result_id = _one_result(pg_engine)
    with pg_engine.begin() as conn:
        allow_result_rewrite(conn)
        conn.execute(text("UPDATE synthetic_results SET value = 2.5 WHERE id = :id"), {"id": result_id})
    with pg_engine.connect() as conn:
        assert conn.scalar(text("SELECT value FROM synthetic_results WHERE id = :id"), {"id": result_id}) == 2.5
    with pytest.raises(IntegrityError), pg_engine.begin() as conn:  # SET LOCAL ended with that transaction
        conn.execute(text("UPDATE synthetic_results SET value = 3.5 WHERE id = :id"), {"id": result_id})


def test_a_result_table_added_later_is_covered(pg_engine) -> None:
    """A new Immutable model (defined in a fresh process, so this session's metadata stays as it is) gets the trigger
    from the same init path."""
    code = f"""
from sqlalchemy import Float, text
from sqlalchemy.orm import Mapped, mapped_column
from hopflow.db import Base, Immutable, init_db, make_engine

class LaterResult(Immutable, Base):
    __tablename__ = "later_results"
    value: Mapped[float] = mapped_column(Float)

engine = make_engine({pg_engine.url.render_as_string(hide_password=False)!r})
Base.metadata.create_all(engine, tables=[LaterResult.__table__])
init_db(engine)
with engine.begin() as conn:
    conn.execute(text("INSERT INTO later_results (value) VALUES (1.0)"))
for statement in ("UPDATE later_results SET value = 2", "DELETE FROM later_results"):
    try:
        with engine.begin() as conn:
            conn.execute(text(statement))
    except Exception as exc:
        assert "immutable" in str(exc), exc
    else:
        raise SystemExit(statement + " was not refused")
with engine.connect() as conn:
    assert conn.scalar(text("SELECT value FROM later_results")) == 1.0
print("covered")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "covered" in done.stdout, done.stderr[-3000:]
