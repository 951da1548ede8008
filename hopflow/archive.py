"""Export the provenance closure of chosen structures into one archive file, and import such an archive into any
hopflow database: ids remapped, rows matched by content, one transaction (format in docs/archive.md)."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any, overload

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Float,
    Integer,
    LargeBinary,
    Select,
    Table,
    Text,
    cast,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from hopflow.db import Base, get_engine, session_scope, utcnow
from hopflow.errors import ArchiveConflictError, ArchiveCorruptError, ArchiveError, ArchiveSchemaError
from hopflow.fingerprints import pathway_fingerprint
from hopflow.models import (
    Archive,
    BarrierModelRow,
    CalibrationRow,
    Estimate,
    Features,
    NebResult,
    Pathway,
    Run,
    RunState,
    Source,
    Structure,
    Vacancy,
    VacancySite,
)
from hopflow.models.barriers import UNCHECKED_FLAG
from hopflow.settings import get_settings
from hopflow.sources import file_key

FORMAT = "hopflow-archive"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAGES = ("import", "pathways", "features", "vacancies", "estimates", "neb")
"""Stage levels in closure order: `--stage S` exports S and every level before it."""
HASH_CHUNK = 1 << 20


# ---------------------------------------------------------------- members: what an archive holds, in import order


@dataclass(frozen=True)
class Member:
    """One Parquet member of an archive: a table, or one stage's part of the run table, at a stage level."""

    name: str
    table: Table
    level: str
    stage: str | None = None

    @property
    def file(self) -> str:
        return f"{self.name}.parquet"

    @classmethod
    def rows_of(cls, model: Any, level: str) -> Member:
        """A whole table's member, named after the table."""
        return cls(model.__tablename__, model.__table__, level)

    @classmethod
    def runs_of(cls, stage: str) -> Member:
        """The runs of one stage (`runs.<stage>`), at that stage's level."""
        return cls(f"runs.{stage}", Base.metadata.tables[Run.__tablename__], stage, stage)


def _members() -> tuple[Member, ...]:
    return (
        Member.rows_of(Source, "import"), Member.runs_of("import"), Member.rows_of(Structure, "import"),
        Member.runs_of("pathways"), Member.rows_of(Pathway, "pathways"),
        Member.runs_of("features"), Member.rows_of(Features, "features"),
        Member.rows_of(VacancySite, "vacancies"), Member.runs_of("vacancies"), Member.rows_of(Vacancy, "vacancies"),
        Member.runs_of("estimates"), Member.rows_of(Estimate, "estimates"),
        Member.runs_of("neb"), Member.rows_of(NebResult, "neb"),
        Member.rows_of(BarrierModelRow, "neb"), Member.rows_of(CalibrationRow, "neb"),
    )


MEMBERS = _members()
LEARNING_MEMBERS = frozenset({"barrier_models", "calibrations"})
"""Exported with `--all` only: their id lists name pathways of the whole database."""
RUN_EXPORT_SKIP = ("archive_id",)
"""Run columns not exported as they are: the archive a run came from travels as `archive` (its record)."""


# ---------------------------------------------------------------- selection and reports


@dataclass(frozen=True)
class Selection:
    """What to export: structures by id and/or reduced formula, or all; results up to a stage level."""

    structure_ids: tuple[int, ...] = ()
    formulas: tuple[str, ...] = ()
    all: bool = False
    stage: str = "neb"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ArchiveError(f"unknown stage {self.stage!r} for an export (known: {', '.join(STAGES)})")
        if not (self.all or self.structure_ids or self.formulas):
            raise ArchiveError("nothing selected: give --structure ID, --formula F or --all")

    def structures(self) -> Select[Any]:
        query = select(Structure.id)
        if self.all:
            return query
        criteria = []
        if self.structure_ids:
            criteria.append(Structure.id.in_(list(self.structure_ids)))
        if self.formulas:
            criteria.append(Structure.formula.in_(list(self.formulas)))
        return query.where(or_(*criteria))

    def includes(self, member: Member) -> bool:
        if member.name in LEARNING_MEMBERS and not self.all:
            return False
        return STAGES.index(member.level) <= STAGES.index(self.stage)

    def describe(self) -> dict[str, Any]:
        return {"structure_ids": list(self.structure_ids), "formulas": list(self.formulas), "all": self.all,
                "stage": self.stage}


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote: the file, its SHA-256 and size, and the rows of each member."""

    path: Path
    sha256: str
    bytes: int
    rows: dict[str, int]

    @property
    def summary(self) -> str:
        runs = sum(n for name, n in self.rows.items() if name.startswith("runs."))
        return (f"exported {runs} runs and {sum(self.rows.values()) - runs} result rows to {self.path} "
                f"({self.bytes / 1e6:.1f} MB, sha256 {self.sha256[:12]})")


@dataclass
class TableCount:
    """Rows of one table read from an archive: added here, matched to rows already stored, queued runs completed."""

    added: int = 0
    matched: int = 0
    adopted: int = 0


@dataclass
class ImportReport:
    """What an import did per table; `archive_id` is None when it added nothing (no archives row kept)."""

    name: str
    sha256: str
    schema_revision: str
    archive_id: int | None = None
    tables: dict[str, TableCount] = field(default_factory=dict)

    @property
    def added(self) -> int:
        return sum(c.added for c in self.tables.values())

    @property
    def summary(self) -> str:
        matched = sum(c.matched for c in self.tables.values())
        adopted = sum(c.adopted for c in self.tables.values())
        parts = ", ".join(f"{t} +{c.added}" for t, c in self.tables.items() if c.added)
        return (f"imported {self.name}: {self.added} rows added ({parts or 'none'}), {matched} already here"
                + (f", {adopted} queued runs completed from the archive" if adopted else ""))


# ---------------------------------------------------------------- column types


def _arrow_type(column: Any) -> pa.DataType:
    kind = column.type
    if isinstance(kind, Boolean):
        return pa.bool_()
    if isinstance(kind, Integer):
        return pa.int64()
    if isinstance(kind, Float):
        return pa.float64()
    if isinstance(kind, DateTime):
        return pa.timestamp("us", tz="UTC")
    if isinstance(kind, LargeBinary):
        return pa.binary()
    return pa.string()  # strings, text and JSON (as JSON text)


def _is_json(column: Any) -> bool:
    return isinstance(column.type, JSON)


@overload
def _utc(value: datetime) -> datetime: ...
@overload
def _utc(value: None) -> None: ...
def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _export_columns(member: Member) -> list[Any]:
    return [c for c in member.table.columns if c.name not in RUN_EXPORT_SKIP or member.stage is None]


# ---------------------------------------------------------------- export


def _closure_queries(selection: Selection) -> dict[str, Select[Any]]:
    """Per member, the SELECT of its rows in the closure of the selected structures (all in SQL, streamed)."""
    structures = selection.structures()
    pathways = select(Pathway.id).where(Pathway.structure_id.in_(structures))
    sources = select(Source.id).where(Source.structure_id.in_(structures))
    queries: dict[str, Select[Any]] = {
        "sources": select(Source.__table__).where(Source.structure_id.in_(structures)),
        "structures": select(Structure.__table__).where(Structure.id.in_(structures)),
        "pathways": select(Pathway.__table__).where(Pathway.structure_id.in_(structures)),
        "features": select(Features.__table__).where(Features.pathway_id.in_(pathways)),
        "vacancy_sites": select(VacancySite.__table__).where(VacancySite.structure_id.in_(structures)),
        "vacancies": select(Vacancy.__table__).where(Vacancy.structure_id.in_(structures)),
        "estimates": select(Estimate.__table__).where(Estimate.pathway_id.in_(pathways)),
        "neb": select(NebResult.__table__).where(NebResult.pathway_id.in_(pathways)),
        "barrier_models": select(BarrierModelRow.__table__),
        "calibrations": select(CalibrationRow.__table__),
    }
    producers = {
        "import": or_(Run.id.in_(select(Structure.run_id).where(Structure.id.in_(structures))),
                      Run.input_id.in_(sources)),
        "pathways": Run.id.in_(select(Pathway.run_id).where(Pathway.structure_id.in_(structures))),
        "features": Run.id.in_(select(Features.run_id).where(Features.pathway_id.in_(pathways))),
        "vacancies": Run.id.in_(select(Vacancy.run_id).where(Vacancy.structure_id.in_(structures))),
        "estimates": Run.id.in_(select(Estimate.run_id).where(Estimate.pathway_id.in_(pathways))),
        "neb": Run.id.in_(select(NebResult.run_id).where(NebResult.pathway_id.in_(pathways))),
    }
    for stage, produced in producers.items():
        queries[f"runs.{stage}"] = select(Run.__table__).where(Run.stage == stage, Run.state == RunState.DONE,
                                                                produced)
    return queries


def _select_for_export(member: Member, query: Select[Any]) -> Select[Any]:
    """The member's columns, JSON read as its stored text (no parse and re-dump), ordered by id."""
    sub = query.subquery()
    cols = [cast(sub.c[c.name], Text).label(c.name) if _is_json(c) else sub.c[c.name] for c in _export_columns(member)]
    if member.stage is not None:  # the archive record of an imported run travels with it
        cols.append(select(Archive.name).where(Archive.id == sub.c.archive_id).scalar_subquery().label("archive_name"))
        cols.append(select(Archive.sha256).where(Archive.id == sub.c.archive_id).scalar_subquery()
                    .label("archive_sha256"))
        cols.append(select(Archive.imported_at).where(Archive.id == sub.c.archive_id).scalar_subquery()
                    .label("archive_imported_at"))
    return select(*cols).order_by(sub.c.id)


def _schema(member: Member) -> pa.Schema:
    fields = [pa.field(c.name, _arrow_type(c)) for c in _export_columns(member)]
    if member.stage is not None:
        fields += [pa.field("archive_name", pa.string()),
                   pa.field("archive_sha256", pa.string()),
                   pa.field("archive_imported_at", pa.timestamp("us", tz="UTC"))]
    return pa.schema(fields)


def _write_member(session: Session, member: Member, query: Select[Any], path: Path, batch_rows: int) -> int:
    schema = _schema(member)
    timestamps = [i for i, f in enumerate(schema) if pa.types.is_timestamp(f.type)]
    rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        result = session.execute(_select_for_export(member, query).execution_options(stream_results=True,
                                                                                     yield_per=batch_rows))
        for chunk in result.partitions(batch_rows):
            columns = [list(col) for col in zip(*chunk, strict=True)]
            for i in timestamps:
                columns[i] = [_utc(v) for v in columns[i]]
            writer.write_batch(pa.record_batch([pa.array(c, type=f.type) for c, f in zip(columns, schema, strict=True)],
                                               schema=schema))
            rows += len(chunk)
        if rows == 0:
            writer.write_table(schema.empty_table())
    return rows


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def schema_head() -> str:
    """The newest Alembic revision this hopflow knows (the schema revision archives are written in)."""
    return _revisions()[-1]


@lru_cache(maxsize=1)
def _revisions() -> tuple[str, ...]:
    """Alembic revisions, oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(resources.files("hopflow") / "migrations"))
    return tuple(r.revision for r in reversed(list(script.walk_revisions())))


def _newest_revision(engine: Engine, verb: str) -> str:
    """The database's schema revision, which must be the newest this hopflow knows (ArchiveSchemaError otherwise);
    `verb` says what this hopflow does with that revision in the message ("writes", "has")."""
    revision = database_revision(engine)
    if revision is None or revision != schema_head():
        raise ArchiveSchemaError(f"the database is at schema revision {revision}, this hopflow {verb} {schema_head()}"
                                 ": run `hopflow init` first")
    return revision


def database_revision(engine: Engine) -> str | None:
    from sqlalchemy import text

    with engine.connect() as conn:
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _hopflow_version() -> str | None:
    try:
        return metadata.version("hopflow")
    except metadata.PackageNotFoundError:
        return None


def export_closure(selection: Selection, path: Path | str, *, engine: Engine | None = None) -> ExportReport:
    """Write the provenance closure of the selected structures to `path` (a zip of Parquet tables + manifest).

    Every member is streamed from one SQL query in row-group batches; the file appears complete or not at all.
    """
    engine = engine or get_engine()
    path = Path(path)
    revision = _newest_revision(engine, "writes")
    batch_rows = get_settings().archive_batch_rows
    queries = _closure_queries(selection)
    members: dict[str, dict[str, Any]] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".hopflow-export-") as tmp:
        folder = Path(tmp)
        with session_scope(engine) as session:  # one read transaction: a consistent snapshot on PostgreSQL
            for member in MEMBERS:
                if not selection.includes(member):
                    continue
                file = folder / member.file
                rows = _write_member(session, member, queries[member.name], file, batch_rows)
                members[member.file] = {"table": member.table.name, "stage": member.stage, "rows": rows,
                                        "bytes": file.stat().st_size, "sha256": _sha256_file(file),
                                        "columns": _schema(member).names}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "schema_revision": revision,
                    "hopflow_version": _hopflow_version(), "exported_at": utcnow().isoformat(),
                    "database": engine.dialect.name, "selection": selection.describe(), "members": members}
        partial = folder / "archive.zip"
        with zipfile.ZipFile(partial, "w", allowZip64=True) as zf:
            zf.writestr(MANIFEST, json.dumps(manifest, indent=1), compress_type=zipfile.ZIP_DEFLATED)
            for name in members:  # stored: Parquet is compressed already, and stored members are seekable
                zf.write(folder / name, name, compress_type=zipfile.ZIP_STORED)
        partial.replace(path)
    return ExportReport(path=path, sha256=_sha256_file(path), bytes=path.stat().st_size,
                        rows={name.removesuffix(".parquet"): m["rows"] for name, m in members.items()})


# ---------------------------------------------------------------- verification (before anything is written)


@dataclass(frozen=True)
class VerifiedArchive:
    """An archive whose zip structure, manifest, checksums and row counts were all checked."""

    path: Path
    sha256: str
    manifest: dict[str, Any]

    @property
    def revision(self) -> str:
        return str(self.manifest["schema_revision"])


def verify_archive(path: Path | str) -> VerifiedArchive:
    """Check an archive completely before an import: a readable zip, a manifest of a known format and a schema
    revision this hopflow has, every member present with its SHA-256 and row count. Raises an ArchiveError."""
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path}: no such archive file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ArchiveCorruptError(f"{path.name} is truncated or not a hopflow archive (no complete zip: {exc})") \
            from None
    with zf:
        manifest = _read_manifest(zf, path.name)
        _check_schema(manifest, path.name)
        names = set(zf.namelist()) - {MANIFEST}
        listed = set(manifest["members"])
        if names != listed:
            raise ArchiveCorruptError(f"{path.name}: members {sorted(listed ^ names)} differ from the manifest")
        for name, entry in manifest["members"].items():
            _check_member(zf, path.name, name, entry)
    return VerifiedArchive(path=path, sha256=_sha256_file(path), manifest=manifest)


def _read_manifest(zf: zipfile.ZipFile, label: str) -> dict[str, Any]:
    try:
        manifest = json.loads(zf.read(MANIFEST))
    except KeyError:
        raise ArchiveCorruptError(f"{label}: no {MANIFEST} (not a hopflow archive)") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ArchiveCorruptError(f"{label}: {MANIFEST} is damaged ({exc})") from None
    except ValueError as exc:
        raise ArchiveCorruptError(f"{label}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "members" not in manifest:
        raise ArchiveSchemaError(f"{label}: not a {FORMAT} manifest")
    return manifest


def _check_schema(manifest: Mapping[str, Any], label: str) -> None:
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArchiveSchemaError(f"{label}: archive format version {version} is newer than this hopflow reads "
                                 f"({FORMAT_VERSION}); upgrade hopflow to import it")
    revision = str(manifest.get("schema_revision"))
    known = _revisions()
    if revision not in known:
        raise ArchiveSchemaError(f"{label}: archive schema revision {revision} is newer than this hopflow's "
                                 f"({known[-1]}) or unknown to it; upgrade hopflow to import it")


def _check_member(zf: zipfile.ZipFile, label: str, name: str, entry: Mapping[str, Any]) -> None:
    digest = hashlib.sha256()
    try:
        with zf.open(name) as handle:
            while block := handle.read(HASH_CHUNK):
                digest.update(block)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ArchiveCorruptError(f"{label}: member {name} is damaged ({exc})") from None
    if digest.hexdigest() != entry.get("sha256"):
        raise ArchiveCorruptError(f"{label}: member {name} fails its SHA-256 checksum (the file was changed or "
                                  "damaged)")
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ArchiveCorruptError(f"{label}: member {name} is compressed in the zip; hopflow stores Parquet members")
    try:
        assert zf.filename is not None, "archives are opened by path"
        with _StoredMember(Path(zf.filename), info) as handle:
            rows = pq.ParquetFile(handle).metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise ArchiveCorruptError(f"{label}: member {name} is not a readable Parquet table ({exc})") from None
    if rows != entry.get("rows"):
        raise ArchiveCorruptError(f"{label}: member {name} holds {rows} rows, its manifest says {entry.get('rows')}")


# ---------------------------------------------------------------- upgrades of rows written at an older revision

ROW_UPGRADES: dict[str, dict[str, Callable[[dict[str, Any]], None]]] = {}
"""revision -> table -> what that revision's migration does to a stored row, applied to archive rows written
before it (columns it adds get their defaults generically; computed values here)."""


def _flag_unchecked(row: dict[str, Any]) -> None:
    row["flag"] = UNCHECKED_FLAG
    row["flag_reason"] = "stored before the path checks of migration 0005"


ROW_UPGRADES["0005"] = {"estimates": _flag_unchecked, "neb": _flag_unchecked}


def _format_in_file_key(row: dict[str, Any]) -> None:
    if row.get("kind") == "file" and ":" not in str(row.get("key")):
        row["key"] = file_key(str(row["key"]), row.get("format"))


ROW_UPGRADES["0007"] = {"sources": _format_in_file_key}


def _upgraders(revision: str, table: str) -> list[Callable[[dict[str, Any]], None]]:
    known = _revisions()
    newer = known[known.index(revision) + 1:]
    return [ROW_UPGRADES[r][table] for r in newer if table in ROW_UPGRADES.get(r, {})]


def _column_default(column: Any) -> Any:
    if column.server_default is not None and hasattr(column.server_default, "arg"):
        arg = column.server_default.arg
        if isinstance(arg, str):
            return int(arg) if isinstance(column.type, Integer) else arg
    return None


# ---------------------------------------------------------------- import


@dataclass
class IdMap:
    """Archive id -> (local id, inserted by this import) for one table."""

    ids: dict[int, tuple[int, bool]] = field(default_factory=dict)

    def local(self, archive_id: int | None) -> int | None:
        return None if archive_id is None else self.ids.get(archive_id, (None, False))[0]

    def existing(self, archive_id: int | None) -> bool:
        """True when the archive row was matched to a row stored before this import."""
        return archive_id is not None and archive_id in self.ids and not self.ids[archive_id][1]


@dataclass
class _Import:
    """State of one import: the session, the archive's revision, id maps and counts."""

    session: Session
    archive: VerifiedArchive
    archive_id: int
    report: ImportReport
    maps: dict[str, IdMap] = field(default_factory=dict)
    pending_sources: list[tuple[int, int]] = field(default_factory=list)
    pending_reuse: list[tuple[int, int]] = field(default_factory=list)
    new_structures: set[int] = field(default_factory=set)
    """Local ids of the structures this import added (never a match for another archive structure)."""
    added_slots: dict[tuple[str, int, str], int] = field(default_factory=dict)
    """Runs this import added for inputs stored before it, by identity (two archive runs may meet in one)."""

    def map(self, table: str) -> IdMap:
        return self.maps.setdefault(table, IdMap())

    def count(self, table: str) -> TableCount:
        return self.report.tables.setdefault(table, TableCount())


class _StoredMember(io.RawIOBase):
    """A stored (uncompressed) zip member read in place from the archive file: Parquet seeks to its row groups
    without the zip module rereading the member from its start."""

    def __init__(self, path: Path, info: zipfile.ZipInfo) -> None:
        self._file = open(path, "rb")
        self._file.seek(info.header_offset)
        header = self._file.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        self._start = info.header_offset + 30 + name_len + extra_len
        self._size = info.file_size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + offset))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        self._file.seek(self._start + self._pos)
        data = self._file.read(n)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def _batches(zf: zipfile.ZipFile, path: Path, member: str, batch_rows: int) -> Iterator[list[dict[str, Any]]]:
    info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ArchiveCorruptError(f"{path.name}: member {member} is compressed in the zip; hopflow writes Parquet "
                                  "members stored")
    with _StoredMember(path, info) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows):
            yield batch.to_pylist()


def _prepare(rows: list[dict[str, Any]], table: Table, revision: str) -> None:
    """Archive rows as this schema's rows: columns added since `revision` defaulted, upgrades run. JSON stays the
    stored text (parsed only where an importer needs a value), so it is written back byte for byte."""
    missing = [(c.name, _column_default(c)) for c in table.columns if rows and c.name not in rows[0]]
    upgrades = _upgraders(revision, table.name) if revision != schema_head() else []
    for row in rows:
        for name, default in missing:
            row[name] = default
        for upgrade in upgrades:
            upgrade(row)


def _json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _allocate_ids(session: Session, table: Table, n: int) -> list[int]:
    """`n` new ids of a table: from its sequence on PostgreSQL; after the largest on SQLite (whose write lock this
    transaction holds)."""
    if session.get_bind().dialect.name == "postgresql":
        rows = session.execute(text(f"SELECT nextval(pg_get_serial_sequence('{table.name}', 'id')) "
                                    "FROM generate_series(1, :n)"), {"n": n})
        return [r[0] for r in rows]
    top = session.execute(text(f"SELECT coalesce(max(id), 0) FROM {table.name}")).scalar_one()
    return list(range(top + 1, top + 1 + n))


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):  # as SQLAlchemy stores DateTime on SQLite: naive UTC text
        return _utc(value).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def _insert_rows(state: _Import, table: Table, rows: list[dict[str, Any]]) -> list[int]:
    """Bulk insert with ids allocated up front: COPY on PostgreSQL, executemany on SQLite (JSON as its text)."""
    if not rows:
        return []
    ids = _allocate_ids(state.session, table, len(rows))
    columns = [c.name for c in table.columns]
    values = [tuple(i if c == "id" else row.get(c) for c in columns) for i, row in zip(ids, rows, strict=True)]
    dbapi = state.session.connection().connection.driver_connection
    assert dbapi is not None, "a live session has its driver connection"
    names = ", ".join(f'"{c}"' for c in columns)
    if state.session.get_bind().dialect.name == "postgresql":
        with dbapi.cursor() as cursor, cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
            for row in values:
                copy.write_row(row)
    else:
        marks = ", ".join("?" for _ in columns)
        cursor = dbapi.cursor()
        cursor.executemany(f'INSERT INTO "{table.name}" ({names}) VALUES ({marks})',
                           [tuple(_sqlite_value(v) for v in row) for row in values])
        cursor.close()
    return ids


def _store(state: _Import, member: Member, rows: list[dict[str, Any]], matched: Mapping[int, int]) -> None:
    """Insert the rows not matched; record every archive id's local id."""
    ids = state.map(member.table.name if member.stage is None else "runs")
    count = state.count(member.table.name)
    new = [r for r in rows if r["id"] not in matched]
    for archive_id, local_id in matched.items():
        ids.ids[archive_id] = (local_id, False)
    for row, local_id in zip(new, _insert_rows(state, member.table, new), strict=True):
        ids.ids[row["id"]] = (local_id, True)
    count.added += len(new)
    count.matched += len(matched)


def _match_stored(state: _Import, table: Table, rows: list[dict[str, Any]], key: Sequence[str], probe_column: str,
                  probe: set[Any]) -> dict[int, int]:
    """Archive id -> local id of the rows whose `key` columns equal a stored row's, looking only at the stored rows
    whose `probe_column` is in `probe` (none when it is empty)."""
    if not probe:
        return {}
    stored = {tuple(found[1:]): found[0] for found in state.session.execute(
        select(table.c.id, *(table.c[k] for k in key)).where(table.c[probe_column].in_(probe)))}
    return {r["id"]: stored[ident] for r in rows if (ident := tuple(r[k] for k in key)) in stored}


def _import_sources(state: _Import, member: Member, rows: list[dict[str, Any]]) -> None:
    matched = _match_stored(state, member.table, rows, ("kind", "key"), "key", {r["key"] for r in rows})
    structure_of = {r["id"]: r["structure_id"] for r in rows}
    for row in rows:
        row["structure_id"] = None  # set once the structures are in
    _store(state, member, rows, matched)
    ids = state.map("sources")
    state.pending_sources += [(ids.ids[a][0], s) for a, s in structure_of.items()
                              if a not in matched and s is not None]


RUN_INPUTS = {"import": "sources", "pathways": "structures", "features": "pathways", "vacancies": "vacancy_sites",
              "estimates": "pathways", "neb": "pathways"}


def _origin(row: dict[str, Any]) -> dict[str, Any]:
    """An imported run's origin: its id in the exporting database and the archives it came through before."""
    before = dict(_json(row.get("origin")) or {})
    via = list(before.get("via", []))
    if row.get("archive_name"):
        imported_at: datetime | None = row.get("archive_imported_at")
        via.append({"archive": row["archive_name"], "sha256": row.get("archive_sha256"),
                    "imported_at": _utc(imported_at).isoformat() if imported_at else None,
                    "run_id": before.get("run_id")})
    origin: dict[str, Any] = {"run_id": row["id"]}
    if row.get("reused_run_id") is not None:
        origin["reused_run_id"] = row["reused_run_id"]
    return {**origin, "via": via} if via else origin


def _import_runs(state: _Import, member: Member, rows: list[dict[str, Any]]) -> None:
    stage = member.stage
    assert stage is not None, "a runs member names its stage"
    inputs = state.map(RUN_INPUTS[stage])
    probe = []
    for row in rows:
        # a run of the same identity (stage, input, parameter set) can exist here only for an input stored before
        if inputs.existing(row["input_id"]):
            probe.append((inputs.local(row["input_id"]), row["param_hash"]))
        row["input_id"] = inputs.local(row["input_id"])
        row["origin"] = json.dumps(_origin(row))
        row["archive_id"] = state.archive_id
    slots: dict[tuple[int, str], tuple[int, str]] = {}
    if probe:
        found = state.session.execute(select(Run.id, Run.input_id, Run.param_hash, Run.state).where(
            Run.stage == stage, tuple_(Run.input_id, Run.param_hash).in_(probe)))
        slots = {(i, p): (rid, st) for rid, i, p, st in found}
    matched: dict[int, int] = {}
    for row in rows:
        slot = slots.get((row["input_id"], row["param_hash"]))
        earlier = state.added_slots.get((stage, row["input_id"], row["param_hash"]))
        if earlier is not None:  # an archive run of the same identity was added a moment ago
            matched[row["id"]] = earlier
            continue
        if slot is None:
            continue
        local_id, local_state = slot
        if local_state in RunState.LIVE:
            raise ArchiveConflictError(f"run {local_id} ({stage} of {RUN_INPUTS[stage]} #{row['input_id']}) is "
                                       f"{local_state} here; import the archive when it has finished")
        if local_state != RunState.DONE:
            _adopt(state, local_id, row)
            state.count("runs").adopted += 1
        matched[row["id"]] = local_id
    for row in rows:
        reused = row.get("reused_run_id")
        row["reused_run_id"] = None
        if reused is not None and row["id"] not in matched:
            state.pending_reuse.append((row["id"], reused))
    _store(state, member, rows, matched)
    runs, probed = state.map("runs"), set(probe)
    for row in rows:
        if (row["input_id"], row["param_hash"]) in probed and runs.ids[row["id"]][1]:
            state.added_slots[(stage, row["input_id"], row["param_hash"])] = runs.ids[row["id"]][0]


def _adopt(state: _Import, local_id: int, row: dict[str, Any]) -> None:
    """A run queued (or failed) here that the archive holds done: it takes the archive's result and provenance."""
    local = state.session.get_one(Run, local_id)
    values = {name: row.get(name) for name in ("state", "cache_key", "versions", "host", "flow_run_id", "claimed_at",
                                               "started_at", "finished_at", "archive_id", "origin", "error")}
    values["origin"] = _json(values["origin"])
    values["versions"] = _json(values["versions"])
    values["history"] = [*(local.history or []), *(_json(row.get("history")) or [])]
    values["attempts"] = row.get("attempts")
    state.session.execute(update(Run).where(Run.id == local_id).values(**values, lease_expires_at=None,
                                                                       claimant=None)
                          .execution_options(synchronize_session=False))


def _import_structures(state: _Import, member: Member, rows: list[dict[str, Any]]) -> None:
    from pymatgen.analysis.structure_matcher import ElementComparator, StructureMatcher
    from pymatgen.core import Structure as PmgStructure

    runs = state.map("runs")
    for row in rows:
        row["run_id"] = runs.local(row["run_id"])
    prints = {r["fingerprint"] for r in rows}
    candidates: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for sid, fp, data in state.session.execute(select(Structure.id, Structure.fingerprint, Structure.structure)
                                               .where(Structure.fingerprint.in_(prints))):
        if sid not in state.new_structures:  # the archive's own structures are distinct, as they were there
            candidates.setdefault(fp, []).append((sid, data))
    matcher = StructureMatcher(comparator=ElementComparator())
    matched = {}
    for row in rows:
        others = candidates.get(row["fingerprint"], [])
        if not others:
            continue
        data = _json(row["structure"])
        same = [sid for sid, other in others if other == data]  # the very same stored cell: equal, no fit needed
        if same:
            matched[row["id"]] = same[0]
            continue
        mine = PmgStructure.from_dict(data)
        for sid, other in others:  # the fingerprint is a pre-filter; StructureMatcher decides
            if matcher.fit(mine, PmgStructure.from_dict(other)):
                matched[row["id"]] = sid
                break
    _store(state, member, rows, matched)
    structures = state.map("structures")
    state.new_structures.update(structures.ids[r["id"]][0] for r in rows if r["id"] not in matched)


def _import_pathways(state: _Import, member: Member, rows: list[dict[str, Any]]) -> None:
    structures, runs = state.map("structures"), state.map("runs")
    probe = set()
    for row in rows:
        if runs.existing(row["run_id"]):  # an added run's pathways are added with it
            probe.add(runs.local(row["run_id"]))
        row["structure_id"] = structures.local(row["structure_id"])
        row["run_id"] = runs.local(row["run_id"])
    _fill_pathway_fingerprints(state, [r for r in rows if r.get("fingerprint") is None])
    matched = _match_stored(state, member.table, rows, ("structure_id", "run_id", "fingerprint"), "run_id", probe)
    _store(state, member, rows, matched)


def _fill_pathway_fingerprints(state: _Import, rows: list[dict[str, Any]]) -> None:
    """What migration 0005 computes for stored pathways, for rows of an archive written before it."""
    if not rows:
        return
    from hopflow.stages import lattice_parameters

    found = {i: (fp, s) for i, fp, s in state.session.execute(
        select(Structure.id, Structure.fingerprint, Structure.structure)
        .where(Structure.id.in_({r["structure_id"] for r in rows})))}
    for row in rows:
        fp, structure = found[row["structure_id"]]
        row["fingerprint"] = pathway_fingerprint(fp, lattice_parameters(structure), row["ion"],
                                                 _json(row["start_frac"]), _json(row["end_frac"]))


def _import_vacancy_sites(state: _Import, member: Member, rows: list[dict[str, Any]]) -> None:
    structures = state.map("structures")
    probe = {structures.local(r["structure_id"]) for r in rows if structures.existing(r["structure_id"])}
    for row in rows:
        row["structure_id"] = structures.local(row["structure_id"])
    matched = _match_stored(state, member.table, rows, ("structure_id", "supercell", "site_index"), "structure_id",
                            probe)
    _store(state, member, rows, matched)


_RowsImporter = Callable[[_Import, Member, list[dict[str, Any]]], None]


def _results_importer(parent_column: str, parent_table: str,
                      extra: Mapping[str, str] | None = None) -> _RowsImporter:
    """Rows that one run makes per parent (features, vacancies, barriers): matched by (parent, run)."""

    def importer(state: _Import, member: Member, rows: list[dict[str, Any]]) -> None:
        parents, runs = state.map(parent_table), state.map("runs")
        probe = set()
        for row in rows:
            if parents.existing(row[parent_column]) and runs.existing(row["run_id"]):
                probe.add(runs.local(row["run_id"]))
            row[parent_column] = parents.local(row[parent_column])
            row["run_id"] = runs.local(row["run_id"])
            for column, other in (extra or {}).items():
                row[column] = state.map(other).local(row.get(column))
        matched = _match_stored(state, member.table, rows, (parent_column, "run_id"), "run_id", probe)
        _store(state, member, rows, matched)

    return importer


def _import_learning(
    key: Sequence[str], id_lists: Sequence[str]
) -> Callable[[_Import, Member, list[dict[str, Any]]], None]:
    """Models and calibrations (`--all` archives): matched by their identifying columns, pathway id lists remapped."""

    def importer(state: _Import, member: Member, rows: list[dict[str, Any]]) -> None:
        pathways = state.map("pathways")
        table = member.table
        for row in rows:
            for column in id_lists:
                row[column] = json.dumps([pathways.local(i) for i in _json(row[column]) or []])
        stored = {
            tuple(_utc(v) if isinstance(v, datetime) else v for v in r[1:]): r[0]
            for r in state.session.execute(select(table.c.id, *(table.c[k] for k in key)))
        }
        matched = {}
        for row in rows:
            ident = tuple(_utc(row[k]) if isinstance(row[k], datetime) else row[k] for k in key)
            if ident in stored:
                matched[row["id"]] = stored[ident]
        _store(state, member, rows, matched)

    return importer


IMPORTERS: dict[str, Callable[[_Import, Member, list[dict[str, Any]]], None]] = {
    "sources": _import_sources,
    "structures": _import_structures,
    "pathways": _import_pathways,
    "features": _results_importer("pathway_id", "pathways"),
    "vacancy_sites": _import_vacancy_sites,
    "vacancies": _results_importer("site_id", "vacancy_sites", {"structure_id": "structures"}),
    "estimates": _results_importer(
        "pathway_id", "pathways", {"start_vacancy_id": "vacancies", "end_vacancy_id": "vacancies"}
    ),
    "neb": _results_importer(
        "pathway_id", "pathways", {"start_vacancy_id": "vacancies", "end_vacancy_id": "vacancies"}
    ),
    "barrier_models": _import_learning(("stage", "kind", "seed", "trained_at"), ("training_ids",)),
    "calibrations": _import_learning(("source", "reference", "fitted_at"), ("ids",)),
}


def _importer(member: Member) -> Callable[[_Import, Member, list[dict[str, Any]]], None]:
    return _import_runs if member.stage is not None else IMPORTERS[member.name]


def import_archive(path: Path | str, *, engine: Engine | None = None) -> ImportReport:
    """Import an archive into the database in one transaction (the archive is verified in full first).

    Rows are matched by content (sources by kind and key, structures by fingerprint then StructureMatcher, runs by
    their identity and cache key, result rows by parent and run or fingerprint); only unmatched rows are added, with
    new ids. Imported runs keep their provenance and name the archive (`runs.archive_id`, `runs.origin`).
    """
    engine = engine or get_engine()
    verified = verify_archive(path)
    _newest_revision(engine, "has")
    manifest = verified.manifest
    report = ImportReport(name=verified.path.name, sha256=verified.sha256, schema_revision=verified.revision)
    batch_rows = get_settings().archive_batch_rows
    with session_scope(engine, write=True) as session, zipfile.ZipFile(verified.path) as zf:
        archive = Archive(
            name=verified.path.name,
            sha256=verified.sha256,
            format_version=manifest["format_version"],
            schema_revision=verified.revision,
            hopflow_version=manifest.get("hopflow_version"),
            exported_at=_parse_time(manifest.get("exported_at")),
            imported_at=utcnow(),
            manifest={k: v for k, v in manifest.items()},
        )
        session.add(archive)
        session.flush()
        state = _Import(session=session, archive=verified, archive_id=archive.id, report=report)
        by_file = {m.file: m for m in MEMBERS}
        for member in MEMBERS:  # import order, whatever order the zip lists them in
            if member.file not in manifest["members"]:
                continue
            importer = _importer(by_file[member.file])
            for rows in _batches(zf, verified.path, member.file, batch_rows):
                _prepare(rows, member.table, verified.revision)
                importer(state, member, rows)
            if member.name == "structures":
                _link_sources(state)
        _link_reuse(state)
        if report.added == 0 and not any(c.adopted for c in report.tables.values()):
            session.delete(archive)  # nothing came in: the database stays as it was
        else:
            report.archive_id = archive.id
    return report


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _set_column(state: _Import, model: Any, column: str, values: list[tuple[int | None, Any]]) -> None:
    """Set one column of rows of `model`'s table by id, (id, value) pairs in one executemany."""
    if not values:
        return
    from sqlalchemy import bindparam

    table = model.__table__
    stmt = update(table).where(table.c.id == bindparam("row_id")).values({column: bindparam("new_value")})
    state.session.connection().execute(stmt, [{"row_id": row_id, "new_value": value} for row_id, value in values])


def _link_sources(state: _Import) -> None:
    """Sources added by this import point at their structures once those are in."""
    structures = state.map("structures")
    _set_column(state, Source, "structure_id", [
        (source_id, structures.local(structure_id))
        for source_id, structure_id in state.pending_sources
        if structures.local(structure_id) is not None
    ])
    state.pending_sources.clear()


def _link_reuse(state: _Import) -> None:
    """An added run that reused a cached result points at that result's run when the archive holds it too."""
    runs = state.map("runs")
    _set_column(state, Run, "reused_run_id", [
        (runs.local(run_id), runs.local(reused))
        for run_id, reused in state.pending_reuse
        if runs.local(reused) is not None and runs.ids.get(run_id, (0, False))[1]
    ])


def archive_line(session: Session, run: Run) -> dict[str, Any] | None:
    """The trace line of an imported run: the archive it came from (and the ones before)."""
    if run.archive_id is None:
        return None
    archive = session.get(Archive, run.archive_id)
    if archive is None:
        return None
    via = [v.get("archive") for v in (run.origin or {}).get("via", [])]
    return {
        "archive": archive.name,
        "sha256": archive.sha256[:16],
        "imported": archive.imported_at,
        "origin_run": (run.origin or {}).get("run_id"),
        "via": ", ".join(v for v in via if v) or None,
    }


__all__ = [
    "ArchiveError",
    "ExportReport",
    "ImportReport",
    "Selection",
    "archive_line",
    "export_closure",
    "import_archive",
    "verify_archive",
]
