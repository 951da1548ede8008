"""Refused numbers and known failures on the command line: one clear line naming the input, a non-zero exit code, no
traceback, and the database exactly as it was."""

from __future__ import annotations

import hashlib
import math
import sqlite3

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from hopflow import queue
from hopflow.cli.main import app
from hopflow.db import get_engine, init_db, session_scope
from hopflow.errors import InvalidValueError
from hopflow.models import StageSetting, SyntheticItem
from hopflow.registry import get_stage
from hopflow.settings import INT64_MAX, Settings, get_settings
from hopflow.validation import check_parameters

runner = CliRunner()
HUGE = "99999999999999999999"


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    # rich's error panel wraps long lines: compare the words
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


def database_hash() -> str:
    """SHA-256 of every row and the schema of the settings' SQLite file."""
    conn = sqlite3.connect(get_settings().url.removeprefix("sqlite:///"))
    try:
        return hashlib.sha256("\n".join(conn.iterdump()).encode()).hexdigest()
    finally:
        conn.close()


@pytest.fixture
def populated() -> str:
    """A database with settings history (a cutoff and a target) and queued synthetic runs; returns its hash."""
    engine = init_db()
    with session_scope(engine, write=True) as session:
        session.add_all(SyntheticItem(cpu_ms=0.0, priority=i) for i in range(3))
    assert invoke("cutoff", "estimates", "max_overlap_change", "1.25")[0] == 0
    assert invoke("target", "pathways", "2")[0] == 0
    assert invoke("queue", "synthetic", "-n", "1")[0] == 0  # queues a run per item
    return database_hash()


REFUSED = [
    (("cutoff", "estimates", "max_overlap_change", "nan"), "must be a finite number, got nan"),
    (("cutoff", "estimates", "max_overlap_change", "inf"), "must be a finite number, got inf"),
    (("cutoff", "estimates", "max_overlap_change", "--", "-inf"), "must be a finite number, got -inf"),
    (("cutoff", "estimates", "max_overlap_change", "--", "-1"), "cutoff max_overlap_change must be >= 0"),
    (("run", "pathways", "--max-hop", "nan"), "'--max-hop': must be a finite number, got nan"),
    (("run", "pathways", "--max-hop", "0"), "'--max-hop': must be > 0"),
    (("run", "pathways", "--max-paths", "0"), "'--max-paths': must be >= 1, got 0"),
    (("run", "pathways", "--top", "-1"), "'--top': must be >= 0, got -1"),
    (("target", "pathways", HUGE), f"must be < 2**63, got {HUGE}"),
    (("target", "pathways", "--", "-1"), "must be >= 0, got -1"),
    (("queue", "pathways", "-n", "-1"), "'-n': must be >= 0, got -1"),
    (("queue", "pathways", "-n", HUGE), f"'-n': must be < 2**63, got {HUGE}"),
    (("queue", "pathways", "--ranker", "nope"), "'--ranker': stage 'pathways' has no ranker 'nope'"),
    (("rank", "pathways", "--ranker", "nope"), "'--ranker': stage 'pathways' has no ranker 'nope'"),
    (("trace", HUGE), f"'run_id': must be < 2**63, got {HUGE}"),
    (("trace", "0"), "'run_id': must be >= 1, got 0"),
    (("pathways", HUGE), f"must be < 2**63, got {HUGE}"),
    (("show-path", HUGE, "--cif", "x.cif"), f"must be < 2**63, got {HUGE}"),
    (("show-path", "1", "--cif", "x.cif", "--nimages", "0"), "'--nimages': must be >= 1, got 0"),
    (("status", "--watch", "--interval", "nan"), "'--interval': must be a finite number, got nan"),
    (("cleanup", "--older-than-days", "inf"), "must be a finite number, got inf"),
    (("retrain", "--seed", str(2**32)), f"'--seed': must be <= {2**32 - 1}"),
    (("export", "out.zip", "--structure", HUGE), f"'--structure': must be < 2**63, got {HUGE}"),
    (("submit", "pathways", "1", HUGE), f"must be < 2**63, got {HUGE}"),
    (("submit", "pathways", "1", "--batch-size", "0"), "'--batch-size': must be >= 1, got 0"),
    (("leaderboard", "--plot", "missing/folder/board.png"), "'--plot': folder missing/folder does not exist"),
    (("show-path", "1", "--cif", "missing/images.cif"), "'--cif': folder missing does not exist"),
]


def test_refused_inputs_change_nothing(populated, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    for args, message in REFUSED:
        code, out = invoke(*args)
        assert code == 2, (args, code, out)
        assert message in out, (args, out)
        assert "Traceback" not in out, (args, out)
        assert database_hash() == populated, args
    assert not (tmp_path / "missing").exists()  # --plot creates no folder


def test_known_failures_are_one_line(populated, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    code, out = invoke("checkpoint", "--dest", str(tmp_path / "a-file" / "sub"))
    assert code == 1 and f"cannot use {tmp_path / 'a-file'}" in out and "Traceback" not in out, out
    monkeypatch.delenv("MP_API_KEY", raising=False)
    monkeypatch.delenv("HOPFLOW_MP_API_KEY", raising=False)
    get_settings.cache_clear()
    code, out = invoke("import", "mp")
    assert code == 1 and "no Materials Project API key" in out and "Traceback" not in out, out
    assert database_hash() == populated

    monkeypatch.setenv("HOPFLOW_MAX_PATHS", "0")
    get_settings.cache_clear()
    get_engine.cache_clear()
    code, out = invoke("status")
    assert code == 2 and "invalid setting" in out and "max_paths" in out and "Traceback" not in out, out


def test_database_url_errors_hide_the_password(monkeypatch, tmp_path) -> None:
    for url, code, message in [
        ("postgresql+psycopg://hopflow:s3cretpw@127.0.0.1:1/db", 1, "database error: connection failed"),
        ("not-a-url:s3cretpw@", 2, "bad database URL (HOPFLOW_DATABASE_URL)"),
        ("nodialect://hopflow:s3cretpw@host/db", 2, "bad database URL (HOPFLOW_DATABASE_URL)"),
    ]:
        monkeypatch.setenv("HOPFLOW_DATABASE_URL", url)
        get_settings.cache_clear()
        get_engine.cache_clear()
        got, out = invoke("status")
        assert got == code and message in out, (url, out)
        assert "s3cretpw" not in out and "Traceback" not in out, (url, out)


def test_failed_checkpoint_leaves_no_folder(tmp_path, monkeypatch, postgres_url) -> None:
    """A checkpoint of a PostgreSQL database that does not exist fails after its dated folder was made: the folder
    goes again."""
    monkeypatch.setenv("HOPFLOW_DATABASE_URL", postgres_url.rsplit("/", 1)[0] + "/no_such_database")
    get_settings.cache_clear()
    dest = tmp_path / "checkpoints"
    dest.mkdir()
    code, out = invoke("checkpoint", "--dest", str(dest))
    assert code == 1 and "no_such_database" in out and "Traceback" not in out, out
    assert list(dest.iterdir()) == []


def test_run_with_failed_items_exits_non_zero(monkeypatch) -> None:
    monkeypatch.setenv("HOPFLOW_PROFILE_SYNTHETIC", "local-threads")
    get_settings.cache_clear()  # settings are read once per process
    engine = init_db()
    with session_scope(engine, write=True) as session:
        session.add_all([SyntheticItem(cpu_ms=0.0, failure="exception", fail_attempts=5),
                         SyntheticItem(cpu_ms=0.0)])
    code, out = invoke("run", "synthetic")
    assert code == 1, out
    assert "synthetic: 1 done" in out and "1 items failed" in out and "injected failure" in out, out


def test_storing_functions_refuse_what_no_caller_may_store(engine) -> None:
    """queue.set_cutoff / set_target themselves refuse (the controller's mirror and scripts call them too)."""
    estimates = get_stage("estimates")
    with session_scope(engine, write=True) as session:
        for bad in (math.nan, math.inf, -math.inf, -1.0, "1.0; drop"):
            with pytest.raises(InvalidValueError, match="cutoff max_overlap_change"):
                queue.set_cutoff(session, estimates, "max_overlap_change", bad)
        for bad in (-1, 2**63, 1.5, math.nan, True):
            with pytest.raises(InvalidValueError, match="target"):
                queue.set_target(session, get_stage("pathways"), bad)
        assert queue.set_cutoff(session, estimates, "max_overlap_change", 2.0)
        assert queue.set_target(session, get_stage("pathways"), INT64_MAX)
    with session_scope(engine) as session:
        assert session.query(StageSetting).count() == 2


def test_parameters_and_settings_refuse_non_finite_numbers() -> None:
    check_parameters({"ion": "F", "max_hop": 3.5, "engine_settings": {"fmax": 0.05, "steps": [1, 2]}})
    for bad in ({"max_hop": math.nan}, {"engine_settings": {"fmax": math.inf}}, {"ids": [1, 2**64]}):
        with pytest.raises(InvalidValueError, match="parameter"):
            check_parameters(bad)
    for field, value in [("max_hop", math.nan), ("max_hop", 0.0), ("lease_seconds", math.inf), ("max_paths", 0),
                         ("nimages", 0), ("retry_limit", 2**63)]:
        with pytest.raises(ValidationError, match=field):
            Settings(**{field: value})
