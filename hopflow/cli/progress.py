"""Long work on a terminal: one progress bar per stage, driven by the queue's state in the database (not by log
lines), and Prefect's own logs sent to a file under HOPFLOW_HOME (`--verbose` shows them on the terminal too)."""

from __future__ import annotations

import logging
import logging.config
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from hopflow import queue
from hopflow.db import get_engine, is_in_memory, session_scope, utcnow
from hopflow.settings import get_settings

LOG_DIR = "logs"
POLL_SECONDS = 0.5
STREAM_HANDLERS = ("console", "debug")
"""Handlers of Prefect's logging.yml that write to the terminal."""


# ---------------------------------------------------------------- Prefect's logs to a file


def log_file(command: str) -> Path:
    """A new log file for one command under HOPFLOW_HOME/logs."""
    directory = get_settings().home / LOG_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{command}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"


def file_logging_config(path: Path, verbose: bool) -> dict[str, Any]:
    """Prefect's own logging configuration with every terminal handler replaced by (verbose: joined by) a file
    handler writing to `path`."""
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH, load_logging_config

    config = load_logging_config(DEFAULT_LOGGING_SETTINGS_PATH)
    config["handlers"]["file"] = {"class": "logging.FileHandler", "filename": str(path), "encoding": "utf-8",
                                  "formatter": "standard", "level": 0}
    for section in (*config.get("loggers", {}).values(), config.get("root", {})):
        handlers = section.get("handlers")
        if not handlers:
            continue
        kept = [h for h in handlers if verbose or h not in STREAM_HANDLERS]
        if any(h in STREAM_HANDLERS for h in handlers):
            kept.append("file")
        section["handlers"] = kept
    config["incremental"] = False
    return config


@contextmanager
def prefect_logs_to_file(command: str, verbose: bool = False) -> Iterator[Path]:
    """Inside the block, send Prefect's logs (flow and task runs, the temporary server, Dask, library warnings) of
    this process and of every process it starts to a new file under HOPFLOW_HOME/logs, and run temporary servers
    with analytics off (offline they log an error per attempt). Yields the file; the logging set-up and environment
    are restored afterwards (tests run commands in one process)."""
    path = log_file(command)
    config = file_logging_config(path, verbose)
    settings_file = path.with_suffix(".logging.yml")
    settings_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    names = ["", "distributed", *config.get("loggers", {})]
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in names}
    env = {k: os.environ.get(k) for k in ("PREFECT_LOGGING_SETTINGS_PATH", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    os.environ["PREFECT_LOGGING_SETTINGS_PATH"] = str(settings_file)  # processes started from here on
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.config.dictConfig(config)
    dask_logger = logging.getLogger("distributed")  # Dask may have put a terminal handler of its own there
    dask_logger.handlers = [h for h in dask_logger.handlers if not isinstance(h, logging.StreamHandler)
                            or isinstance(h, logging.FileHandler)]
    dask_logger.propagate = True
    logging.captureWarnings(True)
    try:
        yield path
    finally:
        logging.captureWarnings(False)
        for handler in logging.getLogger().handlers:
            handler.flush()
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            for handler in logger.handlers:
                if handler not in handlers and isinstance(handler, logging.FileHandler):
                    handler.close()
            logger.handlers, logger.level, logger.propagate = handlers, level, propagate
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------- progress bars


class RateColumn(ProgressColumn):
    """Items finished per second since the bar appeared."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if not task.completed or elapsed <= 0:
            return Text("–/s", style="progress.data.speed")
        return Text(f"{task.completed / elapsed:.2f}/s", style="progress.data.speed")


def stage_progress(console: Console) -> Progress:
    """The bar layout: stage, bar, finished/total, done/failed/cached, rate, elapsed, ETA."""
    return Progress(TextColumn("[bold]{task.description:<10}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                    TextColumn("{task.fields[done]} done, {task.fields[failed]} failed, {task.fields[cached]} cached"),
                    RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, refresh_per_second=4)


class StageBars:
    """One bar per stage, polled from the run table: with `since`, the runs claimed from then on (a batch); without,
    every run of the stage (a campaign)."""

    def __init__(self, progress: Progress, since: datetime | None = None, stages: Sequence[str] | None = None):
        self.progress = progress
        self.since = since
        self.stages = set(stages) if stages else None
        self.tasks: dict[str, TaskID] = {}

    def poll(self) -> dict[str, queue.StageCounts]:
        """Read the counts once and move the bars."""
        with session_scope() as session:
            counts = queue.progress_counts(session, self.since)
        for stage, c in counts.items():
            if self.stages is not None and stage not in self.stages:
                continue
            fields: dict[str, Any] = {"done": c.done, "failed": c.failed, "cached": c.cached}
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(stage, total=c.total, completed=c.finished, **fields)
            else:
                self.progress.update(self.tasks[stage], total=c.total, completed=c.finished, **fields)
        return counts


def _threads_safe() -> bool:
    """Whether a second thread may read the database while the flow writes (not one in-memory SQLite connection)."""
    return not is_in_memory(get_engine())


@contextmanager
def batch_progress(console: Console, stages: Sequence[str] | None = None) -> Iterator[StageBars]:
    """Bars for the work claimed inside the block, moved by a polling thread until the block ends."""
    bars = StageBars(stage_progress(console), since=utcnow(), stages=stages)
    if not console.is_terminal:  # a live display on a pipe re-prints its lines and loses what follows it
        yield bars
        return
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(POLL_SECONDS):
            try:
                bars.poll()
            except Exception:  # noqa: BLE001  (a busy database skips one poll; the next one catches up)
                logging.getLogger(__name__).debug("progress poll failed", exc_info=True)

    watcher = threading.Thread(target=watch, name="hopflow-progress", daemon=True) if _threads_safe() else None
    with bars.progress:
        if watcher is not None:
            watcher.start()
        try:
            yield bars
        finally:
            stop.set()
            if watcher is not None:
                watcher.join()
            bars.poll()


def watch_campaign(console: Console, interval: float = 2.0, until_idle: bool = False) -> None:
    """`hopflow status --watch`: every stage's bar over all its runs, until Ctrl-C (or, with `until_idle`, until no
    run is queued, claimed or running)."""
    bars = StageBars(stage_progress(console))
    with bars.progress:
        try:
            while True:
                counts = bars.poll()
                if until_idle and counts and all(c.finished == c.total for c in counts.values()):
                    return
                time.sleep(interval)
        except KeyboardInterrupt:
            return


__all__ = ["StageBars", "batch_progress", "prefect_logs_to_file", "watch_campaign"]
