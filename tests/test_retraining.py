"""The learning loop on a database: retrain stores models with provenance, the learning rankers order the barrier
queues live, a failed training keeps the previous model and scores, results are never changed, calibration shows in
the leaderboard, plots are written. The database holds synthetic but plausible rows (no CHGNet, no VASP)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from hopflow import queue
from hopflow.cli.main import app
from hopflow.db import init_db, session_scope
from hopflow.errors import InsufficientDataError
from hopflow.models import (
    BarrierModelRow,
    CalibrationRow,
    Estimate,
    Features,
    NebResult,
    Pathway,
    Run,
    Score,
    Structure,
)
from hopflow.registry import get_stage
from hopflow.retraining import (
    ESTIMATE_FEATURE,
    FEATURE_NAMES,
    latest_calibrations,
    latest_model,
    retrain,
    retrain_cycle,
    training_set,
)
from hopflow.surrogate import feature_matrix

N_PATHWAYS = 48
N_NEB = 12
"""Pathways with a VASP barrier (and an ML-potential estimate: the calibration pairs)."""
N_ESTIMATE_ONLY = 8
"""Pathways with only an ML-potential estimate."""
SOFTENING = 0.8
"""The ML potential's estimates are this fraction of the VASP barrier minus 0.02 eV (ML potentials soften)."""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def true_barrier(overlap: float, ewald: float, length: float) -> float:
    """A hidden smooth function of three features (eV), dominated by the cation overlap change."""
    z = 6.0 * (overlap - 0.25) - 0.8 * ewald + 0.5 * (length - 2.8) * ewald
    return 0.15 + 0.6 / (1.0 + math.exp(-z))


def _barrier_row(table: type, run_id: int, pathway_id: int, engine: str, barrier: float | None,
                 converged: bool = True, flag: str | None = None) -> Estimate | NebResult:
    """A result row; flagged `ok` when it carries a converged barrier, else `unconverged`, unless `flag` says."""
    flag = flag or ("ok" if converged and barrier is not None else "unconverged")
    return table(run_id=run_id, pathway_id=pathway_id, engine=engine, engine_version="test-1", barrier=barrier,
                 forward_barrier=barrier, reverse_barrier=barrier, flag=flag, converged=converged,
                 energies=[0.0, barrier or 0.0, 0.0], relative_energies=[0.0, barrier or 0.0, 0.0],
                 reaction_coordinate=[0.0, 0.5, 1.0], max_forces=[0.01, 0.01, 0.01], n_images=3, moving_index=0,
                 steps=10, vacancy_mode="neutral", charge=0, timings={}, settings={}, corrections=[],
                 continued=False, versions={}, workdir=None)


def build_database(seed: int = 1, n_neb: int = N_NEB, n_estimate_only: int = N_ESTIMATE_ONLY) -> dict[str, list[int]]:
    """Structures, pathways, features for every pathway; estimates and NEB barriers for some. Returns id groups."""
    rng = np.random.default_rng(seed)
    init_db()
    with session_scope(write=True) as session:
        fixture = Run(stage="fixture", input_id=0, param_hash="fixture", parameters={}, state="done")
        session.add(fixture)
        session.flush()
        structures = []
        for k in range(4):
            s = Structure(formula=f"A{k}F2", chemsys=f"A{k}-F", spacegroup="Fm-3m", spacegroup_number=225, nsites=3,
                          density=4.0 + k, volume=40.0 + k, oxidation_states={f"A{k}": 2, "F": -1},
                          oxidation_method="test", fingerprint=f"fp-{k}", structure={"sites": []}, run_id=fixture.id)
            session.add(s)
            structures.append(s)
        session.flush()
        pathway_ids, truth = [], {}
        for i in range(N_PATHWAYS):
            length = float(rng.uniform(2.4, 3.4))
            overlap = float(rng.uniform(0.0, 0.5))
            ewald = float(rng.normal(0.0, 1.0))
            p = Pathway(run_id=fixture.id, structure_id=structures[i % 4].id, ion="F", rank=i // 4, length=length,
                        start_index=0, end_index=1, end_image=[0, 0, 0], start_frac=[0, 0, 0], end_frac=[0.5, 0, 0],
                        start_cart=[0, 0, 0], end_cart=[length, 0, 0], start_label="F", end_label="F",
                        multiplicity=1.0, dimensionality=3, dimensionality_cumlengths=3, max_hop=4.0,
                        max_hop_automatic=True)
            session.add(p)
            session.flush()
            session.add(Features(
                run_id=fixture.id, pathway_id=p.id, ion="F", ion_oxidation_state=-1.0, oxidation_states={"F": -1},
                radii={"F": 1.33}, radii_description="Shannon", ion_fraction=float(rng.uniform(0.4, 0.7)),
                nsites=3, nsites_supercell=24, length=length, min_cation_anion_distance=float(rng.uniform(2.2, 2.6)),
                length_vs_dmin=None, dimensionality=3, dimensionality_cumlengths=3, nimages=3,
                overlap_cation_start=0.1, overlap_cation_midpoint=0.1 + overlap, overlap_cation_max=0.1 + overlap,
                overlap_cation_max_change=overlap, ewald_energy_start=-10.0, ewald_energy_midpoint=-10.0 + ewald,
                ewald_energy_max=-10.0 + max(ewald, 0.0), ewald_energy_change=ewald))
            pathway_ids.append(p.id)
            truth[p.id] = true_barrier(overlap, ewald, length)
        neb_ids = pathway_ids[:n_neb]
        estimate_only = pathway_ids[n_neb:n_neb + n_estimate_only]
        for pid in neb_ids:
            vasp = truth[pid] + float(rng.normal(0.0, 0.02))
            session.add(_barrier_row(NebResult, fixture.id, pid, "vasp-neb", vasp))
            session.add(_barrier_row(Estimate, fixture.id, pid, "mlip-idpp", SOFTENING * vasp - 0.02))
        for pid in estimate_only:
            session.add(_barrier_row(Estimate, fixture.id, pid, "mlip-idpp", SOFTENING * truth[pid] - 0.02))
        # an unconverged estimate, a path through a lower minimum and a legacy row that kept its (lowest) barrier are
        # no training barriers
        session.add(_barrier_row(Estimate, fixture.id, pathway_ids[-1], "mlip-idpp", None, converged=False))
        session.add(_barrier_row(Estimate, fixture.id, pathway_ids[-2], "mlip-idpp", None,
                                 flag="intermediate-minimum"))
        session.add(_barrier_row(Estimate, fixture.id, pathway_ids[-3], "mlip-idpp", 0.01, flag="unchecked"))
    return {"all": pathway_ids, "neb": neb_ids, "estimate_only": estimate_only}


def snapshot() -> dict[str, list[tuple]]:
    """Every column of every result row (pathways, features, estimates, neb), in id order."""
    out = {}
    with session_scope() as session:
        for model in (Pathway, Features, Estimate, NebResult):
            cols = list(model.__table__.columns)
            out[model.__tablename__] = [tuple(r) for r in session.execute(select(*cols).order_by(model.id))]
    return out


def scores(stage: str, ranker: str) -> dict[int, float]:
    with session_scope() as session:
        return dict(session.execute(select(Score.item_id, Score.score).where(Score.stage == stage,
                                                                              Score.ranker == ranker)).all())


def _enqueue(*stages: str) -> None:
    with session_scope(write=True) as session:
        for name in stages:
            queue.enqueue(session, get_stage(name))


def test_retrain_stores_models_with_provenance_ranks_live_and_changes_no_result(tmp_path) -> None:
    ids = build_database()
    _enqueue("estimates", "neb")
    queued = set(ids["all"])
    # No model yet: the model rankers fall back to `diverse` (documented in hopflow.retraining.model_ranker_scores).
    assert set(scores("estimates", "predicted")) == queued
    assert scores("estimates", "predicted") == scores("estimates", "diverse")
    before = snapshot()
    with session_scope(write=True) as session:  # a ranker chosen by hand survives a retrain; the default does not
        assert queue.set_active_ranker(session, get_stage("estimates"), "shortest", reason="test")
        assert queue.active_ranker(session, get_stage("neb")) == "estimate"

    report = retrain_cycle(seed=3, plot_dir=tmp_path / "plots")
    with session_scope() as session:
        assert queue.active_ranker(session, get_stage("estimates")) == "shortest"
        assert queue.active_ranker(session, get_stage("neb")) == "predicted"  # a model exists: learned ranking

    assert snapshot() == before  # training reads results, never writes them
    by_stage = {s.stage: s for s in report.stages}
    assert all(s.error is None and s.plot_error is None for s in report.stages), report.summary
    training = sorted(ids["neb"] + ids["estimate_only"])
    with session_scope() as session:
        rows = {r.stage: r for r in session.scalars(select(BarrierModelRow))}
        assert set(rows) == {"estimates", "neb"}
        for stage, row in rows.items():
            assert row.training_ids == training == row.meta["ids"]
            assert row.n_train == len(training) and row.seed == 3 and row.kind == "extra-trees"
            assert 0 < row.cv_mae < 0.3 and row.cv_mae == pytest.approx(by_stage[stage].cv_mae)
            assert row.params["n_estimators"] > 1 and row.meta["sklearn_version"]
            assert len(row.meta["cv_mean"]) == len(training)
        # the estimates queue's items have no estimate yet: that model is trained without one; the neb model with
        assert ESTIMATE_FEATURE not in rows["estimates"].feature_names
        assert rows["neb"].feature_names[-1] == ESTIMATE_FEATURE
        assert "length_vs_dmin" not in rows["estimates"].feature_names  # missing for every pathway: dropped
        # targets: VASP where present, else the best trusted estimate
        data = training_set(session, "neb")
        neb = dict(session.execute(select(NebResult.pathway_id, NebResult.barrier)).all())
        assert all(y == neb[i] for i, y in zip(data.ids, data.y, strict=True) if i in neb)
        stored = latest_model(session, "estimates")
        assert stored is not None and stored.id == rows["estimates"].id
    for outcome in report.stages:
        for path in (outcome.parity_png, outcome.curve_png):
            assert path is not None and path.parent == tmp_path / "plots" and path.read_bytes()[:8] == PNG_MAGIC
        assert outcome.curve and outcome.curve[-1][0] > outcome.curve[0][0]

    # The predicted ranker's scores are the stored model's predictions for the queued pathways.
    predicted = scores("estimates", "predicted")
    with session_scope() as session:
        feats = {f.pathway_id: {n: getattr(f, n) for n in FEATURE_NAMES} for f in session.scalars(select(Features))}
        model = latest_model(session, "estimates").model
        order = sorted(predicted)
        expected = model.predict(feature_matrix([feats[i] for i in order], model.feature_names)).mean
    assert np.allclose([predicted[i] for i in order], expected)
    assert scores("estimates", "predicted") != scores("estimates", "diverse")

    # Switching the stage's ranker is live: the queue head becomes the lowest predicted barriers, and claims follow.
    stage = get_stage("estimates")
    with session_scope() as session:
        head_before = [item for _, item, _ in queue.queue_head(session, stage, n=5)]
    with session_scope(write=True) as session:
        assert queue.set_active_ranker(session, stage, "predicted", reason="test")
    lowest = sorted(predicted, key=lambda i: (predicted[i], i))
    with session_scope() as session:
        head = queue.queue_head(session, stage, n=len(predicted))
    assert [item for _, item, _ in head] == lowest
    assert [item for _, item, _ in head[:5]] != head_before
    claimed = queue.claim("estimates", 3)
    assert {c.input_id for c in claimed} == set(lowest[:3])  # RETURNING's row order is not the claim order


def test_too_little_data_raises_and_a_failed_retrain_keeps_the_previous_model_and_scores(tmp_path) -> None:
    ids = build_database(n_neb=4, n_estimate_only=2)
    _enqueue("estimates")
    with session_scope(write=True) as session, pytest.raises(InsufficientDataError, match="too few"):
        retrain(session, seed=0, stage="estimates")
    report = retrain_cycle(seed=0, plot_dir=tmp_path)
    assert all(s.error and "InsufficientDataError" in s.error and s.model_id is None for s in report.stages)
    assert "previous model and scores kept" in report.summary
    with session_scope() as session:
        assert session.scalars(select(BarrierModelRow)).first() is None
        assert latest_model(session, "estimates") is None
    assert scores("estimates", "predicted") == scores("estimates", "diverse")  # the fallback stays in force

    # Enough barriers (the cross-validation's folds need 10 each): a model. Then a broken NEB result (infinite barrier)
    # makes the next training fail.
    with session_scope(write=True) as session:
        run_id = session.scalar(select(Run.id).where(Run.stage == "fixture"))
        for pid in ids["all"][6:16]:
            session.add(_barrier_row(Estimate, run_id, pid, "mlip-idpp", 0.2 + 0.05 * (pid % 7)))
    first = retrain_cycle(seed=0, plot_dir=tmp_path)
    assert all(s.error is None for s in first.stages), first.summary
    kept = {name: scores("estimates", name) for name in ("predicted", "uncertain", "mixed", "diverse")}
    with session_scope(write=True) as session:
        session.add(_barrier_row(NebResult, run_id, ids["all"][20], "vasp-neb", math.inf))
    before = snapshot()
    second = retrain_cycle(seed=1, plot_dir=tmp_path)
    assert all(s.error and "not finite" in s.error for s in second.stages), second.summary
    assert snapshot() == before
    with session_scope() as session:
        assert session.scalar(select(BarrierModelRow.id).order_by(BarrierModelRow.id.desc()).limit(1)) == \
            latest_model(session, "neb").id
        assert latest_model(session, "estimates").id == first.stages[0].model_id
        assert len(session.scalars(select(BarrierModelRow)).all()) == 2
    assert {name: scores("estimates", name) for name in kept} == kept


def test_calibration_from_pairs_shows_in_the_leaderboard_as_calibrated(tmp_path, monkeypatch) -> None:
    ids = build_database()
    runner = CliRunner()
    out = runner.invoke(app, ["retrain", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert len(result["calibrations"]) == 1 and "mlip-idpp -> vasp-neb" in result["calibrations"][0]
    with session_scope() as session:
        (cal,) = latest_calibrations(session).values()
        pairs = session.execute(select(Estimate.barrier, NebResult.barrier)
                                .join(NebResult, NebResult.pathway_id == Estimate.pathway_id)).all()
        plots = [s["parity_png"] for s in result["stages"]] + [s["curve_png"] for s in result["stages"]]
        assert session.scalar(select(CalibrationRow.n)) == len(pairs) == N_NEB
    slope, intercept = np.polyfit([p[0] for p in pairs], [p[1] for p in pairs], 1)
    assert cal.slope == pytest.approx(slope) and cal.intercept == pytest.approx(intercept)
    assert cal.slope == pytest.approx(1 / SOFTENING, rel=0.1)  # undoes the softening
    assert cal.rmse < cal.rmse_before and sorted(cal.ids) == sorted(ids["neb"])
    assert all(p and str(p).endswith(".png") for p in plots)

    out = runner.invoke(app, ["leaderboard", "--json"])
    assert out.exit_code == 0, out.output
    board = {e["pathway_id"]: e for e in json.loads(out.stdout)}
    for pid in ids["estimate_only"]:
        entry = board[pid]
        assert entry["engine"] == "mlip-idpp" and entry["calibration"].startswith("calibrated mlip-idpp -> vasp-neb")
        assert entry["calibrated_barrier"] == pytest.approx(cal.slope * entry["barrier"] + cal.intercept)
    for pid in ids["neb"]:
        assert board[pid]["engine"] == "vasp-neb" and board[pid]["calibrated_barrier"] is None
        assert board[pid]["calibration"] is None
    table = runner.invoke(app, ["leaderboard"], env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "calibrated_barrier" in table.output
    assert "calibrated mlip-idpp -> vasp-neb" in table.output


def test_fewer_than_five_pairs_fit_no_calibration(tmp_path) -> None:
    build_database(n_neb=4, n_estimate_only=10)
    report = retrain_cycle(seed=0, plot_dir=tmp_path, stages=())
    assert report.calibrations == () and "too few" in report.calibration_skipped["mlip-idpp"]
    with session_scope() as session:
        assert latest_calibrations(session) == {}
