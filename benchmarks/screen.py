"""Wall time of the README's main job, `hopflow screen`, from a fresh home.

Run from the repository root: `python -m benchmarks.screen [--keep]`. Runs the console script `hopflow screen` next
to this interpreter with HOPFLOW_HOME a fresh temporary directory (so the database, work directories and plots start
empty) and Prefect analytics off; its own output passes through. Then prints the total wall time, each stage's span
from the runs table (first started_at to last finished_at, runs per state), the pathways estimated and their flags,
against the goal of 15 minutes on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

GOAL_S = 15 * 60
"""The main job's goal on the 2-core development machine (README)."""


def _when(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def stage_spans(db: Path) -> list[tuple[str, float | None, dict[str, int]]]:
    """Per stage, in the order it started: seconds from its first start to its last finish, and runs per state."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT stage, state, COUNT(*), MIN(started_at), MAX(finished_at) FROM runs "
                           "GROUP BY stage, state").fetchall()
    spans: dict[str, tuple[datetime | None, datetime | None, dict[str, int]]] = {}
    for stage, state, count, started, finished in rows:
        first, last, states = spans.get(stage, (None, None, {}))
        started_at, finished_at = _when(started), _when(finished)
        first = min(filter(None, (first, started_at)), default=None)
        last = max(filter(None, (last, finished_at)), default=None)
        spans[stage] = (first, last, states | {state: count})
    ordered = sorted(spans.items(), key=lambda kv: kv[1][0] or datetime.max)
    return [(stage, (last - first).total_seconds() if first and last else None, states)
            for stage, (first, last, states) in ordered]


def estimate_flags(db: Path) -> dict[str, int]:
    """Estimates stored, per flag."""
    with sqlite3.connect(db) as con:
        return dict(con.execute("SELECT flag, COUNT(*) FROM estimates GROUP BY flag ORDER BY flag").fetchall())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="Keep the temporary home (default: removed at the end).")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="hopflow-bench-screen-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOPFLOW_")}  # the defaults, as a new user has
    env |= {"HOPFLOW_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = [str(Path(sys.executable).parent / "hopflow"), "screen"]

    clock = time.perf_counter()
    code = subprocess.run(command, env=env, check=False).returncode
    wall = time.perf_counter() - clock

    db = home / "hopflow.sqlite"
    print(f"\n`hopflow screen` from a fresh home ({home}): exit {code}, wall {wall:.0f} s ({wall / 60:.1f} min) on "
          f"{os.cpu_count()} CPU cores, load average now {os.getloadavg()[0]:.1f}")
    if db.is_file():
        for stage, seconds, states in stage_spans(db):
            span = f"{seconds:7.1f} s" if seconds is not None else "      — "
            print(f"  {stage:10} {span}  runs: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
        flags = estimate_flags(db)
        print(f"  pathways estimated: {sum(flags.values())} (" + ", ".join(f"{f} {n}" for f, n in flags.items()) + ")")
    else:
        print(f"  no database at {db}")
    verdict = "met" if code == 0 and wall <= GOAL_S else "NOT met"
    print(f"goal: ≤ {GOAL_S // 60} min on the 2-core development machine: {verdict}")
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
