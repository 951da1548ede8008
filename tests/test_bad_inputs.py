"""Bad-input corpus: malformed and hostile inputs across import, pathways, features and engines each get their own
specific recorded error, the good items of the same batch complete, and nothing stored changes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from crystals import CAF2_A, caf2
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter
from sqlalchemy import select

from hopflow import queue
from hopflow.db import init_db, session_scope
from hopflow.errors import EngineError, InputError
from hopflow.flows.batch import import_raw_inputs
from hopflow.flows.features import features
from hopflow.flows.pathways import pathways
from hopflow.models import Features, Pathway, Run, RunState, Source
from hopflow.models import Structure as StructureRow
from hopflow.registry import get_stage
from hopflow.tasks.engines import compute_barrier, get_engine
from hopflow.tasks.features import featurize
from hopflow.tasks.pathways import find_pathways
from hopflow.tasks.structures import bundled_inputs, file_inputs

from tests.fake_vasp.fake_potcar import write_fake_psp_dir

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CORPUS = Path(__file__).parent / "data" / "bad_inputs"
STANDIN = Path(__file__).parent / "fake_vasp" / "vasp_standin"
GOOD = ("CaF2", "LiF")
HUGE_CELL = (10, 5, 5)  # rock-salt LiF conventional cell (8 atoms) x 250 = 2,000 atoms, over max_sites (500)

EXPECTED_IMPORT_ERRORS = {
    "empty.cif": "empty file",
    "whitespace_only.vasp": "empty file",
    "garbage.cif": "unreadable CIF (Invalid CIF file with no structures!)",
    "truncated.cif": "atoms do not match the CIF's formula, truncated file?",
    "latin1.cif": "not UTF-8 text (undecodable byte at offset",
    "two_structures.cif": "CIF holds 2 structures; give one per file",
    "partial_occupancy.cif": "disordered or partially occupied sites are not supported",
    "no_fluorine_NaCl.cif": "no F sites (migrating ion) in NaCl",
    "overlapping_atoms.vasp": "overlapping atoms (0.05 Å apart, minimum 0.5 Å)",
    "nan_coordinates.json": "site coordinates contain NaN or infinite values",
    "invalid_json.json": "invalid JSON (Expecting value at line 1)",
    "json_list.json": "JSON must be one object (a Structure or an MP document), got a list",
    "not_a_structure.json": "JSON is neither a pymatgen Structure nor a Materials Project document",
    "POSCAR_garbage": "unreadable POSCAR",
    "unknown_format.txt": "unknown format (expected CIF, POSCAR/CONTCAR/*.vasp, or JSON)",
    "does_not_exist.cif": "no such file, directory or matching glob pattern",
}
"""Fixture file name -> the specific reason its import must record."""


def _outcomes_by_name(outcomes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {Path(o["location"]).name: o for o in outcomes}


def _snapshot() -> dict[str, list[tuple[Any, ...]]]:
    """Every stored structure, pathway and features row, column by column."""
    tables = {"structures": StructureRow, "pathways": Pathway, "features": Features}
    out = {}
    with session_scope() as session:
        for name, model in tables.items():
            cols = [c.name for c in model.__table__.columns]
            rows = session.scalars(select(model).order_by(model.id)).all()
            out[name] = [tuple(json.dumps(getattr(r, c), sort_keys=True, default=str) for c in cols) for r in rows]
    return out


def _runs_failed_with(run_ids: list[int]) -> dict[int, tuple[str, str | None]]:
    with session_scope() as session:
        return {r.id: (r.state, r.error) for r in session.scalars(select(Run).where(Run.id.in_(run_ids)))}


def _generated_bad_files(tmp_path: Path) -> dict[str, str]:
    """Inputs made at test time (too big to keep as fixtures, or derived): file name -> expected reason."""
    lif = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.03), ["Li", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    huge = lif * HUGE_CELL
    assert len(huge) == 2000
    (tmp_path / "huge_2000_atoms.json").write_text(json.dumps(huge.as_dict()))
    flat = Structure(Lattice.cubic(CAF2_A), ["Ca", "F"], [[0, 0, 0], [0.25, 0.25, 0.25]]).as_dict()
    flat["lattice"]["matrix"][2] = [0.0, 0.0, float("nan")]
    (tmp_path / "nan_lattice.json").write_text(json.dumps(flat))
    hostile = "data_x\n_cell_length_a 'Robert'); DROP TABLE runs;--\n"
    (tmp_path / "hostile'; DROP TABLE runs; --.cif").write_text(hostile)
    return {
        "huge_2000_atoms.json": "2000 sites exceed the limit of 500",
        "nan_lattice.json": "NaN or infinite",
        "hostile'; DROP TABLE runs; --.cif": "_cell_length_a is \"Robert');\", not a number",
    }


def test_import_pathways_features_corpus(tmp_path) -> None:
    init_db()
    bad_paths = [CORPUS, CORPUS / "does_not_exist.cif"]
    raws = [*file_inputs(bad_paths), *(r for r in bundled_inputs() if r.location in GOOD)]
    outcomes = _outcomes_by_name(import_raw_inputs(raws))

    # good ones complete, including a charge-unbalanced CaF3 stored without oxidation states
    for name in (*GOOD, "CaF3_no_oxidation_states.cif"):
        assert outcomes[name]["state"] == RunState.DONE and outcomes[name]["structure_id"], outcomes[name]
    # every bad one has its own specific reason, recorded as an input error (never retried)
    for name, reason in EXPECTED_IMPORT_ERRORS.items():
        outcome = outcomes[name]
        assert outcome["state"] == RunState.FAILED, outcome
        assert reason in outcome["error"], (name, outcome["error"])
        assert name in outcome["error"]  # the message names the input
    with session_scope() as session:
        failed = session.scalars(select(Run).where(Run.stage == "import", Run.state == RunState.FAILED)).all()
        assert len(failed) == len(EXPECTED_IMPORT_ERRORS)
        assert all(r.attempts == r.max_attempts == 1 and r.history[-1]["kind"] == queue.ERROR_INPUT for r in failed)
        stored = {s.formula: s for s in session.scalars(select(StructureRow))}
        assert set(stored) == {"CaF2", "LiF", "CaF3"}
        assert stored["CaF3"].oxidation_method is None and stored["CaF3"].oxidation_states is None
    with session_scope(write=True) as session:
        assert queue.sweep(session, stage="import").requeued == []  # input errors are final

    # pathways: every structure has hops up to 4 Å
    report = pathways(parameters={"max_hop": 4.0})
    assert len(report.done) == 3 and not report.failed, report.summary

    # features refuse a structure without oxidation states, with the reason, and go on with the rest
    with session_scope(write=True) as session:
        caf3_paths = session.scalars(select(Pathway.id).where(Pathway.structure_id == stored["CaF3"].id)).all()
        claimed = queue.claim_ids(session, get_stage("features"), list(caf3_paths))
    assert claimed
    freport = features(run_ids=[c.id for c in claimed])
    assert not freport.done and len(freport.failed) == len(claimed)
    assert all("CaF3 has no oxidation states: assign them" in m for m in freport.failed.values()), freport.failed

    before = _snapshot()
    assert len(before["structures"]) == 3 and before["pathways"]

    # a second batch of bad inputs (plus a duplicate of a stored crystal) stores nothing new
    expected = _generated_bad_files(tmp_path)
    CifWriter(caf2()).write_file(tmp_path / "CaF2_again.cif")
    second = _outcomes_by_name(import_raw_inputs(file_inputs([tmp_path])))
    for name, reason in expected.items():
        assert second[name]["state"] == RunState.FAILED and reason in second[name]["error"], second[name]
    assert second["CaF2_again.cif"]["structure_id"] == stored["CaF2"].id and not second["CaF2_again.cif"]["new"]

    # pathways that cannot be found: no hop below the limit
    short = pathways(parameters={"max_hop": 1.0})
    assert not short.done and len(short.failed) == 3
    assert sorted(m.split(":")[0] for m in short.failed.values()) == ["CaF2", "CaF3", "LiF"]
    assert all("no F-F hop up to 1.000 Å" in m for m in short.failed.values()), short.failed

    assert _snapshot() == before
    with session_scope() as session:
        assert session.scalar(select(Source).where(Source.location.like("%DROP TABLE%"))) is not None
        assert session.scalars(select(Run.id)).first() is not None  # the runs table is still there


# ---------------------------------------------------------------- task level: pathways and features


def _caf2(oxidation: dict[str, float] | None) -> Structure:
    s = caf2()
    if oxidation is not None:
        s.add_oxidation_state_by_element(oxidation)
    return s


def test_pathways_refuse_bad_limits_missing_ions_and_disorder() -> None:
    with pytest.raises(InputError, match="^max hop length must be positive, got -2.0 Å$"):
        find_pathways(_caf2(None), ion="F", max_hop=-2.0, max_paths=2)
    with pytest.raises(InputError, match="^no Na sites in CaF2$"):
        find_pathways(_caf2(None), ion="Na", max_hop=4.0, max_paths=2)
    disordered = _caf2(None)
    disordered.replace_species({"Ca": {"Ca": 0.5, "Sr": 0.5}})
    with pytest.raises(InputError, match=r"is disordered \(partial occupancies\): hops need an ordered structure"):
        find_pathways(disordered, ion="F", max_hop=4.0, max_paths=2)


@pytest.mark.parametrize(("oxidation", "reason"), [
    (None, "CaF2 has no oxidation states: assign them"),
    ({"Ca": 0, "F": 0}, "CaF2: every oxidation state is 0"),
    ({"Ca": 2, "F": -2}, "CaF2: oxidation states sum to -8.000 per cell, not 0"),
    ({"Ca": 6, "F": -1}, "CaF2: oxidation states sum to +16.000 per cell, not 0"),
])
def test_features_refuse_missing_or_unphysical_oxidation_states(oxidation, reason) -> None:
    record = find_pathways(_caf2({"Ca": 2, "F": -1}), ion="F", max_hop=3.0, max_paths=1)[0]
    with pytest.raises(InputError) as info:
        featurize(_caf2(oxidation), record, nimages=3)
    assert reason in str(info.value)


def test_features_refuse_a_pathway_of_another_ion() -> None:
    record = find_pathways(_caf2({"Ca": 2, "F": -1}), ion="F", max_hop=3.0, max_paths=1)[0]
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    nacl.add_oxidation_state_by_element({"Na": 1, "Cl": -1})
    with pytest.raises(InputError, match="no F sites in NaCl"):
        featurize(nacl, record, nimages=3)


# ---------------------------------------------------------------- engines: the VASP stand-in (NOT VASP)


@pytest.fixture(scope="module")
def hop():
    from hopflow.tasks.images import hop_images

    structure = _caf2({"Ca": 2, "F": -1})
    record = find_pathways(structure, ion="F", max_hop=3.0, max_paths=1)[0]
    return hop_images(structure, record, nimages=3, min_length=7.0, min_atoms=1, max_atoms=200)


@pytest.fixture
def vasp(tmp_path, monkeypatch) -> dict[str, Any]:
    """Stand-in settings with FAKE POTCARs; the stand-in's failure modes are cleared."""
    monkeypatch.setenv("HOPFLOW_FAKE_VASP_PYTHON", sys.executable)
    for name in ("ERROR", "INTERRUPT", "NEVER_CONVERGE", "LOG"):
        monkeypatch.delenv(f"HOPFLOW_FAKE_VASP_{name}", raising=False)
    psp = write_fake_psp_dir(tmp_path / "psp", ["Ca_sv", "F"])
    return {"vasp_cmd": str(STANDIN), "psp_dir": str(psp), "polling_s": 0.05}


def test_vasp_run_that_never_converges_is_unconverged(hop, vasp, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOPFLOW_FAKE_VASP_NEVER_CONVERGE", "1")
    result = compute_barrier("vasp-neb", hop, tmp_path / "neb", {**vasp, "user_incar_settings": {"NSW": 3}})
    assert result.converged is False and result.barrier is None
    assert result.steps == 3 and max(f for f in result.max_forces if f is not None) == pytest.approx(0.5)


def test_custodian_errors_beyond_max_errors_are_a_clear_engine_error(hop, vasp, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOPFLOW_FAKE_VASP_ERROR", "rspher")  # repeats until LREAL = .FALSE.
    engine = get_engine("vasp-neb", {**vasp, "max_errors": 1, "endpoint_calculations": False})
    engine.prepare(hop, tmp_path / "neb")
    with pytest.raises(EngineError, match=r"VASP NEB in .* failed: neb: .*Max errors per job reached: 1"):
        engine.run(tmp_path / "neb")


def test_vasp_inputs_without_potcars_are_refused(hop, vasp, tmp_path) -> None:
    only_ca = write_fake_psp_dir(tmp_path / "only_ca", ["Ca_sv"])
    with pytest.raises(InputError, match="no POTCAR for F"):
        get_engine("vasp-neb", {**vasp, "psp_dir": str(only_ca)}).prepare(hop, tmp_path / "a")
    with pytest.raises(InputError, match=r"POTCAR directory .*nowhere does not exist"):
        get_engine("vasp-neb", {**vasp, "psp_dir": str(tmp_path / "nowhere")}).prepare(hop, tmp_path / "b")


def test_vasp_command_that_cannot_start_is_an_engine_error(hop, vasp, tmp_path) -> None:
    engine = get_engine("vasp-neb", {**vasp, "vasp_cmd": str(tmp_path / "no-vasp-here")})
    engine.prepare(hop, tmp_path / "neb")
    with pytest.raises(EngineError, match="VASP NEB in .* failed"):
        engine.run(tmp_path / "neb")
