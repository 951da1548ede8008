"""Batch mode without a Prefect API: one temporary server, which the processes a flow starts (Dask workers) share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = ("from prefect.client.orchestration import get_client\n"
         "with get_client(sync_client=True) as client:\n"
         "    assert client.api_healthcheck() is None\n"
         "    print(client.api_url)\n")
PARENT = f"""
import os, subprocess, sys
from hopflow.flows.common import share_temporary_server
url = share_temporary_server()
assert url and os.environ["PREFECT_API_URL"] == url, url
assert share_temporary_server() is None  # an API is configured now
child = subprocess.run([sys.executable, "-c", {CHILD!r}], capture_output=True, text=True, check=True)
sys.stderr.write(child.stderr)
print(url, child.stdout.strip())
"""


def test_batch_mode_starts_one_temporary_server_for_all_its_processes(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", PARENT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    url, child_url = done.stdout.split()[-2:]
    assert child_url.rstrip("/") == url.rstrip("/")  # a child on a temporary server of its own would name another port
