"""Barrier stages end to end: estimates (CHGNet mlip-idpp, CPU) and neb (the VASP STAND-IN with FAKE POTCARs, NOT
VASP) through the queue in batch mode, recorded errors, provenance, the leaderboard."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from hopflow.cli.barriers import barrier_result
from hopflow.cli.main import app
from hopflow.db import init_db, session_scope
from hopflow.flows.batch import import_raw_inputs
from hopflow.leaderboard import pathway_leaderboard
from hopflow.models import Estimate, Features, NebResult, Pathway, Run, RunState, Structure
from hopflow.provenance import trace_chain
from hopflow.queue import param_hash
from hopflow.settings import get_settings
from hopflow.stages import PATHWAY_FIELDS, engine_parameters
from hopflow.tasks.structures import bundled_inputs

from tests.fake_vasp.fake_potcar import write_fake_psp_dir

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pymatgen rightly does not know the FAKE POTCARs

STANDIN = Path(__file__).parent / "fake_vasp" / "vasp_standin"
BARRIER = 0.37  # eV, the stand-in's analytic barrier


@pytest.fixture
def env(monkeypatch, tmp_path, small_cells) -> Path:
    """Small cells, local Dask workers for every stage, the VASP stand-in with FAKE POTCARs for Ca and F only."""
    psp = write_fake_psp_dir(tmp_path / "psp", ["Ca_sv", "F"])  # no Li: LiF's NEB must fail, recorded
    monkeypatch.setenv("HOPFLOW_VASP_CMD", str(STANDIN))
    monkeypatch.setenv("HOPFLOW_VASP_PSP_DIR", str(psp))
    monkeypatch.setenv("HOPFLOW_PROFILE_NEB", "local")  # not the SLURM node profile
    monkeypatch.setenv("HOPFLOW_FAKE_VASP_PYTHON", sys.executable)
    monkeypatch.setenv("HOPFLOW_FAKE_VASP_BARRIER", str(BARRIER))
    for name in ("ERROR", "INTERRUPT", "NEVER_CONVERGE", "LOG"):
        monkeypatch.delenv(f"HOPFLOW_FAKE_VASP_{name}", raising=False)
    get_settings.cache_clear()
    return psp


def _cli(*args: str, exit_code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == exit_code, result.output + repr(result.exception)
    return result.output


def _runs(stage: str) -> list[Run]:
    with session_scope() as session:
        rows = session.scalars(select(Run).where(Run.stage == stage).order_by(Run.id)).all()
        session.expunge_all()
        return list(rows)


def test_estimates_neb_leaderboard_end_to_end(env, tmp_path) -> None:
    init_db()
    outcomes = import_raw_inputs([r for r in bundled_inputs() if r.location in ("CaF2", "LiF")])
    assert all(o["state"] == "done" for o in outcomes), outcomes
    assert "2 done" in _cli("run", "pathways")
    assert "0 failed" in _cli("run", "features")
    with session_scope(write=True) as session:
        ids = {s.formula: s.id for s in session.scalars(select(Structure))}
        paths = {p.structure_id: p for p in session.scalars(select(Pathway).order_by(Pathway.rank))}
        caf2, lif = paths[ids["CaF2"]], paths[ids["LiF"]]
        # A pathway whose images cannot be built: LiF's hop filed under CaF2 (its sites are not F sites there),
        # shorter than any real one so that the shortest-first ranker puts it at the head of the queue.
        bad = Pathway(run_id=lif.run_id, structure_id=ids["CaF2"],
                      **{**{n: getattr(lif, n) for n in PATHWAY_FIELDS}, "length": 1.0})
        session.add(bad)
        session.flush()
        lif_features = session.scalars(select(Features).where(Features.pathway_id == lif.id)).one()
        values = {c.name: getattr(lif_features, c.name) for c in Features.__table__.columns
                  if c.name not in ("id", "created_at", "pathway_id")}
        session.add(Features(pathway_id=bad.id, **values))
        caf2_id, lif_id, bad_id = caf2.id, lif.id, bad.id
    assert caf2.length < lif.length  # the ranker's order below

    # Top 2 by the shortest-first ranker (the default is physics): the bad pathway fails with its reason, CaF2's
    # completes.
    assert "now active" in _cli("rank", "estimates", "--ranker", "shortest", "--activate")
    out = _cli("run", "estimates", "--engine", "mlip-idpp", "--top", "2", exit_code=1)  # an item failed
    assert "1 done" in out and "1 failed" in out, out
    runs = {r.input_id: r for r in _runs("estimates")}
    assert {i for i, r in runs.items() if r.state != RunState.QUEUED} == {bad_id, caf2_id}
    assert runs[lif_id].state == RunState.QUEUED
    assert runs[bad_id].state == RunState.FAILED and "is not a hop of this structure" in runs[bad_id].error
    assert runs[bad_id].max_attempts == runs[bad_id].attempts  # bad input: never retried
    assert runs[caf2_id].state == RunState.DONE
    expected = engine_parameters("mlip-idpp")
    assert {k: runs[caf2_id].parameters[k] for k in expected} == expected
    assert runs[caf2_id].parameters["nimages"] == 3 and runs[caf2_id].parameters["max_atoms"] == 30
    # The rest (LiF) in a second batch.
    assert "1 done" in _cli("run", "estimates")

    with session_scope() as session:
        rows = {e.pathway_id: e for e in session.scalars(select(Estimate))}
        assert set(rows) == {caf2_id, lif_id}
        for row in rows.values():
            assert row.engine == "mlip-idpp" and row.converged and row.n_images == 3
            assert row.barrier is not None and math.isfinite(row.barrier) and 0.0 < row.barrier < 2.0
            assert row.barrier == pytest.approx(max(row.relative_energies))
            assert len(row.energies) == 5 and row.relative_energies[0] == 0.0
            assert row.engine_version == expected["engine_version"] and "chgnet" in row.versions
            assert row.timings["run_s"] > 0 and row.settings["model"] == expected["engine_settings"]["model"]
        caf2_row = rows[caf2_id]
        # 2x2x2 primitive cells less one F
        assert len(caf2_row.energies) == 5 and caf2_row.energies[0] == pytest.approx(-6.1 * 23, abs=6.0)
        run = session.get(Run, caf2_row.run_id)
        workdir = get_settings().home / "work" / f"estimates-{caf2_id}-{param_hash(run.parameters)[:8]}"
        assert caf2_row.workdir == str(workdir) and workdir.is_dir()
        assert barrier_result(caf2_row).barrier == caf2_row.barrier
        chain = trace_chain(session, caf2_row.run_id)
    assert [link.get("stage") for link in chain[:3]] == ["estimates", "pathways", "import"]
    assert chain[-1]["kind"] == "bundled" and chain[-1]["location"] == "CaF2"
    assert json.loads(_cli("trace", str(caf2_row.run_id), "--json"))[-1]["location"] == "CaF2"

    # neb: with the cutoff raised above both trusted estimates (LiF's is ~1.2 eV in this small cell, above the default
    # 1.0), both are claimed; LiF has no (fake) Li POTCAR -> recorded, CaF2 goes on.
    with session_scope() as session:
        highest = max(e.barrier for e in session.scalars(select(Estimate)))
    _cli("cutoff", "neb", "max_estimate", str(max(2.0, highest + 0.5)))
    out = _cli("run", "neb", exit_code=1)  # LiF failed
    assert "1 done" in out and "1 failed" in out, out
    neb_runs = {r.input_id: r for r in _runs("neb")}
    assert neb_runs[caf2_id].state == RunState.DONE
    assert neb_runs[lif_id].state == RunState.FAILED and "no POTCAR for Li" in neb_runs[lif_id].error
    with session_scope() as session:
        neb_row = session.scalars(select(NebResult)).one()
        assert neb_row.pathway_id == caf2_id and neb_row.engine == "vasp-neb" and neb_row.converged
        # the stand-in's analytic path: Eb sin²(πs), its maximum at the middle image (s within 1% of 1/2 here)
        assert neb_row.barrier == pytest.approx(BARRIER, abs=5e-4) and neb_row.barrier <= BARRIER
        assert neb_row.vacancy_mode == "neutral" and neb_row.charge == 0
        assert neb_row.versions["vasp"].startswith("vasp.0.0.0-hopflow-standin")
        assert {c["job"] for c in neb_row.corrections} <= {"start", "end", "neb"}
        assert "vasp_cmd" not in session.get(Run, neb_row.run_id).parameters["engine_settings"]
        neb_chain = trace_chain(session, neb_row.run_id)
    assert [link.get("stage") for link in neb_chain[:3]] == ["neb", "pathways", "import"]

    # Leaderboard: the VASP barrier stands for CaF2, the estimate for LiF; lowest first.
    board = json.loads(_cli("leaderboard", "--json", "--plot", str(tmp_path / "board.png")))
    assert [b["pathway_id"] for b in board] == sorted(
        [caf2_id, lif_id], key=lambda p: {caf2_id: neb_row.barrier, lif_id: rows[lif_id].barrier}[p]
    )
    barriers = [b["barrier"] for b in board]
    assert barriers == sorted(barriers)
    by_path = {b["pathway_id"]: b for b in board}
    assert by_path[caf2_id]["engine"] == "vasp-neb" and by_path[caf2_id]["barrier"] == neb_row.barrier
    assert by_path[lif_id]["engine"] == "mlip-idpp" and by_path[lif_id]["formula"] == "LiF"
    assert by_path[caf2_id]["hop_length"] == pytest.approx(caf2.length)
    assert (tmp_path / "board.png").read_bytes()[:4] == b"\x89PNG"
    assert "leaderboard" in _cli("leaderboard")
    with session_scope() as session:
        assert [e.pathway_id for e in pathway_leaderboard(session)] == [b["pathway_id"] for b in board]


def test_run_command_refuses_unknown_parameters_and_engines() -> None:
    init_db()
    runner = CliRunner()
    result = runner.invoke(app, ["run", "estimates", "--ion", "Li"])
    assert result.exit_code != 0 and "has no parameter ion" in result.output
    result = runner.invoke(app, ["run", "estimates", "--engine", "nonsense"])
    assert result.exit_code != 0 and "unknown barrier engine" in result.output
    assert json.loads(runner.invoke(app, ["leaderboard", "--json"]).output) == []
