"""Maintenance flows: clean-up of old finished flow runs in Prefect's database, and a checkpoint of hopflow's database
(a snapshot plus every table as CSV and Parquet in a dated folder)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from prefect import flow, get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterEndTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from sqlalchemy import Connection, Engine, MetaData, Table, select, text, types
from sqlalchemy.engine import URL

from hopflow.db import get_engine, is_sqlite
from hopflow.settings import get_settings

FINISHED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
BULK_DELETE_LIMIT = 50  # the most flow runs Prefect's POST /flow_runs/bulk_delete takes per call
CHECKPOINT_DIR = "checkpoints"
TABLES_DIR = "tables"
SQLITE_SNAPSHOT = "hopflow.sqlite"
PG_SNAPSHOT = "hopflow.pgdump"
MANIFEST = "manifest.json"
EXPORT_BATCH_ROWS = 20_000
PG_DUMP_GLOBS = ("/usr/lib/postgresql/*/bin/pg_dump", "/usr/local/pgsql/bin/pg_dump")
PG_DUMP_TIMEOUT_S = 3600


# ---------------------------------------------------------------- clean-up of Prefect flow runs


@dataclass(frozen=True)
class CleanupReport:
    """Flow runs deleted from Prefect's database (hopflow's tables are never touched)."""

    deleted: int
    older_than: datetime
    states: tuple[str, ...]


def delete_old_flow_runs(client: SyncPrefectClient, older_than_days: float, states: Sequence[str] = FINISHED_STATES,
                         tags: Sequence[str] | None = None) -> CleanupReport:
    """Delete flow runs in the given final states that ended more than `older_than_days` ago, 50 per API call.

    `tags` limits the clean-up to flow runs that carry all of them.
    """
    if older_than_days < 0:
        raise ValueError("older_than_days must be >= 0")
    kinds = [StateType(s.upper()) for s in states]
    if not kinds or not all(k.value in FINISHED_STATES for k in kinds):
        raise ValueError(f"clean-up deletes finished flow runs only: states must be among {', '.join(FINISHED_STATES)}")
    cutoff = datetime.now(UTC) - timedelta(days=older_than_days)
    only_tagged: dict[str, Any] = {"tags": FlowRunFilterTags(all_=list(tags))} if tags else {}
    criteria = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=kinds)),
                             end_time=FlowRunFilterEndTime.model_validate({"before_": cutoff}), **only_tagged)
    body = {"flow_runs": criteria.model_dump(mode="json", exclude_unset=True), "limit": BULK_DELETE_LIMIT}
    deleted = 0
    while True:
        response = client.request("POST", "/flow_runs/bulk_delete", json=body)  # type: ignore[arg-type]
        response.raise_for_status()
        batch = response.json().get("deleted", [])
        deleted += len(batch)
        if len(batch) < BULK_DELETE_LIMIT:
            break
    return CleanupReport(deleted, cutoff, tuple(k.value for k in kinds))


# ---------------------------------------------------------------- checkpoint of hopflow's database


@dataclass(frozen=True)
class TableExport:
    """One exported table: its name, row count and files."""

    name: str
    rows: int
    csv: Path
    parquet: Path


@dataclass(frozen=True)
class CheckpointReport:
    """A checkpoint: the folder, the database snapshot, and one CSV and one Parquet file per table."""

    folder: Path
    snapshot: Path
    tables: tuple[TableExport, ...]

    def rows(self) -> dict[str, int]:
        return {t.name: t.rows for t in self.tables}


def _arrow_type(column_type: types.TypeEngine[Any]) -> pa.DataType:
    """Parquet/CSV column type from the SQL type; JSON and anything unusual become JSON text."""
    if isinstance(column_type, types.Boolean):
        return pa.bool_()
    if isinstance(column_type, types.Integer):
        return pa.int64()
    if isinstance(column_type, (types.Float, types.Numeric)):
        return pa.float64()
    if isinstance(column_type, types.DateTime):
        return pa.timestamp("us", tz="UTC")
    if isinstance(column_type, types.Date):
        return pa.date32()
    return pa.string()


def _cell(value: Any, kind: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(kind) and not isinstance(value, str):
        return json.dumps(value, sort_keys=True, default=str)
    if pa.types.is_timestamp(kind) and isinstance(value, str):
        value = datetime.fromisoformat(value)
    if pa.types.is_timestamp(kind) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # hopflow stores naive UTC on SQLite
    return value


def export_table(conn: Connection, table: Table, folder: Path) -> TableExport:
    """Stream one table into `<name>.csv` and `<name>.parquet` (same columns, JSON values as JSON text)."""
    schema = pa.schema([pa.field(c.name, _arrow_type(c.type)) for c in table.columns])
    csv_path, parquet_path = folder / f"{table.name}.csv", folder / f"{table.name}.parquet"
    order = list(table.primary_key.columns) or list(table.columns)
    rows = 0
    with pq.ParquetWriter(parquet_path, schema) as parquet, pacsv.CSVWriter(csv_path, schema) as csv:
        result = conn.execution_options(stream_results=True).execute(select(table).order_by(*order))
        for chunk in result.partitions(EXPORT_BATCH_ROWS):
            columns = [[_cell(row[i], field.type) for row in chunk] for i, field in enumerate(schema)]
            arrays = [pa.array(col, type=f.type) for col, f in zip(columns, schema, strict=True)]
            batch = pa.record_batch(arrays, schema=schema)
            parquet.write_batch(batch)
            csv.write_batch(batch)
            rows += len(chunk)
    return TableExport(table.name, rows, csv_path, parquet_path)


def _export_all(conn: Connection, folder: Path) -> tuple[TableExport, ...]:
    metadata = MetaData()
    metadata.reflect(conn)
    folder.mkdir(parents=True, exist_ok=True)
    return tuple(export_table(conn, table, folder) for table in metadata.sorted_tables)


def find_pg_dump() -> str:
    """pg_dump of the newest PostgreSQL on this machine (Debian keeps it under /usr/lib/postgresql/N/bin), or PATH's."""
    found = sorted((p for pattern in PG_DUMP_GLOBS for p in glob.glob(pattern)),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts])
    if found:
        return found[-1]
    on_path = shutil.which("pg_dump")
    if on_path:
        return on_path
    raise FileNotFoundError("pg_dump not found (install postgresql-client)")


def _pg_environment(url: URL) -> dict[str, str]:
    """libpq variables for pg_dump: the password travels in the environment, never on the command line."""
    env = dict(os.environ)
    for key, value in (("PGHOST", url.host), ("PGPORT", url.port), ("PGUSER", url.username),
                       ("PGPASSWORD", url.password), ("PGDATABASE", url.database)):
        if value is not None:
            env[key] = str(value)
    return env


def _snapshot_sqlite(engine: Engine, dest: Path) -> None:
    with engine.connect() as conn:
        source = conn.connection.driver_connection
        assert source is not None, "a live SQLite connection has its sqlite3 connection"
        target = sqlite3.connect(dest)
        try:
            source.backup(target)  # SQLite's online backup API: a consistent copy while others write
        finally:
            target.close()


@contextmanager
def _pg_snapshot(engine: Engine, dest: Path) -> Iterator[Connection]:
    """pg_dump and the table export read the same exported snapshot, so the files agree row for row."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar_one()
            command = [find_pg_dump(), "--format=custom", f"--snapshot={snapshot}", f"--file={dest}", "--no-password"]
            done = subprocess.run(command, env=_pg_environment(engine.url), capture_output=True, text=True,
                                  timeout=PG_DUMP_TIMEOUT_S)
            if done.returncode != 0:
                raise RuntimeError(f"pg_dump failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
            yield conn


def checkpoint_database(engine: Engine | None = None, dest: Path | str | None = None,
                        now: datetime | None = None) -> CheckpointReport:
    """Snapshot the hopflow database (SQLite backup API, or pg_dump) and write every table to CSV and Parquet.

    The folder is `dest`/`<UTC timestamp>` (default dest: `<home>/checkpoints`). On SQLite the tables are exported
    from the snapshot file itself; on PostgreSQL from the snapshot pg_dump read.
    """
    engine = engine or get_engine()
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H%M%SZ")
    folder = Path(dest) if dest is not None else get_settings().home / CHECKPOINT_DIR
    folder = folder / stamp
    folder.mkdir(parents=True, exist_ok=False)
    try:
        return _checkpoint_into(engine, folder, stamp)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # a failed checkpoint leaves no half-written dated folder
        raise


def _checkpoint_into(engine: Engine, folder: Path, stamp: str) -> CheckpointReport:
    if is_sqlite(engine):
        snapshot = folder / SQLITE_SNAPSHOT
        _snapshot_sqlite(engine, snapshot)
        from hopflow.db import make_engine

        copy = make_engine(f"sqlite:///{snapshot}")
        try:
            with copy.connect() as conn:
                tables = _export_all(conn, folder / TABLES_DIR)
        finally:
            copy.dispose()
    else:
        snapshot = folder / PG_SNAPSHOT
        with _pg_snapshot(engine, snapshot) as conn:
            tables = _export_all(conn, folder / TABLES_DIR)
    report = CheckpointReport(folder, snapshot, tables)
    manifest = {"created": stamp, "database": engine.url.render_as_string(hide_password=True),
                "snapshot": snapshot.name, "tables": report.rows()}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return report


# ---------------------------------------------------------------- flows


@flow(name="cleanup", flow_run_name="cleanup-older-than-{older_than_days}d")
def cleanup(older_than_days: float = 7.0, states: list[str] | None = None,
            tags: list[str] | None = None) -> CleanupReport:
    """Delete finished flow runs older than `older_than_days` from Prefect's database (never hopflow's tables)."""
    with get_client(sync_client=True) as client:
        report = delete_old_flow_runs(client, older_than_days, states or FINISHED_STATES, tags)
    get_run_logger().info("deleted %d flow runs (%s) that ended before %s", report.deleted,
                          ", ".join(report.states), report.older_than.isoformat())
    return report


@flow(name="checkpoint")
def checkpoint(dest: str | None = None) -> CheckpointReport:
    """Snapshot the hopflow database and export every table to CSV and Parquet in a dated folder."""
    report = checkpoint_database(dest=dest)
    get_run_logger().info("checkpoint %s: %d tables, %d rows", report.folder, len(report.tables),
                          sum(report.rows().values()))
    return report
