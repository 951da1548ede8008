"""Progress on a terminal: batch mode under a real pseudo-terminal draws one bar per stage from the queue's state,
the bar advances to the item count, Prefect's logs go to the file under HOPFLOW_HOME, and `hopflow status --watch`
shows the same bars for the campaign's runs."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hopflow.db import init_db
from hopflow.settings import get_settings

from prefect_helpers import PROJECT_ROOT, add_synthetic_items, prefect_api_url

pytestmark = pytest.mark.prefect

ITEMS = 40
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR = re.compile(r"synthetic\s+\S+\s+(\d+)/(\d+)\s+(\d+) done, (\d+) failed, (\d+) cached")
HOPFLOW = [str(Path(sys.executable).with_name("hopflow"))]


def run_on_terminal(args: list[str], env: dict[str, str], timeout: float = 180.0) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as its stdout and stderr; returns (exit code, everything it wrote)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError(f"{args} did not finish in {timeout:.0f} s")
    finally:
        os.close(master)
    return proc.wait(30), b"".join(chunks).decode("utf-8", "replace")


def test_batch_mode_draws_a_bar_that_reaches_the_item_count(engine, tmp_path) -> None:
    add_synthetic_items(engine, ITEMS, cpu_ms=1.0, sleep_ms=120.0)
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url(), "HOPFLOW_DASK_PROFILE": "local-threads",
           "HOPFLOW_MAX_CHUNKS": str(ITEMS), "TERM": "xterm-256color", "COLUMNS": "140",
           "PYTHONPATH": str(PROJECT_ROOT)}
    code, out = run_on_terminal([*HOPFLOW, "run", "synthetic"], env)
    text = ANSI.sub("", out)
    assert code == 0, text[-3000:]
    bars = [tuple(map(int, m.groups())) for m in BAR.finditer(text)]
    assert bars, text[-3000:]
    finished = [b[0] for b in bars]
    assert all(total == ITEMS for _, total, *_ in bars)
    assert finished == sorted(finished), "the bar went backwards"
    assert finished[-1] == ITEMS and bars[-1][2:] == (ITEMS, 0, 0)
    assert len(set(finished)) >= 3, f"the bar jumped instead of advancing: {sorted(set(finished))}"
    assert "synthetic: 40 done (0 from cache), 0 failed" in text

    log = Path(re.search(r"Prefect logs: (\S+\.log)", text).group(1))
    assert log.parent == get_settings().home / "logs"
    logged = log.read_text()
    assert "Beginning flow run" in logged and "Finished in state Completed" in logged
    assert "Beginning flow run" not in text and "| INFO" not in text  # on the terminal only with --verbose

    code, out = run_on_terminal([*HOPFLOW, "status", "--watch", "--until-idle", "--interval", "0.2"], env, 60)
    watched = [tuple(map(int, m.groups())) for m in BAR.finditer(ANSI.sub("", out))]
    assert code == 0 and watched and watched[-1] == (ITEMS, ITEMS, ITEMS, 0, 0), ANSI.sub("", out)[-2000:]


@pytest.fixture
def engine(tmp_path, monkeypatch):
    """The SQLite file under this test's HOPFLOW_HOME, migrated (the commands run in child processes read it)."""
    get_settings.cache_clear()
    from hopflow.db import get_engine

    get_engine.cache_clear()
    eng = init_db()
    yield eng
    eng.dispose()
    get_engine.cache_clear()
