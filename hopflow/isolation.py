"""Per-item isolation: a stage's items run one at a time in a child process that is killed when an item passes its
time limit and started again when an item kills it, so a hang or a crash costs that item alone, never its chunk."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import multiprocessing.util
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from hopflow.errors import EngineError, TimeLimitError, WorkerLostError
from hopflow.settings import get_settings

PARENT_POLL_S = 1.0
"""How often a child checks that the process that started it is still there (it exits at once when not)."""

STOP_GRACE_S = 2.0
"""How long a child asked to stop (its pipe closed) may take before it is killed."""

FOLLOWED_VARIABLES = ("HOPFLOW_", "MP_API_KEY", "PMG_")
"""Prefixes of the variables an item process is replaced for when they change: hopflow's settings and pymatgen's
(libraries set others of their own on import, such as KMP_INIT_AT_FORK, which must not cost a fresh child)."""

WARM_LIMIT_S = 300.0
"""Longest a warm-up import may take before the item process is started afresh for its first item."""


class ItemProcess:
    """One child process that runs items sent to it, one at a time; killed with its whole process group (an engine's
    own subprocesses, VASP under custodian, too) when an item passes its time limit, and started again on the next
    item after it died. A process keeps idle ones for its threads (`borrowed_item_process`)."""

    def __init__(self) -> None:
        self._child: subprocess.Popen[bytes] | None = None
        self._send: Connection | None = None
        self._receive: Connection | None = None
        self._warming = False
        self._environment: dict[str, str] = {}
        self.started = 0
        """How many children this has started (the first one, and one after each kill or death)."""

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), **allocator_environment()}
        self._environment = _followed_environment()
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "hopflow.isolation", str(to_child_r), str(from_child_w), str(os.getpid())],
                pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._send = Connection(to_child_w, readable=False)
        self._receive = Connection(from_child_r, writable=False)
        self.started += 1

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], time_limit: float) -> Any:
        """`fn(*args)` in the child: its result, or the exception it raised; TimeLimitError when it runs past
        `time_limit` seconds (the child is killed), WorkerLostError when the child dies under it."""
        return unpack(self.run_packed(pack(fn, *args), time_limit))

    def _ready(self) -> None:
        """A live child started under this process's current settings environment: a child that died, or one
        started before a variable of FOLLOWED_VARIABLES changed (a test's, a command's), is replaced."""
        if self._child is None or self._child.poll() is not None or self._environment != _followed_environment():
            self._stop()
            self._start()

    def warm(self, modules: Sequence[str]) -> None:
        """Start the child and have it import `modules` without waiting for it (`warmed` or the next run waits):
        a command's item processes load their libraries while it starts up."""
        self._ready()
        assert self._send is not None
        self._send.send_bytes(pack(_import_all, list(modules)))
        self._warming = True

    def warmed(self) -> None:
        """Wait for a warm-up under way (up to WARM_LIMIT_S; one that hangs costs its child, and the next item gets a
        fresh one; a failed import shows again in the item)."""
        if not self._warming:
            return
        self._warming = False
        if self._receive is None or not self._receive.poll(WARM_LIMIT_S):
            self._stop(kill=True)
            return
        with contextlib.suppress(EOFError, OSError):
            self._receive.recv_bytes()

    def run_packed(self, request: bytes, time_limit: float) -> bytes:
        """Run a `pack`ed call in the child and return its packed answer (`unpack` gives the result or raises the
        item's error) without unpickling either here: the caller (a Dask worker) needs none of the item's modules.
        Raises TimeLimitError or WorkerLostError as `run` does."""
        self.warmed()
        self._ready()
        assert self._send is not None and self._receive is not None and self._child is not None
        began = time.monotonic()
        try:
            self._send.send_bytes(request)
            ready = self._receive.poll(time_limit)
        except OSError:  # the child is gone (a broken pipe): the receive below reports how
            ready = True
        if not ready:
            self._stop(kill=True)
            raise TimeLimitError(f"time limit: the item was still running after {time_limit:g} s and its process "
                                 f"was killed")
        try:
            return self._receive.recv_bytes()
        except (EOFError, OSError):
            code = self._child.wait()
            self._stop()
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            raise WorkerLostError(f"lost worker: the process running this item alone died ({how}) after "
                                  f"{time.monotonic() - began:.1f} s") from None

    def _stop(self, *, kill: bool = False) -> None:
        """End the child: closing its pipe asks it to exit; a kill (or a child that lingers) ends its process group."""
        for connection in (self._send, self._receive):
            if connection is not None:
                connection.close()
        self._send = self._receive = None
        child, self._child = self._child, None
        if child is None:
            return
        if not kill:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(STOP_GRACE_S)
        if child.poll() is None or kill:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()

    @property
    def pid(self) -> int | None:
        """The child's process id (None before the first item and after a kill)."""
        return self._child.pid if self._child is not None else None

    def close(self) -> None:
        """Stop the child (if any)."""
        self._stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._stop()


_idle: list[ItemProcess] = []
_idle_lock = threading.Lock()


@contextmanager
def borrowed_item_process() -> Iterator[ItemProcess]:
    """An idle item process of this process (a new one when none is idle), given back after the block: as many live
    as threads run items at once, and each outlives its chunk, so a stage's libraries are imported once per worker."""
    with _idle_lock:
        process = _idle.pop() if _idle else ItemProcess()
    try:
        yield process
    finally:
        with _idle_lock:
            _idle.append(process)


def close_idle_item_processes() -> None:
    """Stop this process's idle item processes and wait for them. Run at exit, also from a Dask worker process (a
    multiprocessing child, which skips atexit): a child reaped by its parent ends with it instead of up to
    PARENT_POLL_S later as an orphan, and its CPU time counts to the process tree that started it."""
    with _idle_lock:
        while _idle:
            _idle.pop().close()


atexit.register(close_idle_item_processes)
multiprocessing.util.Finalize(None, close_idle_item_processes, exitpriority=0)


def warm_item_processes(modules: Sequence[str], count: int) -> int:
    """Make `count` idle item processes of this process import `modules`, side by side, and wait until they have;
    returns how many are idle. For a Dask worker, `count` is its number of threads."""
    with _idle_lock:
        while len(_idle) < count:
            _idle.append(ItemProcess())
        warming = _idle[:count]
        for process in warming:
            process.warm(modules)
        for process in warming:
            process.warmed()
        return len(_idle)


def _followed_environment() -> dict[str, str]:
    """The variables of this process's environment that a child must share (FOLLOWED_VARIABLES)."""
    return {name: value for name, value in os.environ.items() if name.startswith(FOLLOWED_VARIABLES)}


def allocator_environment() -> dict[str, str]:
    """The GLIBC_TUNABLES an item process starts with (`Settings.item_glibc_tunables`), unless this process's
    environment names its own."""
    tunables = get_settings().item_glibc_tunables
    return {"GLIBC_TUNABLES": tunables} if tunables and "GLIBC_TUNABLES" not in os.environ else {}


def _import_all(modules: list[str]) -> None:
    for module in modules:
        importlib.import_module(module)


def pack(fn: Callable[..., Any], *args: Any) -> bytes:
    """A call `fn(*args)` as the bytes an item process runs (cloudpickle: a function defined in a test or a notebook
    travels by value)."""
    return cloudpickle.dumps((fn, args))


def unpack(answer: bytes) -> Any:
    """An item process's answer: the call's result, or its exception raised here."""
    status, payload = cloudpickle.loads(answer)
    if status == "error":
        raise payload
    return payload


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else an error of the same retry class that names it (an exception whose
    constructor takes other arguments than it passes to Exception cannot be rebuilt on the other side)."""
    try:
        cloudpickle.loads(cloudpickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        from hopflow.errors import is_retryable

        message = f"{type(exc).__name__}: {exc}"
        return EngineError(message) if is_retryable(exc) else ValueError(message)


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(0)


def serve(read_fd: int, write_fd: int, parent_pid: int) -> None:
    """The child's loop: receive `(fn, args)`, answer `("ok", result)` or `("error", exception)`, until the parent
    closes the pipe or dies."""
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    receive, send = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    while True:
        try:
            fn, args = cloudpickle.loads(receive.recv_bytes())
        except EOFError:
            return
        try:
            answer = cloudpickle.dumps(("ok", fn(*args)))
        except Exception as exc:  # noqa: BLE001  (every item error goes back to be recorded against the item)
            exc.__traceback__ = None
            answer = cloudpickle.dumps(("error", _portable(exc)))
        except BaseException:
            traceback.print_exc()
            raise
        send.send_bytes(answer)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the child ends
    serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
