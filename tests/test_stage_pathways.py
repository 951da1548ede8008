"""Pathways and features stages end to end: import, batch-mode flows, stored rows, errors, provenance, commands."""

from __future__ import annotations

import json
import math

import pytest
from crystals import lattice_a
from pymatgen.io.cif import CifParser
from sqlalchemy import select
from typer.testing import CliRunner

from hopflow import queue
from hopflow.cli.main import app
from hopflow.db import init_db, session_scope
from hopflow.flows.batch import import_raw_inputs
from hopflow.flows.features import features
from hopflow.flows.pathways import pathways
from hopflow.models import Features, Pathway, Run, RunState, Structure
from hopflow.provenance import trace_chain
from hopflow.registry import get_stage
from hopflow.stages import FEATURE_COLUMNS
from hopflow.tasks.structures import bundled_inputs

CRYSTALS = ("CaF2", "LiF", "MgF2")
FLUORITE_A = lattice_a("CaF2")  # the bundled crystal the stage imports
"""Å: the bundled fluorite's lattice parameter; F hops a/2 and a/√2."""


def _import(names: tuple[str, ...] = CRYSTALS) -> dict[str, int]:
    init_db()
    outcomes = import_raw_inputs([r for r in bundled_inputs() if r.location in names])
    assert all(o["state"] == "done" for o in outcomes), outcomes
    with session_scope() as session:
        return {s.formula: s.id for s in session.scalars(select(Structure))}


def _pathway_rows(structure_id: int, ion: str) -> list[Pathway]:
    with session_scope() as session:
        rows = session.scalars(select(Pathway).where(Pathway.structure_id == structure_id, Pathway.ion == ion)
                               .order_by(Pathway.rank)).all()
        session.expunge_all()
        return list(rows)


def test_pathways_and_features_stages_end_to_end(tmp_path) -> None:
    ids = _import()
    report = pathways(parameters={"max_hop": 4.0})
    assert sorted(report.done) and not report.failed, report.summary
    assert len(report.done) == 3

    caf2 = _pathway_rows(ids["CaF2"], "F")
    assert [round(p.length, 3) for p in caf2] == [round(FLUORITE_A / 2, 3), round(FLUORITE_A / math.sqrt(2), 3)]
    assert [p.rank for p in caf2] == [0, 1]
    assert all(p.max_hop == 4.0 and not p.max_hop_automatic for p in caf2)
    assert caf2[0].dimensionality_cumlengths == 3
    assert len(caf2[0].start_frac) == 3 and len(caf2[0].end_image) == 3
    lif = _pathway_rows(ids["LiF"], "F")
    assert lif[0].length == pytest.approx(2.848, abs=0.01)

    # Li as the migrating ion: the fluorides without Li fail with a recorded reason, LiF goes on.
    li_report = pathways(parameters={"ion": "Li", "max_hop": 4.0})
    assert len(li_report.done) == 1 and len(li_report.failed) == 2, li_report.summary
    with session_scope() as session:
        failed = session.scalars(select(Run).where(Run.id.in_(list(li_report.failed)))).all()
        assert {r.input_id for r in failed} == {ids["CaF2"], ids["MgF2"]}
        assert all(r.state == RunState.FAILED and "no Li sites" in (r.error or "") for r in failed)
    assert _pathway_rows(ids["LiF"], "Li")[0].length == pytest.approx(2.848, abs=0.01)

    # Features for CaF2's F pathways only (claimed by id, as the controller would).
    with session_scope(write=True) as session:
        claimed = queue.claim_ids(session, get_stage("features"), [p.id for p in caf2])
    assert len(claimed) == 2
    freport = features(run_ids=[c.id for c in claimed])
    assert sorted(freport.done) == sorted(c.id for c in claimed), freport.summary
    with session_scope() as session:
        rows = session.scalars(select(Features).order_by(Features.pathway_id)).all()
        assert [f.pathway_id for f in rows] == [p.id for p in caf2]
        first = rows[0]
        assert first.length == pytest.approx(FLUORITE_A / 2, abs=1e-3)
        assert first.ion_fraction == pytest.approx(2 / 3)
        assert first.oxidation_states == {"Ca2+": 2.0, "F-": -1.0}
        floats = {name: getattr(first, name) for name in FEATURE_COLUMNS if isinstance(getattr(first, name), float)}
        assert {"length", "ion_fraction", "overlap_cation_max", "min_cation_anion_distance"} <= set(floats)
        assert [name for name, value in floats.items() if not math.isfinite(value)] == []
        assert first.overlap_cation_max_change is not None and first.overlap_cation_max_change > 0
        features_run = first.run_id
        chain = trace_chain(session, features_run)
    assert [link.get("stage") for link in chain[:3]] == ["features", "pathways", "import"]
    assert chain[-1]["kind"] == "bundled" and chain[-1]["location"] == "CaF2"

    runner = CliRunner()
    result = runner.invoke(app, ["trace", str(features_run), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[-1]["location"] == "CaF2"

    result = runner.invoke(app, ["pathways", str(ids["CaF2"]), "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [p["length"] for p in listed] == pytest.approx([p.length for p in caf2])
    assert {p["formula"] for p in listed} == {"CaF2"}
    assert runner.invoke(app, ["pathways"]).exit_code == 0

    result = runner.invoke(app, ["features", "--json"])
    assert result.exit_code == 0, result.output
    assert [f["pathway_id"] for f in json.loads(result.output)] == [p.id for p in caf2]
    assert runner.invoke(app, ["features"]).exit_code == 0

    cif = tmp_path / "path.cif"
    result = runner.invoke(app, ["show-path", str(caf2[0].id), "--cif", str(cif), "--nimages", "3"])
    assert result.exit_code == 0, result.output
    images = CifParser(str(cif)).parse_structures(primitive=False)
    assert len(images) == 5
    assert len({len(s) for s in images}) == 1
    moved = max(s_end.distance(s_start) for s_start, s_end in zip(images[0], images[-1], strict=True))
    assert moved == pytest.approx(FLUORITE_A / 2, abs=0.05)

    assert runner.invoke(app, ["show-path", "99999", "--cif", str(cif)]).exit_code != 0


def test_run_pathways_command_and_cache(tmp_path) -> None:
    ids = _import(("CaF2", "MgF2"))
    runner = CliRunner()
    result = runner.invoke(app, ["run", "pathways"])
    assert result.exit_code == 0, result.output
    assert "2 done" in result.output
    # Automatic limit: rutile MgF2 has 2 distinct hops.
    mgf2 = _pathway_rows(ids["MgF2"], "F")
    assert len(mgf2) == 2 and all(p.max_hop_automatic for p in mgf2)
    # Nothing left to do the second time.
    result = runner.invoke(app, ["run", "pathways"])
    assert result.exit_code == 0 and "0 done" in result.output, result.output

    # A cache hit (same crystal fingerprint and parameters) copies the pathways onto the new input's structure.
    stage = get_stage("pathways")
    with session_scope(write=True) as session:
        original = session.get(Structure, ids["MgF2"])
        copy = Structure(**{c.name: getattr(original, c.name) for c in Structure.__table__.columns
                            if c.name not in ("id", "created_at")})
        session.add(copy)
        session.flush()
        copy_id = copy.id
        claimed = queue.claim_ids(session, stage, [copy_id])
    report = pathways(run_ids=[c.id for c in claimed])
    assert report.reused == [claimed[0].id], report.summary
    copied = _pathway_rows(copy_id, "F")
    assert [(p.rank, p.length, p.start_label) for p in copied] == [(p.rank, p.length, p.start_label) for p in mgf2]
