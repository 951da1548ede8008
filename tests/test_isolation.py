"""Per-item isolation and lease renewal: an item runs in a child process that is killed at the stage's time limit
(with its own subprocesses) and restarted after an item kills it; a flow run renews its runs' leases while they make
progress; the controller holds claims whose flow run has not started yet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update

from hopflow import queue
from hopflow.db import session_scope, utcnow
from hopflow.errors import InputError, TimeLimitError, WorkerLostError, is_retryable
from hopflow.isolation import ItemProcess
from hopflow.models import Run, RunState, SyntheticItem
from hopflow.settings import get_settings

from prefect_helpers import prefect_api_url, wait_for

SYN = "synthetic"


def double(x: int) -> int:
    return 2 * x


def refuse(x: int) -> int:
    raise InputError(f"item {x} is bad")


def hang_with_a_subprocess(pid_file: str) -> None:
    child = subprocess.Popen(["sleep", "600"])
    Path(pid_file).write_text(str(child.pid))
    time.sleep(600)


def die(_x: int) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead too
        return stat.read().split(") ", 1)[1][0] != "Z"


@pytest.fixture
def item_process() -> Iterator[ItemProcess]:
    process = ItemProcess()
    yield process
    process.close()


def test_an_item_process_returns_results_and_the_items_own_errors(item_process) -> None:
    assert item_process.run(double, (21,), time_limit=60) == 42
    with pytest.raises(InputError, match="item 3 is bad") as refused:
        item_process.run(refuse, (3,), time_limit=60)
    assert not is_retryable(refused.value)  # the type survives the trip: the retry policy still applies
    assert item_process.run(double, (4,), time_limit=60) == 8
    assert item_process.started == 1  # one child served all three


def environment_variable(name: str) -> str | None:
    return os.environ.get(name)


def test_an_item_process_warms_up_and_follows_the_environment(item_process, monkeypatch) -> None:
    """A warm-up import runs while the caller goes on; a child started before the environment changed (settings are
    read from it) is replaced before the next item."""
    item_process.warm(["json", "hopflow.errors"])
    monkeypatch.setenv("HOPFLOW_TEST_ISOLATION_MARK", "first")
    assert item_process.run(environment_variable, ("HOPFLOW_TEST_ISOLATION_MARK",), time_limit=60) == "first"
    assert item_process.started == 2  # the warm child predates the variable
    monkeypatch.setenv("HOPFLOW_TEST_ISOLATION_MARK", "second")
    assert item_process.run(environment_variable, ("HOPFLOW_TEST_ISOLATION_MARK",), time_limit=60) == "second"
    assert item_process.run(double, (1,), time_limit=60) == 2 and item_process.started == 3


def page_faults_of_a_second_allocation(megabytes: int) -> int:
    """Minor page faults of a zeroed buffer allocated after one of the same size was freed (a bytearray: plain malloc;
    numpy asks for huge pages, torch on a CPU does not)."""
    import resource

    first = bytearray(megabytes * 2**20)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = bytearray(megabytes * 2**20)
    del second
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_an_item_process_keeps_the_memory_it_freed(item_process, monkeypatch) -> None:
    """With the default HOPFLOW_ITEM_GLIBC_TUNABLES a freed 200 MB block is reused without faulting its pages in again
    (glibc's own default maps it afresh: one fault per 4 KiB page)."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert get_settings().item_glibc_tunables  # the default
    kept = item_process.run(page_faults_of_a_second_allocation, (200,), time_limit=60)
    monkeypatch.setenv("HOPFLOW_ITEM_GLIBC_TUNABLES", "")
    get_settings.cache_clear()
    refaulted = item_process.run(page_faults_of_a_second_allocation, (200,), time_limit=60)
    get_settings.cache_clear()
    assert item_process.started == 2  # the setting changed: a fresh child
    assert kept < 1_000 < 25_000 < refaulted  # 200 MiB is 51,200 pages


def test_a_hang_is_killed_at_the_time_limit_with_its_subprocesses(item_process, tmp_path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    began = time.monotonic()
    with pytest.raises(TimeLimitError, match="still running after 2 s"):
        item_process.run(hang_with_a_subprocess, (str(pid_file),), time_limit=2)
    assert 2 <= time.monotonic() - began < 10
    grandchild = int(pid_file.read_text())
    wait_for(lambda: not alive(grandchild), 10, what="the hung item's own subprocess to be killed too")
    assert item_process.run(double, (5,), time_limit=60) == 10 and item_process.started == 2


def test_an_item_that_kills_its_process_fails_alone_and_the_next_item_gets_a_new_one(item_process) -> None:
    with pytest.raises(WorkerLostError, match="died \\(signal 9\\)") as lost:
        item_process.run(die, (1,), time_limit=60)
    assert is_retryable(lost.value)
    assert item_process.run(double, (6,), time_limit=60) == 12 and item_process.started == 2


def test_an_item_process_exits_when_its_parent_dies(tmp_path) -> None:
    """A flow-run process SIGKILLed mid-item leaves no orphan running the item."""
    script = tmp_path / "parent.py"
    pid_file = tmp_path / "child.pid"
    script.write_text(textwrap.dedent(f"""
        import time
        from hopflow.isolation import ItemProcess
        process = ItemProcess()
        process.run(time.sleep, (0,), time_limit=60)
        open({str(pid_file)!r}, "w").write(str(process.pid))
        process.run(time.sleep, (600,), time_limit=600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60, what="the item process to start")
        child = int(pid_file.read_text())
        assert alive(child)
    finally:
        parent.kill()
        parent.wait()
    wait_for(lambda: not alive(child), 10, what="the orphaned item process to exit")


def _add(engine, kinds: list[str], *, sleep_ms: float = 0.0) -> None:
    with session_scope(engine, write=True) as s:
        s.execute(insert(SyntheticItem), [{"cpu_ms": 0.0, "sleep_ms": sleep_ms, "failure": kind, "fail_attempts": 99,
                                           "priority": float(i)} for i, kind in enumerate(kinds)])


@pytest.fixture
def stage_env(monkeypatch: pytest.MonkeyPatch):
    """Set HOPFLOW_* variables for the synthetic stage flow run in this process (threads: items run here)."""
    prefect_api_url()
    monkeypatch.setenv("HOPFLOW_PROFILE_SYNTHETIC", "local-threads")
    monkeypatch.setenv("HOPFLOW_MAX_CHUNKS", "1")  # one chunk: every item shares one worker thread

    def apply(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield apply
    get_settings.cache_clear()


def _run_synthetic() -> None:
    from hopflow.flows.common import stage_task_runner
    from hopflow.flows.synthetic import synthetic

    synthetic.with_options(task_runner=stage_task_runner(SYN))(run_ids=None)


def test_in_a_stage_a_hang_and_a_crash_cost_their_own_item_only(engine, stage_env) -> None:
    """Six items in one chunk on one worker thread of the flow-run process: a hang and an exit among them. Without
    isolation the exit would kill the whole flow run and the hang would hold it until its lease ran out."""
    stage_env(HOPFLOW_TIME_LIMITS='{"synthetic": 3}')
    _add(engine, ["none", "hang", "none", "exit", "none", "none"])
    began = time.monotonic()
    _run_synthetic()
    assert time.monotonic() - began < 90
    with session_scope(engine) as s:
        runs = {r.input_id: r for r in s.scalars(select(Run))}
    hang, crash = runs.pop(2), runs.pop(4)
    assert {(r.state, r.attempts, len(r.history or [])) for r in runs.values()} == {(RunState.DONE, 1, 0)}
    assert hang.state == RunState.FAILED and hang.attempts == 1 and "TimeLimitError" in (hang.error or "")
    assert crash.state == RunState.FAILED and crash.attempts == 1 and "WorkerLostError" in (crash.error or "")
    assert [h["kind"] for h in hang.history + crash.history] == [queue.ERROR_RETRYABLE] * 2


def test_a_result_that_cannot_be_stored_fails_its_item_alone(engine, stage_env, monkeypatch) -> None:
    """A chunk's outcomes are recorded in one transaction, each in a savepoint: the item whose result rows cannot be
    stored fails with its reason and leaves no row; its five companions are done."""
    import dataclasses

    from hopflow.models import SyntheticResult
    from hopflow.registry import STAGES, get_stage

    stage = get_stage(SYN)

    def picky_store(session, run, result) -> None:
        stage.store(session, run, result)  # the rows are written, then the store refuses
        if run.input_id == 3:
            raise ValueError("result of item 3 cannot be stored")

    monkeypatch.setitem(STAGES, SYN, dataclasses.replace(stage, store=picky_store))
    stage_env(HOPFLOW_TIME_LIMITS='{"synthetic": 0}')
    _add(engine, ["none"] * 6)
    _run_synthetic()
    with session_scope(engine) as s:
        runs = {r.input_id: r for r in s.scalars(select(Run))}
        stored = sorted(s.scalars(select(Run.input_id).join(SyntheticResult, SyntheticResult.run_id == Run.id)))
    refused = runs.pop(3)
    assert refused.state == RunState.FAILED and refused.error == "ValueError: result of item 3 cannot be stored"
    assert {r.state for r in runs.values()} == {RunState.DONE}
    assert stored == [1, 2, 4, 5, 6]


def test_a_chunk_whose_transaction_fails_as_a_whole_is_recorded_item_by_item(engine, stage_env, monkeypatch) -> None:
    """The chunk's one transaction loses its connection: each item is recorded again in a transaction of its own,
    every one done with its one result row."""
    from sqlalchemy.exc import OperationalError

    from hopflow import queue
    from hopflow.models import SyntheticResult

    real_live_runs = queue.live_runs
    asked: list[int] = []

    def flaky_live_runs(session, run_ids):
        asked.append(len(run_ids))
        if len(asked) == 1:
            raise OperationalError("SELECT ... FOR UPDATE", {}, ConnectionError("server closed the connection"))
        return real_live_runs(session, run_ids)

    monkeypatch.setattr(queue, "live_runs", flaky_live_runs)
    stage_env(HOPFLOW_TIME_LIMITS='{"synthetic": 0}')
    _add(engine, ["none"] * 6)
    _run_synthetic()
    with session_scope(engine) as s:
        states = {r.input_id: r.state for r in s.scalars(select(Run))}
        stored = sorted(s.scalars(select(Run.input_id).join(SyntheticResult, SyntheticResult.run_id == Run.id)))
    assert asked == [6] + [1] * 6, asked
    assert set(states.values()) == {RunState.DONE} and stored == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("time_limit", ["30", "0"], ids=["renewed", "no-limit-no-renewal"])
def test_a_running_batch_renews_its_leases_while_it_makes_progress(engine, stage_env, time_limit) -> None:
    """Leases of 3 s, a batch of 4 items of ~2 s each in one chunk (~8 s), a sweeper every 0.5 s (a controller's):
    with a per-item time limit the flow run renews its leases and completes every run on its one attempt; without one
    (0: no limit, items run in the Dask worker) nothing renews them and sweep requeues them as expired."""
    stage_env(HOPFLOW_TIME_LIMITS=f'{{"synthetic": {time_limit}}}', HOPFLOW_LEASES='{"synthetic": 3}')
    _add(engine, ["none"] * 4)
    with session_scope(engine, write=True) as s:  # a fixed ~2 s per item (sleep_ms is a random upper bound)
        s.execute(update(SyntheticItem).values(cpu_ms=1900.0))
    stop = threading.Event()
    swept: list[int] = []

    def sweeper() -> None:
        while not stop.wait(0.5):
            with session_scope(engine, write=True) as s:
                swept.extend(queue.sweep(s, stage=SYN).requeued)

    thread = threading.Thread(target=sweeper, daemon=True)
    thread.start()
    try:
        _run_synthetic()
    finally:
        stop.set()
        thread.join()
    with session_scope(engine) as s:
        runs = s.scalars(select(Run)).all()
    if time_limit != "0":
        assert not swept
        assert {(r.state, r.attempts, len(r.history or [])) for r in runs} == {(RunState.DONE, 1, 0)}
    else:
        assert swept and any("lease expired" in (h["error"]) for r in runs for h in r.history or [])


def test_the_controller_holds_claims_whose_flow_run_has_not_started(engine, monkeypatch) -> None:
    """Claims handed to a flow run that Prefect has scheduled but not started keep their lease (within
    claim_start_seconds of the claim); older ones, and claims of flow runs not waiting, are left to their lease."""
    _add(engine, ["none"] * 3)
    claimed = [c.id for c in queue.claim(SYN, 3, engine=engine, refresh=True, lease_seconds=5)]
    with session_scope(engine, write=True) as s:
        queue.attach_flow_run(s, claimed[:2], "waiting")
        queue.attach_flow_run(s, claimed[2:], "other")
        old = utcnow() - timedelta(seconds=get_settings().claim_start_seconds + 1)
        s.execute(update(Run).where(Run.id == claimed[1]).values(claimed_at=old))
    before = utcnow().replace(tzinfo=None)
    with session_scope(engine, write=True) as s:
        assert queue.hold_claims(s, ["waiting"]) == 1
    with session_scope(engine) as s:  # UTC; SQLite gives it back naive
        leases = {r.id: r.lease_expires_at.replace(tzinfo=None) for r in s.scalars(select(Run))}
    lease = timedelta(seconds=queue.get_stage(SYN).lease)
    assert leases[claimed[0]] >= before + lease - timedelta(seconds=1)
    assert leases[claimed[1]] < before + timedelta(seconds=6) and leases[claimed[2]] < before + timedelta(seconds=6)
