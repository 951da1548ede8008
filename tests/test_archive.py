"""Export and import of a provenance closure (issue 16): a real SQLite database of CaF2 and LiF (import, pathways and
features stages in batch mode; a relaxed vacancy and an estimate per pathway stored through the queue) goes SQLite →
PostgreSQL → SQLite with identical traces; imports twice or overlapping add only new rows; damaged, truncated and
newer archives are refused with the database unchanged; an older archive is upgraded; imported results are not
computed again."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from crystals import SMALL_CELLS
from sqlalchemy import Engine, func, inspect, select, table
from typer.testing import CliRunner

from hopflow import queue
from hopflow.archive import Selection, export_closure, import_archive, schema_head
from hopflow.cli.main import app
from hopflow.db import get_engine, init_db, make_engine, session_scope
from hopflow.errors import ArchiveCorruptError, ArchiveSchemaError
from hopflow.flows.batch import import_raw_inputs, run_batch
from hopflow.models import Estimate, Pathway, Run, RunState, Source, Structure, Vacancy
from hopflow.registry import get_stage
from hopflow.settings import get_settings
from hopflow.stages import VACANCY_COLUMNS, engine_parameters, lattice_parameters
from hopflow.tasks.engines.base import BarrierResult, checked_fields
from hopflow.tasks.structures import bundled_inputs
from hopflow.vacancies import SiteRow, ensure_sites

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COUNTED = ("sources", "structures", "runs", "pathways", "features", "vacancy_sites", "vacancies", "estimates", "neb")
"""The source, stage and run tables whose rows an import must not duplicate."""
PROFILE = [0.0, 0.2, 0.4, 0.2, 0.0]
E0 = -67.0


def _counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {name: conn.scalar(select(func.count()).select_from(table(name))) for name in COUNTED}


def _barrier(energy_shift: float) -> BarrierResult:
    energies = [E0 + e + energy_shift * i / 4 for i, e in enumerate(PROFILE)]
    return BarrierResult(
        engine="mlip-idpp", engine_version=engine_parameters("mlip-idpp")["engine_version"],
        energies=tuple(energies), relative_energies=tuple(e - energies[0] for e in energies),
        reaction_coordinate=tuple(0.7 * i for i in range(len(energies))), converged=True,
        max_forces=(0.01,) * len(energies), n_images=len(energies) - 2, moving_index=3,
        model=get_settings().barrier_model, **checked_fields(energies, True, get_settings().intermediate_minimum_tol))


def _relaxed(structure: dict[str, Any], energy: float) -> SimpleNamespace:
    """A relaxed vacancy's fields (synthetic numbers on the real schema)."""
    values = {"model": get_settings().barrier_model, "energy": energy, "max_force": 0.03, "converged": True,
              "steps": 12, "structure": structure, "bulk_structure": structure, "bulk_energy": energy - 4.0,
              "bulk_converged": True, "max_displacement": 0.2, "fill_distance": 2.1, "flag": "ok",
              "flag_reason": None, "settings": {"fmax": 0.05}, "versions": {"chgnet": "0.4.2"}, "relax_s": 1.5}
    assert set(values) == set(VACANCY_COLUMNS)
    return SimpleNamespace(**values)


def _complete(stage_name: str, input_id: int, result: Any) -> int:
    stage = get_stage(stage_name)
    with session_scope(write=True) as session:
        (claimed,) = queue.claim_ids(session, stage, [input_id])
        (run,) = queue.start(session, [claimed.id], flow_run_id=f"flow-{stage_name}-{input_id}")
        queue.set_cache_key(session, run, queue.fingerprints(session, stage, [input_id])[input_id])
        assert queue.complete(session, claimed.id, result)
        return claimed.id


def _add_vacancies_and_estimates() -> None:
    """Per structure one vacancy site relaxed through the vacancies stage; per pathway an estimate between it."""
    from hopflow.flows.estimates import PathwayBarrier

    with session_scope(write=True) as session:
        structures = session.execute(select(Structure.id, Structure.structure)).all()
        rows = [SiteRow(sid, "[[1,0,0],[0,1,0],[0,0,1]]", 0, "F 8c", 8, 12, (0.25, 0.25, 0.25))
                for sid, _ in structures]
        sites = ensure_sites(session, rows, {sid: lattice_parameters(s) for sid, s in structures})
    for (sid, structure), row in zip(structures, rows, strict=True):
        _complete("vacancies", sites[(sid, row.supercell, row.site_index)], _relaxed(structure, -60.0 - sid))
    with session_scope() as session:
        vacancy_of = dict(session.execute(select(Vacancy.structure_id, Vacancy.id)).all())
        pathways = session.execute(select(Pathway.id, Pathway.structure_id).order_by(Pathway.id)).all()
    for pid, sid in pathways:
        vid = vacancy_of[sid]
        _complete("estimates", pid, PathwayBarrier(_barrier(0.01 * pid), vid, vid))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Iterator[Path]:
    """CaF2 and LiF through import, pathways and features (batch mode), then vacancies and estimates: built once."""
    home = tmp_path_factory.mktemp("archive")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOPFLOW_HOME", str(home / "home"))
        mp.delenv("HOPFLOW_DATABASE_URL", raising=False)
        for key, value in SMALL_CELLS.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        get_engine.cache_clear()
        init_db()
        outcomes = import_raw_inputs([r for r in bundled_inputs() if r.location in ("CaF2", "LiF")])
        assert [o["state"] for o in outcomes] == ["done", "done"], outcomes
        assert len(run_batch("pathways").done) == 2
        assert len(run_batch("features").done) >= 2
        _add_vacancies_and_estimates()
        # the same hops again under another parameter set: equal fingerprints, their own run and rows
        assert len(run_batch("pathways", {"max_paths": 1}).done) == 2
        database = get_settings().home / "hopflow.sqlite"
        get_engine().dispose()
        get_engine.cache_clear()
        get_settings.cache_clear()
    yield database


@pytest.fixture
def source_db(built, tmp_path, monkeypatch) -> Engine:
    """This test's copy of the built database, as the process-wide one."""
    copy = tmp_path / "source.sqlite"
    shutil.copy(built, copy)
    for key, value in SMALL_CELLS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOPFLOW_DATABASE_URL", f"sqlite:///{copy}")
    get_settings.cache_clear()
    get_engine.cache_clear()
    yield get_engine()
    get_engine().dispose()
    get_engine.cache_clear()


def _sqlite(path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{path}")
    init_db(engine)
    return engine


def _result_runs(engine: Engine) -> list[int]:
    """Every run that made a result row (the traces to compare), in a content order that ids do not decide."""
    with session_scope(engine) as session:
        return [r.id for r in session.scalars(select(Run).where(Run.state == RunState.DONE)
                                              .order_by(Run.stage, Run.cache_key))]


ID_KEYS = ("run", "source", "reused_run", "origin_run")


def _without_ids(link: dict[str, Any]) -> dict[str, Any]:
    out = {k: ("ID" if k in ID_KEYS and v is not None else v) for k, v in link.items()}
    if isinstance(out.get("input"), str):
        out["input"] = re.sub(r"#\d+$", "#ID", out["input"])
    return out


def _traces(url: str) -> list[list[dict[str, Any]]]:
    """`hopflow trace --json` of every result (the command itself, on the database at `url`), ids taken out."""
    out = []
    engine = make_engine(url)
    run_ids = _result_runs(engine)
    engine.dispose()
    for run_id in run_ids:
        get_settings.cache_clear()
        get_engine.cache_clear()
        result = CliRunner().invoke(app, ["trace", str(run_id), "--json"], env={"HOPFLOW_DATABASE_URL": url})
        assert result.exit_code == 0, result.output
        out.append([_without_ids(link) for link in json.loads(result.output)])
    get_settings.cache_clear()
    get_engine.cache_clear()
    return out


def test_round_trip_sqlite_postgres_sqlite_keeps_every_trace(source_db, tmp_path, postgres_database) -> None:
    first, second = tmp_path / "first.hopflow.zip", tmp_path / "second.hopflow.zip"
    report = export_closure(Selection(all=True), first, engine=source_db)
    assert report.rows["runs.estimates"] == report.rows["estimates"] >= 2 and report.rows["vacancies"] == 2
    assert report.rows["runs.pathways"] == 4 and report.rows["pathways"] == report.rows["features"] + 2
    postgres = make_engine(postgres_database())
    try:
        init_db(postgres)
        imported = import_archive(first, engine=postgres)
        assert imported.added == sum(report.rows.values())
        assert _counts(postgres) == _counts(source_db)
        export_closure(Selection(all=True), second, engine=postgres)
    finally:
        postgres.dispose()
    back = _sqlite(tmp_path / "back.sqlite")
    import_archive(second, engine=back)
    assert _counts(back) == _counts(source_db)
    before, after = _traces(source_db.url.render_as_string(False)), _traces(back.url.render_as_string(False))
    assert len(before) == len(after) == _counts(source_db)["runs"]
    for old, new in zip(before, after, strict=True):
        assert new[:-1] == old  # identical but for the ids ...
        assert (new[-1]["archive"], new[-1]["via"]) == ("second.hopflow.zip", "first.hopflow.zip")  # ... and one line
        assert new[-1]["sha256"] == hashlib.sha256(second.read_bytes()).hexdigest()[:16]
    with session_scope(back) as session:  # the original provenance is kept: flow runs, hosts, times, versions
        runs = session.scalars(select(Run).where(Run.stage == "estimates")).all()
        assert all(r.flow_run_id.startswith("flow-estimates-") and r.host and r.versions and r.archive_id
                   for r in runs)


def test_importing_twice_or_overlapping_adds_only_new_rows(source_db, tmp_path) -> None:
    caf2, both = tmp_path / "caf2.zip", tmp_path / "both.zip"
    export_closure(Selection(formulas=("CaF2",)), caf2, engine=source_db)
    export_closure(Selection(structure_ids=(1, 2)), both, engine=source_db)
    target = _sqlite(tmp_path / "target.sqlite")
    import_archive(caf2, engine=target)
    once = _counts(target)
    with session_scope(target) as session:
        assert session.scalars(select(Structure.formula)).all() == ["CaF2"]
    again = import_archive(caf2, engine=target)
    assert again.added == 0 and again.archive_id is None and _counts(target) == once
    overlap = import_archive(both, engine=target)
    full = _counts(source_db)
    assert _counts(target) == full  # only LiF's rows were added ...
    assert overlap.added == sum(full.values()) - sum(once.values())
    assert overlap.tables["structures"].matched == 1 and overlap.tables["structures"].added == 1
    assert import_archive(both, engine=target).added == 0 and _counts(target) == full


def _rewrite(archive: Path, dest: Path, change: Any) -> Path:
    """A copy of an archive with its manifest changed by `change` (checksums of the members kept valid)."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(dest, "w") as out:
        manifest = json.loads(src.read("manifest.json"))
        change(manifest)
        out.writestr("manifest.json", json.dumps(manifest))
        for name in src.namelist():
            if name != "manifest.json":
                out.writestr(name, src.read(name), compress_type=zipfile.ZIP_STORED)
    return dest


def test_damaged_truncated_or_newer_archives_are_refused(source_db, tmp_path) -> None:
    good, lif = tmp_path / "good.zip", tmp_path / "lif.zip"
    export_closure(Selection(all=True), good, engine=source_db)
    export_closure(Selection(formulas=("LiF",)), lif, engine=source_db)
    target = _sqlite(tmp_path / "target.sqlite")
    import_archive(lif, engine=target)  # a database with rows of its own, which the refused imports leave alone
    empty = _counts(target)
    assert empty["runs"] > 0
    data = good.read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ArchiveCorruptError, match="truncated.zip is truncated or not a hopflow archive"):
        import_archive(truncated, engine=target)
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("estimates.parquet")
    flipped = bytearray(data)
    flipped[info.header_offset + 30 + len(info.filename) + info.file_size // 2] ^= 0x40
    (tmp_path / "flipped.zip").write_bytes(bytes(flipped))
    with pytest.raises(ArchiveCorruptError, match=r"member estimates.parquet (is damaged \(Bad CRC-32|fails its SHA)"):
        import_archive(tmp_path / "flipped.zip", engine=target)
    newer = _rewrite(good, tmp_path / "newer.zip", lambda m: m.update(schema_revision="0099"))
    newer_than_head = f"schema revision 0099 is newer than this hopflow's \\({schema_head()}"
    with pytest.raises(ArchiveSchemaError, match=newer_than_head):
        import_archive(newer, engine=target)
    assert _counts(target) == empty
    with session_scope(target) as session:
        assert session.scalar(select(func.count()).select_from(table("archives"))) == 1  # LiF's import only
    result = CliRunner().invoke(app, ["import-archive", str(truncated)])
    assert result.exit_code == 1 and "import refused" in result.output and "truncated" in result.output


def test_an_archive_of_an_older_revision_is_upgraded_on_import(source_db, tmp_path) -> None:
    """An archive written at revision 0004: estimates without the flags of 0005, pathways without fingerprints, runs
    without the archive columns of 0006. Its rows get what those migrations give stored rows."""
    good = tmp_path / "good.zip"
    export_closure(Selection(all=True), good, engine=source_db)
    old = tmp_path / "old.zip"
    drop = {"estimates.parquet": {"flag", "flag_reason", "forward_barrier", "reverse_barrier", "model",
                                  "start_vacancy_id", "end_vacancy_id"},
            "pathways.parquet": {"fingerprint", "hops_found"}}
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(old, "w") as out:
        manifest = json.loads(src.read("manifest.json"))
        manifest["schema_revision"] = "0004"
        for name in src.namelist():
            if name == "manifest.json" or name.startswith("vacanc") or name == "runs.vacancies.parquet":
                manifest["members"].pop(name, None)
                continue
            data = pq.read_table(pa.BufferReader(src.read(name)))
            data = data.drop_columns(sorted(drop.get(name, set()) | ({"origin"} if name.startswith("runs.") else
                                                                       set())))
            sink = pa.BufferOutputStream()
            pq.write_table(data, sink)
            blob = sink.getvalue().to_pybytes()
            manifest["members"][name].update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
            out.writestr(name, blob, compress_type=zipfile.ZIP_STORED)
        out.writestr("manifest.json", json.dumps(manifest))
    target = _sqlite(tmp_path / "target.sqlite")
    report = import_archive(old, engine=target)
    assert report.schema_revision == "0004" and report.tables["estimates"].added >= 2
    with session_scope(target) as session, session_scope(source_db) as before:
        estimates = session.scalars(select(Estimate)).all()
        assert {e.flag for e in estimates} == {"unchecked"}
        assert all(e.flag_reason == "stored before the path checks of migration 0005" for e in estimates)
        assert {p.fingerprint for p in session.scalars(select(Pathway))} == {
            p.fingerprint for p in before.scalars(select(Pathway))}  # recomputed as migration 0005 does
    assert "hops_found" in {c["name"] for c in inspect(target).get_columns("pathways")}


def test_imported_results_are_not_computed_again(source_db, tmp_path, monkeypatch) -> None:
    """Into a database holding the structures, pathways and features (from a features-level archive) with their
    estimates queued: the full archive completes those queued runs, and `hopflow run estimates` computes nothing."""
    features, full = tmp_path / "features.zip", tmp_path / "full.zip"
    export_closure(Selection(all=True, stage="features"), features, engine=source_db)
    export_closure(Selection(all=True), full, engine=source_db)
    target_path = tmp_path / "target.sqlite"
    target = _sqlite(target_path)
    import_archive(features, engine=target)
    monkeypatch.setenv("HOPFLOW_DATABASE_URL", f"sqlite:///{target_path}")
    get_settings.cache_clear()
    get_engine.cache_clear()
    with session_scope(write=True) as session:
        queued = queue.enqueue(session, get_stage("estimates"))
    assert queued == _counts(source_db)["estimates"]
    report = import_archive(full, engine=get_engine())
    assert report.tables["runs"].adopted == queued
    assert _counts(get_engine()) == _counts(source_db)
    done = run_batch("estimates")
    assert (done.done, done.failed) == ([], {})  # nothing left to estimate here
    assert _counts(get_engine()) == _counts(source_db)
    with session_scope() as session:
        runs = session.scalars(select(Run).where(Run.stage == "estimates")).all()
        assert {r.state for r in runs} == {"done"} and all(r.archive_id for r in runs)
        assert all(r.cache_key for r in runs)
        # the cache: a fresh request of an imported pathway under the same parameters hits the imported run
        stage = get_stage("estimates")
        prints = queue.fingerprints(session, stage, [r.input_id for r in runs])
        probe = Run(stage="estimates", input_id=runs[0].input_id, param_hash=runs[0].param_hash, parameters={})
        assert queue.set_cache_key(session, probe, prints[runs[0].input_id]).id == runs[0].id


def test_cli_export_and_import(source_db, tmp_path) -> None:
    archive = tmp_path / "cli.zip"
    result = CliRunner().invoke(app, ["export", str(archive), "--formula", "LiF"])
    assert result.exit_code == 0, result.output
    assert "exported" in result.output and archive.is_file()
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["schema_revision"] == schema_head() and manifest["members"]["structures.parquet"]["rows"] == 1
    target = tmp_path / "cli-target.sqlite"
    _sqlite(target).dispose()
    env = {"HOPFLOW_DATABASE_URL": f"sqlite:///{target}"}
    get_settings.cache_clear()
    get_engine.cache_clear()
    result = CliRunner().invoke(app, ["import-archive", str(archive)], env=env)
    assert result.exit_code == 0, result.output
    assert "imported cli.zip" in result.output
    with session_scope(make_engine(f"sqlite:///{target}")) as session:
        assert session.scalars(select(Source.location)).all() == ["LiF"]
    refused = CliRunner().invoke(app, ["export", str(tmp_path / "none.zip")])
    assert refused.exit_code == 1 and "nothing selected" in refused.output


@pytest.mark.parametrize(("change", "added"), [("translated", 0), ("sheared", 1)])
def test_structures_are_matched_by_structure_matcher_not_by_fingerprint(source_db, tmp_path, change, added) -> None:
    """A stored CaF2 with the archive's fingerprint but other stored coordinates: the same crystal shifted by a
    translation is matched (StructureMatcher), a sheared one with the same fingerprint is a new structure."""
    from pymatgen.core import Lattice
    from pymatgen.core import Structure as PmgStructure
    from sqlalchemy import update

    archive = tmp_path / "caf2.zip"
    export_closure(Selection(formulas=("CaF2",)), archive, engine=source_db)
    target = _sqlite(tmp_path / "target.sqlite")
    import_archive(archive, engine=target)
    with session_scope(target, write=True) as session:
        sid, data = session.execute(select(Structure.id, Structure.structure)).one()
        crystal = PmgStructure.from_dict(data)
        if change == "translated":
            crystal.translate_sites(list(range(len(crystal))), [0.1, 0.05, 0.0])
        else:  # sheared 15° (StructureMatcher's angle tolerance is 5°)
            a, b, c = crystal.lattice.abc
            crystal = PmgStructure(Lattice.from_parameters(a, b, c, 75, 90, 90), crystal.species,
                                   crystal.frac_coords)
        session.execute(update(Structure.__table__).where(Structure.id == sid)
                        .values(structure=crystal.as_dict()))
    report = import_archive(archive, engine=target)
    assert report.tables["structures"].added == added and report.tables["structures"].matched == 1 - added
    assert report.tables["sources"].matched == 1 and report.tables["sources"].added == 0


def test_an_import_that_meets_live_work_is_refused_whole(source_db, tmp_path) -> None:
    """A claimed run here with the identity of an archived one: the import stops there and rolls back everything it
    had written in its transaction (sources, structures, pathways ... of the same archive)."""
    from hopflow.errors import ArchiveConflictError

    features, full = tmp_path / "features.zip", tmp_path / "full.zip"
    export_closure(Selection(formulas=("CaF2",), stage="features"), features, engine=source_db)
    export_closure(Selection(all=True), full, engine=source_db)
    target = _sqlite(tmp_path / "target.sqlite")
    import_archive(features, engine=target)
    stage = get_stage("estimates")
    with session_scope(target, write=True) as session:
        queue.enqueue(session, stage)
        pathway = session.scalars(select(Pathway.id).order_by(Pathway.id)).first()
        (claimed,) = queue.claim_ids(session, stage, [pathway])
    before = _counts(target)
    with pytest.raises(ArchiveConflictError, match=f"run {claimed.id} \\(estimates of pathways #{pathway}\\) is "
                                                   "claimed here"):
        import_archive(full, engine=target)
    assert _counts(target) == before  # LiF's rows, written before the clash, are gone with the transaction
    with session_scope(target) as session:
        assert session.get(Run, claimed.id).state == RunState.CLAIMED
        assert session.scalar(select(func.count()).select_from(table("archives"))) == 1
