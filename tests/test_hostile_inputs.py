"""Hostile inputs to `hopflow import` (issue 12): parameter sets, unbounded reads, special files, symbolic links,
rich markup in names, renamed files, wrong POSCAR counts, unknown elements, impossible lattices. Each is refused
with one line naming it, the batch goes on, the exit code says so, and stored rows stay as they were."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from functools import cache
from pathlib import Path

import pytest
from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter
from pymatgen.io.vasp import Poscar
from sqlalchemy import select
from typer.testing import CliRunner

from hopflow.cli.main import app
from hopflow.db import session_scope
from hopflow.errors import InputError
from hopflow.models import Run, RunState, Source
from hopflow.models import Structure as StructureRow
from hopflow.settings import get_settings
from hopflow.tasks.structures import bundled_inputs, file_inputs, parse_input

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

runner = CliRunner()


@cache
def bundled(name: str) -> Structure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parse_input(next(r for r in bundled_inputs() if r.location == name))


def cif(name: str) -> str:
    return str(CifWriter(bundled(name)))


def poscar(name: str) -> str:
    return Poscar(bundled(name)).get_str()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error ")]


def row_hashes() -> list[str]:
    """One hash per stored structure and source row (every column), in id order."""
    out = []
    with session_scope() as session:
        for model in (StructureRow, Source):
            cols = [c.name for c in model.__table__.columns]
            out += [hashlib.sha256(json.dumps([getattr(r, c) for c in cols], sort_keys=True, default=str).encode())
                    .hexdigest() for r in session.scalars(select(model).order_by(model.id))]
    return out


def refused(path: Path, **limits: float) -> str:
    """The reason file_inputs and parse_input give for one path (InputError naming it)."""
    (raw,) = file_inputs([path], **limits)
    with pytest.raises(InputError) as info:
        parse_input(raw, max_sites=get_settings().max_sites)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message.removeprefix(f"{path}: ")


# ---------------------------------------------------------------- reading: no parse, no Dask


def test_only_regular_files_within_the_limits_are_read(tmp_path) -> None:
    os.mkfifo(tmp_path / "x.cif")
    assert refused(tmp_path / "x.cif") == "not a regular file (a named pipe)"  # returns: nothing opened the FIFO
    assert refused(Path("/dev/zero")) == "not a regular file (a character device)"
    big = tmp_path / "big.cif"
    big.write_text(cif("CaF2") + "#" * 5000)
    assert refused(big, max_bytes=4096) == f"file is {big.stat().st_size} bytes, over the limit of 4096 " \
                                           "(HOPFLOW_MAX_INPUT_BYTES)"
    slow = tmp_path / "slow.cif"  # over one read chunk: the time limit is checked between chunks
    slow.write_text(cif("CaF2") + "#" * (3 << 20))
    assert refused(slow, read_seconds=1e-9) == "reading took over 1e-09 s (HOPFLOW_INPUT_READ_SECONDS)"
    assert parse_input(file_inputs([slow])[0]).composition.reduced_formula == "CaF2"  # within the default limits


def test_symbolic_link_loops_and_dangling_links_are_refused_each_by_path(tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "CaF2.cif").write_text(cif("CaF2"))
    os.symlink("loop_b", folder / "loop_a")
    os.symlink("loop_a", folder / "loop_b")
    os.symlink("nowhere.cif", folder / "dangling.cif")
    os.symlink(tmp_path, folder / "up")  # a linked folder: not followed (it would loop)
    os.symlink(folder / "CaF2.cif", folder / "link_to_CaF2.cif")  # the same file twice: read once
    reasons = {}
    for raw in file_inputs([folder, folder / "loop_a", tmp_path / "missing.cif"]):
        try:
            parse_input(raw)
            reasons[Path(raw.location).name] = "ok"
        except InputError as exc:
            reasons[Path(raw.location).name] = str(exc).split(": ", 1)[1]
    assert reasons == {
        "CaF2.cif": "ok",
        "dangling.cif": "dangling symbolic link (to nowhere.cif)",
        "loop_a": "symbolic link loop",
        "loop_b": "symbolic link loop",
        "up": "symbolic link to a directory (not followed inside a folder)",
        "missing.cif": "no such file, directory or matching glob pattern",
    }


# ---------------------------------------------------------------- parsing: no Dask

CAF2_POSCAR_COUNTS = "4 8"


def _mutate(name: str, text: str, old: str, new: str) -> tuple[str, str]:
    assert old in text, (name, old)
    return name, text.replace(old, new, 1)


@pytest.mark.parametrize(("name", "text", "reason"), [
    (*_mutate("POSCAR_few", poscar("CaF2"), CAF2_POSCAR_COUNTS, "4 4"),
     "count line says 8 atoms but 12 coordinate lines follow"),
    (*_mutate("POSCAR_many", poscar("CaF2"), CAF2_POSCAR_COUNTS, "4 9"),
     "count line says 13 atoms but 12 coordinate lines follow"),
    (*_mutate("POSCAR_billion", poscar("CaF2"), CAF2_POSCAR_COUNTS, "4 1000000000"),
     "count line says 1000000004 atoms, over the limit of 500 sites (HOPFLOW_MAX_SITES)"),
    (*_mutate("POSCAR_negative", poscar("CaF2"), CAF2_POSCAR_COUNTS, "4 -8"),
     "negative atom count in the count line '4 -8'"),
    (*_mutate("POSCAR_scale", poscar("CaF2"), "\n1.0\n", "\n1000000000\n"),
     "over 1000 Å, not a crystal"),
    (*_mutate("POSCAR_Xx", poscar("CaF2"), "\nCa F\n", "\nXx F\n"), "unknown element Xx"),
    (*_mutate("negative.cif", cif("CaF2"), "_cell_length_a   5.", "_cell_length_a   -5."),
     "_cell_length_a is -5.46310000, a lattice length must be positive"),
    (*_mutate("zero.cif", cif("CaF2"), "_cell_length_c   5.46310000", "_cell_length_c   0"),
     "_cell_length_c is 0, a lattice length must be positive"),
    (*_mutate("nan.cif", cif("CaF2"), "_cell_length_b   5.46310000", "_cell_length_b   nan"),
     "_cell_length_b is 'nan', not a number"),
    (*_mutate("flat.cif", cif("CaF2"), "_cell_angle_gamma   90.00000000", "_cell_angle_gamma   180"),
     "_cell_angle_gamma is 180, a cell angle must lie between 0 and 180 degrees"),
    (*_mutate("Xx.cif", cif("CaF2"), "  Ca  Ca0", "  Xx  Ca0"), "unknown element Xx"),
])
def test_structures_that_would_be_stored_wrong_are_refused(tmp_path, name, text, reason) -> None:
    (tmp_path / name).write_text(text)
    assert reason in refused(tmp_path / name)


def test_json_with_more_sites_than_allowed_is_refused_before_it_is_built(tmp_path) -> None:
    doc = bundled("CaF2").as_dict()
    doc["sites"] = doc["sites"] * 50  # 600 sites
    (tmp_path / "many.json").write_text(json.dumps(doc))
    assert refused(tmp_path / "many.json") == "600 sites exceed the limit of 500 (HOPFLOW_MAX_SITES)"


def test_identity_is_content_and_format(tmp_path) -> None:
    (tmp_path / "BaF2.txt").write_text(poscar("BaF2"))
    (tmp_path / "POSCAR_BaF2").write_text(poscar("BaF2"))
    as_text, as_poscar = file_inputs([tmp_path / "BaF2.txt", tmp_path / "POSCAR_BaF2"])
    assert as_text.key.split(":")[0] == as_poscar.key.split(":")[0]  # same bytes
    assert (as_text.key.split(":")[1], as_poscar.key.split(":")[1]) == ("unknown", "poscar")


# ---------------------------------------------------------------- the command line, end to end


@pytest.mark.slow
def test_hostile_folder_in_one_batch_then_renamed_files(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOPFLOW_MAX_INPUT_BYTES", "8192")
    get_settings.cache_clear()
    work = tmp_path / "work"
    (work / "q[").mkdir(parents=True)
    (work / "x[").mkdir()
    monkeypatch.chdir(work)  # relative names keep the table cells short enough to assert on
    (work / "q[" / "x]EuF2.cif").write_text(cif("CaF2"))  # a valid file whose name is markup: q[/x]EuF2.cif
    (work / "[bold]z.cif").write_text(cif("SrF2"))
    (work / "x[/red]y.cif").write_text("data_x\n_cell_length_a 1\n")  # a bad file whose error line is markup
    (work / "BaF2.txt").write_text(poscar("BaF2"))  # right content, no format from its name
    (work / "POSCAR_few").write_text(poscar("LiF").replace("4 4", "4 2", 1))
    (work / "POSCAR_billion").write_text(poscar("LiF").replace("4 4", "4 1000000000", 1))
    (work / "big.cif").write_text(cif("NaF") + "#" * 9000)
    os.mkfifo(work / "pipe.cif")
    os.symlink("/dev/zero", work / "zero.cif")
    os.symlink("loop_b", work / "loop_a")
    os.symlink("loop_a", work / "loop_b")
    os.symlink("gone.cif", work / "dangling.cif")
    expected = {
        "BaF2.txt": "unknown format",
        "POSCAR_few": "count line says 6 atoms but 8 coordinate lines follow",
        "POSCAR_billion": "count line says 1000000004 atoms, over the limit of 500 sites",
        "big.cif": "over the limit of 8192 (HOPFLOW_MAX_INPUT_BYTES)",
        "pipe.cif": "not a regular file (a named pipe)",
        "zero.cif": "not a regular file (a character device)",
        "loop_a": "symbolic link loop",
        "loop_b": "symbolic link loop",
        "dangling.cif": "dangling symbolic link (to gone.cif)",
        "x[/red]y.cif": "unreadable CIF",
    }

    code, out = invoke("import", ".", "loop_a")  # a loop named on the command line too
    assert code == 1, out
    errors = error_lines(out)
    assert len(errors) == len(expected), out
    for name, reason in expected.items():
        assert f"error {name}: " in "\n".join(errors) and reason in next(e for e in errors if f" {name}: " in e), \
            (name, errors)
    assert "12 inputs: 2 new structures, 0 already known or duplicates, 10 failed" in out
    with session_scope() as session:
        failed = session.scalars(select(Run).where(Run.stage == "import", Run.state == RunState.FAILED)).all()
        assert len(failed) == len(expected) and all(r.attempts == r.max_attempts == 1 for r in failed)

    # names with markup are shown as they are, and listing and tracing them works
    code, out = invoke("structures")
    assert code == 0 and "file:q[/x]EuF2.cif" in out and "file:[bold]z.cif" in out, out
    with session_scope() as session:
        run_id = session.scalar(select(Run.id).join(Source, Source.id == Run.input_id)
                                .where(Run.stage == "import", Source.location == "q[/x]EuF2.cif"))
    code, out = invoke("trace", str(run_id))
    assert code == 0 and "location=q[/x]EuF2.cif" in out, out
    before = row_hashes()

    # renamed: the text file as a POSCAR is a new input that imports; a failed file under a new name is named so
    os.rename("BaF2.txt", "POSCAR_BaF2")
    os.rename("POSCAR_few", "POSCAR_few_again")
    code, out = invoke("import", "POSCAR_BaF2", "POSCAR_few_again")
    assert code == 1, out
    assert error_lines(out) == ["error POSCAR_few_again: count line says 6 atoms but 8 coordinate lines follow"]
    assert "2 inputs: 1 new structures, 0 already known or duplicates, 1 failed" in out
    after = row_hashes()
    with session_scope() as session:
        assert session.scalar(select(StructureRow.formula).order_by(StructureRow.id.desc())) == "BaF2"
    assert set(before) <= set(after) and len(after) == len(before) + 2  # one structure, one source added


@pytest.mark.slow
def test_outcomes_are_those_of_this_commands_parameter_set(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("CaF2.cif").write_text(cif("CaF2"))
    Path("LiF.cif").write_text(cif("LiF"))
    Path("empty.cif").write_text("")

    code, out = invoke("import", "--ion", "Na", "CaF2.cif", "empty.cif")
    assert code == 1 and len(error_lines(out)) == 2 and "error CaF2.cif: no Na sites" in out, out
    code, out = invoke("import", "CaF2.cif", "LiF.cif", "empty.cif")  # the Na failure does not stick
    assert code == 1 and error_lines(out) == ["error empty.cif: empty file"], out
    assert "3 inputs: 2 new structures, 0 already known or duplicates, 1 failed" in out
    before = row_hashes()
    code, out = invoke("import", "--ion", "Li", "LiF.cif")
    assert code == 0 and "1 inputs: 0 new structures, 1 already known or duplicates, 0 failed" in out, out
    with session_scope() as session:  # an --ion value queues import runs for the files it names only
        li_runs = session.scalars(select(Source.location).join(Run, Run.input_id == Source.id)
                                  .where(Run.stage == "import", Run.parameters["ion"].as_string() == "Li")).all()
    assert li_runs == ["LiF.cif"], li_runs
    code, out = invoke("import", "empty.cif", "CaF2.cif")  # a bad file stays failed, whatever ran since
    assert code == 1 and error_lines(out) == ["error empty.cif: empty file"], out
    assert "2 inputs: 0 new structures, 1 already known or duplicates, 1 failed" in out
    assert row_hashes() == before


# ---------------------------------------------------------------- migration 0007: the format joins a file's identity


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migration_0007_adds_the_format_to_file_keys(backend, tmp_path, postgres_database) -> None:
    from alembic import command
    from sqlalchemy import text

    from hopflow.db import alembic_config, make_engine

    url = f"sqlite:///{tmp_path / 'old.sqlite'}" if backend == "sqlite" else postgres_database()
    engine = make_engine(url)
    try:
        config = alembic_config(engine)
        command.upgrade(config, "0006")
        rows = [("file", "a" * 64, "cif"), ("file", "b" * 64, None), ("bundled", "c" * 64, "bundled"),
                ("mp", "mp-1", "mp-json")]
        with engine.begin() as conn:
            for kind, key, fmt in rows:
                conn.execute(text("INSERT INTO sources (kind, key, location, format, payload) "
                                  "VALUES (:kind, :key, 'x', :fmt, '')"), {"kind": kind, "key": key, "fmt": fmt})

        def keys() -> list[str]:
            with engine.connect() as conn:
                return list(conn.scalars(text("SELECT key FROM sources ORDER BY id")))

        command.upgrade(config, "0007")
        assert keys() == ["a" * 64 + ":cif", "b" * 64 + ":unknown", "c" * 64, "mp-1"]
        command.downgrade(config, "0006")
        assert keys() == [key for _, key, _ in rows]
    finally:
        engine.dispose()
