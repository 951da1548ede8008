"""TEST MACHINERY, not science: the synthetic stage's unit of work burns CPU or sleeps, and fails on request."""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

from prefect import task

from hopflow.errors import SyntheticFailure
from hopflow.stages.synthetic import SyntheticParams

FAILURES = ("none", "exception", "hang", "exit")
HANG_SECONDS = 3600.0


@dataclass(frozen=True)
class SyntheticOutcome:
    """The synthetic stage's result."""

    value: float
    elapsed_s: float


def burn_cpu(ms: float) -> float:
    """Spin the CPU for `ms` milliseconds of process time; returns a value derived from the work."""
    end = time.process_time() + ms / 1000.0
    acc = 0.0
    i = 0
    while time.process_time() < end:
        for _ in range(1000):
            i += 1
            acc += (i % 7) * 1e-9
    return acc


def synthetic_work(item: dict[str, Any], attempt: int = 1) -> SyntheticOutcome:
    """Do one synthetic item: misbehave as the item says (while `attempt` <= its fail_attempts), else burn/sleep."""
    start = time.perf_counter()
    failure = item.get("failure", "none")
    if failure not in FAILURES:
        raise ValueError(f"unknown synthetic failure {failure!r} (known: {', '.join(FAILURES)})")
    if failure != "none" and attempt <= int(item.get("fail_attempts", 0)):
        if failure == "exception":
            raise SyntheticFailure(f"injected failure for synthetic item {item['item_id']} (attempt {attempt})")
        if failure == "hang":
            time.sleep(HANG_SECONDS)
        if failure == "exit":
            os.kill(os.getpid(), signal.SIGKILL)
    value = burn_cpu(float(item.get("cpu_ms", 0.0)))
    if item.get("sleep_ms"):
        time.sleep(random.uniform(0.0, float(item["sleep_ms"])) / 1000.0)
    return SyntheticOutcome(value=value, elapsed_s=time.perf_counter() - start)


@task(name="synthetic-item")
def synthetic_item(item: dict[str, Any], params: SyntheticParams) -> SyntheticOutcome:
    """Prefect task over `synthetic_work`; the attempt number comes with the item."""
    return synthetic_work(item, attempt=int(item.get("attempt", 1)))
