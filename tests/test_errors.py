"""The error hierarchy (every hopflow error under HopflowError, defined in hopflow.errors) and the retry policy by
error type (hopflow.errors.is_retryable)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from hopflow import errors
from hopflow.errors import (
    ArchiveConflictError,
    ArchiveCorruptError,
    ArchiveSchemaError,
    EngineError,
    HopflowError,
    ImmutableResultError,
    InputError,
    InsufficientDataError,
    InvalidValueError,
    MaterialsProjectError,
    MissingAPIKeyError,
    ProfileError,
    SyntheticFailure,
    is_retryable,
)
from hopflow.tasks.synthetic import synthetic_work

ROOT = Path(__file__).resolve().parents[1]

RETRY_POLICY: list[tuple[BaseException, bool]] = [
    # bad input: never
    (InputError("no F sites"), False),
    (InvalidValueError("max_hop must be finite"), False),
    (InsufficientDataError("3 barriers are too few"), False),
    (ValueError("Invalid element"), False),
    (KeyError("x"), False),
    (IndexError("x"), False),
    (ZeroDivisionError(), False),
    (ArchiveCorruptError("truncated"), False),
    (ArchiveSchemaError("newer"), False),
    # set-up: never
    (ProfileError("no cluster profile 'nope'"), False),
    (MissingAPIKeyError("no Materials Project API key"), False),
    # programming errors: never
    (TypeError("bad call"), False),
    (AttributeError("x"), False),
    (NameError("x"), False),
    (AssertionError(), False),
    (ImportError("x"), False),
    (NotImplementedError(), False),
    (ImmutableResultError("Pathway 1 is a stored result"), False),
    # engine, service, OS, time-out, memory and lost-worker failures: yes
    (EngineError("VASP crashed"), True),
    (SyntheticFailure("injected"), True),
    (MaterialsProjectError("Materials Project query failed: 503"), True),
    (ArchiveConflictError("run 3 is claimed"), True),
    (OSError("disk full"), True),
    (FileNotFoundError("WAVECAR"), True),
    (TimeoutError("slow"), True),
    (MemoryError(), True),
    (KilledWorker("task", "worker", 3), True),
    (CommClosedError("in <TCP>: Stream is closed"), True),
    # whatever else a crash raises: yes
    (RuntimeError("?"), True),
]


@pytest.mark.parametrize(("exc", "retried"), RETRY_POLICY, ids=[type(e).__name__ for e, _ in RETRY_POLICY])
def test_retry_policy_by_type(exc: BaseException, retried: bool) -> None:
    assert is_retryable(exc) is retried


def test_hopflows_verdict_wins_over_another_base() -> None:
    class BadFileOnDisk(InputError, OSError):  # an OSError is retried, bad input never
        pass

    class LeakedImmutable(ImmutableResultError, EngineError):
        pass

    assert not is_retryable(BadFileOnDisk("x")) and not is_retryable(LeakedImmutable("x"))


def test_the_synthetic_stage_injects_an_engine_failure() -> None:
    with pytest.raises(EngineError) as info:
        synthetic_work({"item_id": 1, "failure": "exception", "fail_attempts": 1}, attempt=1)
    assert type(info.value).__name__ == "SyntheticFailure" and is_retryable(info.value)
    with pytest.raises(ValueError, match="unknown synthetic failure"):  # a bad item: never retried
        synthetic_work({"item_id": 1, "failure": "nope"})


def test_every_hopflow_error_is_a_hopflow_error_defined_in_hopflow_errors() -> None:
    defined = [obj for obj in vars(errors).values() if inspect.isclass(obj) and issubclass(obj, BaseException)]
    assert all(issubclass(cls, HopflowError) and cls.__module__ == "hopflow.errors" for cls in defined)
    elsewhere = []
    for directory in ("hopflow", "flows", "tasks", "deployments"):
        for path in (ROOT / directory).rglob("*.py"):
            if path.name != "errors.py" and re.search(r"^class \w+\((?:\w+, )*\w*(Error|Exception|Failure)\b",
                                                         path.read_text(), re.MULTILINE):
                elsewhere.append(str(path.relative_to(ROOT)))
    assert elsewhere == []
