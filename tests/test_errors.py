"""The retry policy by error type (hopflow.errors.is_retryable)."""

from __future__ import annotations

import pytest
from distributed.scheduler import KilledWorker

from hopflow.errors import EngineError, InputError, is_retryable
from hopflow.tasks.synthetic import SyntheticFailure


@pytest.mark.parametrize("exc", [EngineError("VASP crashed"), OSError("disk full"), TimeoutError("slow"),
                                 SyntheticFailure("injected"), KilledWorker("task", "worker", 3), RuntimeError("?")])
def test_engine_os_and_lost_worker_errors_are_retried(exc: BaseException) -> None:
    assert is_retryable(exc)


@pytest.mark.parametrize("exc", [InputError("no F sites"), ValueError("Invalid element"), KeyError("x"),
                                 TypeError("bad call"), AttributeError("x"), ZeroDivisionError()])
def test_bad_input_and_programming_errors_are_not(exc: BaseException) -> None:
    assert not is_retryable(exc)
