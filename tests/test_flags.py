"""Flagged results reach no consumer (issue 17, point 3): on a real SQLite database of CaF2's hops (pathways and
features stages in batch mode), estimates stored through the queue — one path with an interior minimum, one clean
hop, one legacy row as migration 0005 leaves it — and a VASP NEB of the clean hop. Only the clean hop reaches the
leaderboards, the neb stage's inputs, the learning loop and the calibrations."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from crystals import SMALL_CELLS
from sqlalchemy import select, update

from hopflow import queue
from hopflow.db import get_engine, init_db, session_scope
from hopflow.flows.batch import import_raw_inputs, run_batch
from hopflow.leaderboard import material_leaderboard, pathway_leaderboard
from hopflow.models import CalibrationRow, Estimate, NebResult, Pathway, Run
from hopflow.models.barriers import UNCHECKED_FLAG
from hopflow.registry import get_stage
from hopflow.retraining import best_estimates, calibration_pairs, estimates_by_engine, fit_calibrations, training_set
from hopflow.settings import get_settings
from hopflow.stages import engine_parameters
from hopflow.tasks.engines.base import BarrierResult, check_profile, checked_fields
from hopflow.tasks.structures import bundled_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MAX_HOP = 4.8
"""Å: CaF2's four distinct F-F hops up to a√3/2 (a/2, a/√2 and two of a√3/2); an explicit max_hop, so the network
is not cut off."""
E0 = -67.0
"""eV: about the total energy of an 11-atom CaF2 vacancy supercell."""
MINIMUM = [0.0, 0.30, -0.10, 0.30, 0.0]
"""Relative profile with an interior image 0.1 eV below both endpoints: read as `max - start` (the old meaning) it is
a 0.30 eV barrier, lower than the clean hop's, so any consumer that let it through would rank it first."""
CLEAN = [0.0, 0.25, 0.45, 0.25, 0.05]
CLEAN_BARRIER = 0.45
LEGACY = [0.0, 0.10, 0.20, 0.10, 0.0]
LEGACY_BARRIER = 0.20
"""The lowest barrier of all: a legacy row that kept it must still never be ranked or learnt from."""
NEB_BARRIER = 0.50
MIGRATION_0005_REASON = "stored before the path checks of migration 0005"


def _result(engine: str, relative: list[float], *, model: str | None) -> BarrierResult:
    """A result as an engine parses it: absolute energies, classified by `check_profile`."""
    energies = [E0 + e for e in relative]
    return BarrierResult(
        engine=engine, engine_version=engine_parameters(engine)["engine_version"], energies=tuple(energies),
        relative_energies=tuple(e - energies[0] for e in energies),
        reaction_coordinate=tuple(0.7 * i for i in range(len(energies))), converged=True,
        max_forces=(0.01,) * len(energies), n_images=len(energies) - 2, moving_index=10, model=model,
        **checked_fields(energies, True, get_settings().intermediate_minimum_tol))


def _store(stage_name: str, pathway_id: int, result: BarrierResult) -> int:
    """Claim the pathway's run of the stage through the queue, start it and complete it with the result."""
    stage = get_stage(stage_name)
    with session_scope(write=True) as session:
        (claimed,) = queue.claim_ids(session, stage, [pathway_id])
        assert queue.start(session, [claimed.id])
        assert queue.complete(session, claimed.id, result)
        return claimed.id


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The database, built once: CaF2's four hops, featurized; estimates of the three shortest (interior minimum,
    clean, legacy) and the clean hop's VASP NEB. Each test works on its own copy."""
    home = tmp_path_factory.mktemp("flags")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOPFLOW_HOME", str(home / "home"))
        mp.delenv("HOPFLOW_DATABASE_URL", raising=False)
        for key, value in {**SMALL_CELLS, "HOPFLOW_MAX_HOP": str(MAX_HOP)}.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        get_engine.cache_clear()
        init_db()
        outcomes = import_raw_inputs([r for r in bundled_inputs() if r.location == "CaF2"])
        assert [o["state"] for o in outcomes] == ["done"], outcomes
        assert len(run_batch("pathways").done) == 1
        with session_scope() as session:
            pathways = session.scalars(select(Pathway).order_by(Pathway.rank)).all()
            assert [p.rank for p in pathways] == [0, 1, 2, 3] and not any(p.max_hop_automatic for p in pathways)
            minimum, clean, legacy, unestimated = (p.id for p in pathways)
        assert len(run_batch("features").done) == 4

        model = get_settings().barrier_model
        _store("estimates", minimum, _result("mlip-idpp", MINIMUM, model=model))
        _store("estimates", clean, _result("mlip-idpp", CLEAN, model=model))
        _store("estimates", legacy, _result("mlip-idpp", LEGACY, model=model))
        with session_scope(write=True) as session:  # what migration 0005 did to every row stored before it
            session.execute(update(Estimate.__table__).where(Estimate.pathway_id == legacy)
                            .values(flag=UNCHECKED_FLAG, flag_reason=MIGRATION_0005_REASON,
                                    forward_barrier=None, reverse_barrier=None))
        neb = _store("neb", clean, _result("vasp-neb", [0.0, 0.3, NEB_BARRIER, 0.3, 0.0], model=None))
        database = get_settings().home / "hopflow.sqlite"
        assert get_settings().url == f"sqlite:///{database}"
        get_engine().dispose()
        get_engine.cache_clear()
        get_settings.cache_clear()
    yield {"database": database, "minimum": minimum, "clean": clean, "legacy": legacy, "unestimated": unestimated,
           "neb_run": neb}


@pytest.fixture
def db(built, tmp_path, monkeypatch) -> dict[str, Any]:
    """This test's copy of the built database, as the process-wide one."""
    copy = tmp_path / "flags.sqlite"
    shutil.copy(built["database"], copy)
    for key, value in SMALL_CELLS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOPFLOW_MAX_HOP", str(MAX_HOP))
    monkeypatch.setenv("HOPFLOW_DATABASE_URL", f"sqlite:///{copy}")
    get_settings.cache_clear()
    get_engine.cache_clear()
    yield built
    get_engine().dispose()
    get_engine.cache_clear()


def test_interior_minimum_is_classified_and_stored_without_a_barrier(db) -> None:
    energies = [E0 + e for e in MINIMUM]
    check = check_profile(energies, True, get_settings().intermediate_minimum_tol)
    assert get_settings().intermediate_minimum_tol == 0.02
    assert (check.flag, check.barrier, check.forward_barrier, check.reverse_barrier) == (
        "intermediate-minimum", None, None, None)
    assert check.reason is not None and "image 2 lies 0.100 eV below the lower endpoint" in check.reason
    with session_scope() as session:
        rows = {e.pathway_id: e for e in session.scalars(select(Estimate))}
        runs = {r.input_id: r for r in session.scalars(select(Run).where(Run.stage == "estimates"))}
    assert set(rows) == {db["minimum"], db["clean"], db["legacy"]}
    assert {i: r.state for i, r in runs.items()} == {db["minimum"]: "done", db["clean"]: "done",
                                                     db["legacy"]: "done", db["unestimated"]: "queued"}
    assert all(runs[i].id == row.run_id for i, row in rows.items())
    flagged, clean, legacy = rows[db["minimum"]], rows[db["clean"]], rows[db["legacy"]]
    assert (flagged.flag, flagged.flag_reason, flagged.barrier, flagged.forward_barrier,
            flagged.reverse_barrier) == ("intermediate-minimum", check.reason, None, None, None)
    assert flagged.energies == pytest.approx(energies)  # the energies are kept, only the barrier is withheld
    assert flagged.model == get_settings().barrier_model
    assert (clean.flag, clean.flag_reason) == ("ok", None)
    assert (clean.barrier, clean.forward_barrier, clean.reverse_barrier) == pytest.approx(
        (CLEAN_BARRIER, CLEAN_BARRIER, CLEAN_BARRIER - 0.05))
    assert (legacy.flag, legacy.flag_reason, legacy.barrier) == (
        UNCHECKED_FLAG, MIGRATION_0005_REASON, pytest.approx(LEGACY_BARRIER))


def test_pathway_leaderboard_ranks_only_the_clean_hop(db) -> None:
    with session_scope() as session:
        entries = pathway_leaderboard(session)
    assert [e.pathway_id for e in entries][0] == db["clean"]
    by_id = {e.pathway_id: e for e in entries}
    assert (by_id[db["clean"]].barrier, by_id[db["clean"]].engine) == (pytest.approx(NEB_BARRIER), "vasp-neb")
    assert [(by_id[i].barrier, by_id[i].flag) for i in (db["minimum"], db["legacy"])] == [
        (None, "intermediate-minimum"), (None, UNCHECKED_FLAG)]


def test_material_leaderboard_counts_flagged_hops_as_unknown(db) -> None:
    with session_scope() as session:
        (caf2,) = material_leaderboard(session)
    assert (caf2.formula, caf2.hops_total, caf2.hops_known, caf2.cut_off) == ("CaF2", 4, 1, None)
    assert caf2.status_3d == "incomplete" and caf2.lower_3d == 0.0  # the unknown hops may be as low as 0
    assert caf2.upper_3d == pytest.approx(NEB_BARRIER) and caf2.pathways_3d == (db["clean"],)


def test_neb_stage_takes_only_the_clean_hop(db) -> None:
    neb, other = get_stage("neb"), {"nimages": 7}  # a fresh parameter set: nothing of it queued or done yet
    with session_scope(write=True) as session:
        assert [row.item_id for row in session.execute(neb.inputs())] == [db["clean"]]
        assert queue.enqueue(session, neb, other) == 1
        head = queue.queue_head(session, neb, parameters=other)
        assert [(input_id, score) for _, input_id, score in head] == [(db["clean"], pytest.approx(CLEAN_BARRIER))]
        assert queue.claim_ids(session, neb, [db["minimum"], db["legacy"]], parameters=other) == []
        queued = session.scalars(select(Run.input_id).where(Run.stage == "neb")).all()
    assert queued == [db["clean"], db["clean"]]  # the done run of the default parameters and the new one


def test_best_estimates_hold_only_the_clean_hop(db) -> None:
    with session_scope() as session:
        assert best_estimates(session) == {db["clean"]: pytest.approx(CLEAN_BARRIER)}
        assert best_estimates(session, [db["minimum"], db["legacy"]]) == {}


def test_estimates_by_engine_hold_only_the_clean_hop(db) -> None:
    with session_scope() as session:
        assert estimates_by_engine(session) == {"mlip-idpp": {db["clean"]: pytest.approx(CLEAN_BARRIER)}}


def test_training_set_learns_only_from_the_clean_hop(db) -> None:
    with session_scope() as session:
        for stage in ("neb", "estimates"):
            data = training_set(session, stage)
            assert data.ids == [db["clean"]] and data.y.tolist() == pytest.approx([NEB_BARRIER]), stage
        assert "estimate" in training_set(session, "neb").feature_names  # the clean hop's estimate as a feature


def test_calibrations_pair_only_the_clean_hop(db) -> None:
    with session_scope(write=True) as session:
        # VASP barriers of the flagged and the legacy hop too (run by hand: the neb stage never offers them), so that
        # only the flags keep their estimates out of the calibration pairs
        for pathway_id in (db["minimum"], db["legacy"]):
            run = Run(stage="neb", input_id=pathway_id, param_hash=f"by-hand-{pathway_id}", parameters={},
                      state="done")
            session.add(run)
            session.flush()
            values = _result("vasp-neb", [0.0, 0.3, 0.6, 0.3, 0.0], model=None).model_dump(mode="json")
            session.add(NebResult(run_id=run.id, pathway_id=pathway_id,
                                  **{k: v for k, v in values.items() if k in NebResult.__table__.columns}))
        session.flush()
        assert calibration_pairs(session) == {
            "mlip-idpp": ([db["clean"]], [pytest.approx(CLEAN_BARRIER)], [pytest.approx(NEB_BARRIER)])}
        rows, skipped = fit_calibrations(session)
        assert rows == [] and session.scalars(select(CalibrationRow)).all() == []
        assert skipped == {"mlip-idpp": "1 pairs of mlip-idpp and vasp-neb barriers are too few to calibrate "
                                        "(need 5)"}
