"""The real services the test command starts (scripts/services.sh): PostgreSQL, single-node SLURM, Prefect server."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import httpx
import prefect
import pytest
from sqlalchemy import create_engine, text

SERVICES_HINT = "run the tests with `bash scripts/test.sh` (it starts PostgreSQL, SLURM and Prefect and exports it)"
SLURM_TIMEOUT_S = 120


def required_env(name: str) -> str:
    """The variable's value, or a test failure (never a skip) saying how to get it."""
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: {SERVICES_HINT}", pytrace=False)
    return value


@pytest.fixture(scope="module")
def postgres_url() -> str:
    return required_env("HOPFLOW_TEST_POSTGRES_URL")


@pytest.fixture(scope="module")
def slurm_conf() -> str:
    return required_env("SLURM_CONF")


@pytest.fixture(scope="module")
def prefect_api_url() -> str:
    return required_env("PREFECT_API_URL")


@pytest.mark.postgres
def test_postgres_answers_queries_over_tcp_with_a_password(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+psycopg://")
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            database, version = conn.execute(text("select current_database(), version()")).one()
            conn.execute(text("create temporary table probe (id serial primary key, label text not null)"))
            conn.execute(text("insert into probe (label) values ('a'), ('b'), ('c')"))
            labels = conn.execute(text("select string_agg(label, ',' order by id) from probe")).scalar_one()
            address = conn.execute(text("select host(inet_server_addr())")).scalar_one()
    finally:
        engine.dispose()
    assert database == "hopflow_test"
    assert version.startswith("PostgreSQL ")
    assert labels == "a,b,c"
    assert address == "127.0.0.1"  # a TCP connection on loopback, not the unix socket


@pytest.mark.slurm
def test_slurm_node_is_up_and_runs_a_batch_job(slurm_conf: str, tmp_path: Path) -> None:
    assert Path(slurm_conf).is_file()
    nodes = subprocess.run(["sinfo", "-h", "-o", "%n %t"], capture_output=True, text=True, check=True, timeout=30)
    assert re.search(r"\S+ (idle|mix|alloc)", nodes.stdout), nodes.stdout
    out = tmp_path / "job.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--wait", "-J", "hopflow-test", "-o", str(out),
         "--wrap", 'echo "job=$SLURM_JOB_ID host=$(hostname)"'],
        capture_output=True, text=True, timeout=SLURM_TIMEOUT_S,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    assert job_id.isdigit()
    assert out.read_text().strip() == f"job={job_id} host={socket.gethostname()}"
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    assert "JobState=COMPLETED" in shown.stdout
    assert "JobName=hopflow-test" in shown.stdout


@pytest.mark.prefect
def test_prefect_server_is_healthy_and_matches_the_client_version(prefect_api_url: str) -> None:
    health = httpx.get(f"{prefect_api_url}/health", timeout=10)
    assert health.status_code == 200
    assert health.json() is True
    version = httpx.get(f"{prefect_api_url}/admin/version", timeout=10)
    assert version.json() == prefect.__version__
