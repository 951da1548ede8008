"""The controller tick against the real Prefect server: targets kept, lost work swept, failed submissions released,
settings mirrored to Prefect Variables and read back, manual submission through the queue, artifacts published."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from barrier_rows import add_results, barrier_row, store_pathways
from prefect.client.schemas.actions import VariableUpdate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from prefect.states import Crashed, Running
from sqlalchemy import select, update

from hopflow import queue
from hopflow.db import session_scope, utcnow
from hopflow.flows import artifacts, mirror, submission
from hopflow.flows import controller as ctl
from hopflow.models import Estimate, Run, RunState, StageSetting
from hopflow.registry import Cutoff, get_stage
from hopflow.tasks.pathways import find_pathways

from prefect_helpers import (
    add_synthetic_items,
    create_deployment,
    delete_deployment,
    deployment_flow_runs,
)

pytestmark = pytest.mark.prefect
SYNTHETIC = "synthetic"
BATCH = 20  # the synthetic stage's batch size


@pytest.fixture
def deployment(prefect_client):
    name, deployment_id = create_deployment(prefect_client)
    yield name, deployment_id
    delete_deployment(prefect_client, deployment_id)


@pytest.fixture
def cut_stage(register_stage):
    """A copy of the synthetic stage with a broadenable cutoff on the item priority (registered for one test)."""
    return register_stage(
        "synthetic-cut",
        cutoffs=(Cutoff("max_priority", "items with priority at most this", default=10.0,
                        criterion=lambda c, v: c.priority <= v, broaden_step=10.0, broaden_limit=40.0,
                        minimum=None),))  # priorities may be negative


def _tick(client, engine, deployment_name: str, stage: str = SYNTHETIC, **kwargs) -> ctl.StageTick:
    report = ctl.tick(client, engine=engine, stages=[stage], deployments={stage: deployment_name},
                      mirror=False, publish=False, **kwargs)
    (stage_tick,) = report.stages
    return stage_tick


def _set_target(engine, n: int, stage: str = SYNTHETIC) -> None:
    with session_scope(engine, write=True) as session:
        queue.set_target(session, get_stage(stage), n)


def _runs(engine, stage: str = SYNTHETIC) -> list[Run]:
    with session_scope(engine) as session:
        return list(session.scalars(select(Run).where(Run.stage == stage).order_by(Run.id)))


def test_tick_keeps_the_target_of_live_flow_runs(engine, prefect_client, deployment):
    name, deployment_id = deployment
    items = add_synthetic_items(engine, 100)
    _set_target(engine, 3)

    first = _tick(prefect_client, engine, name)
    assert (first.live, len(first.submitted), first.claimed, first.error) == (0, 3, 3 * BATCH, None)
    claimed = [r for r in _runs(engine) if r.state == RunState.CLAIMED]
    assert sorted(r.input_id for r in claimed) == items[:3 * BATCH]  # the best-ranked items (lowest priority)
    flow_runs = deployment_flow_runs(prefect_client, deployment_id)
    assert sorted(str(f.id) for f in flow_runs) == sorted(first.submitted)
    for flow_run in flow_runs:
        ids = flow_run.parameters["run_ids"]
        assert len(ids) == BATCH
        assert {r.flow_run_id for r in claimed if r.id in ids} == {str(flow_run.id)}
    assert len({f.idempotency_key for f in flow_runs}) == 3

    second = _tick(prefect_client, engine, name)
    assert (second.live, second.submitted, second.claimed) == (3, (), 0)

    _set_target(engine, 5)
    third = _tick(prefect_client, engine, name)
    assert (third.live, len(third.submitted), third.claimed) == (3, 2, 2 * BATCH)

    _set_target(engine, 6)  # one run missing but every item is claimed: nothing to submit, no error
    fourth = _tick(prefect_client, engine, name)
    assert (fourth.live, fourth.submitted, fourth.error) == (5, (), None)

    _set_target(engine, 1)
    assert _tick(prefect_client, engine, name).submitted == ()
    assert len(deployment_flow_runs(prefect_client, deployment_id)) == 5


def test_tick_requeues_work_of_crashed_flow_runs_and_expired_leases(engine, prefect_client, deployment):
    name, _ = deployment
    add_synthetic_items(engine, 50)
    _set_target(engine, 2)
    crashed, survivor = _tick(prefect_client, engine, name).submitted
    prefect_client.set_flow_run_state(crashed, Crashed(message="worker lost"), force=True)
    # a running flow run renews its own leases (a waiting one has them renewed by the tick): this one stopped
    prefect_client.set_flow_run_state(survivor, Running(), force=True)
    expired_id = next(r.id for r in _runs(engine) if r.flow_run_id == survivor)
    with session_scope(engine, write=True) as session:
        expired = utcnow() - timedelta(minutes=1)
        session.execute(update(Run).where(Run.id == expired_id).values(lease_expires_at=expired))
    crashed_ids = {r.id for r in _runs(engine) if r.flow_run_id == crashed}

    report = ctl.tick(prefect_client, engine=engine, stages=[SYNTHETIC], deployments={SYNTHETIC: name},
                      mirror=False, publish=False)

    assert report.lost_flow_runs == {crashed: "Crashed"}
    assert set(report.requeued) == crashed_ids | {expired_id}
    # the tick accounts for its time by part (mirror is off here)
    assert set(report.phases) == {"sweep-api", "sweep-db", "lookup", "claim", "submit"}
    assert 0 < sum(report.phases.values()) <= report.seconds
    (stage_tick,) = report.stages
    assert (stage_tick.live, len(stage_tick.submitted)) == (1, 1)
    (replacement,) = stage_tick.submitted
    runs = {r.id: r for r in _runs(engine)}
    for run_id in crashed_ids:  # a lost run spends its attempt (HOPFLOW_ISOLATE_CRASHED_BATCHES is off)
        run = runs[run_id]
        assert (run.state, run.attempts, run.flow_run_id, run.batch_limit) == (RunState.CLAIMED, 2, replacement, None)
        assert f"flow run {crashed} ended Crashed" in run.history[-1]["error"]
    expired = runs[expired_id]  # requeued; ranked behind the crashed batch, so still waiting
    assert (expired.state, expired.attempts, expired.flow_run_id) == (RunState.QUEUED, 1, None)
    assert "lease expired" in expired.history[-1]["error"]


def test_tick_holds_the_claims_of_flow_runs_that_have_not_started(engine, prefect_client, deployment):
    """A flow run that waits for a worker (scheduled: this deployment has no work pool) keeps its claims past their
    lease: the tick renews them, so a short lease bounds running work, not the wait to start."""
    name, _ = deployment
    add_synthetic_items(engine, 10)
    _set_target(engine, 1)
    (waiting,) = _tick(prefect_client, engine, name).submitted
    with session_scope(engine, write=True) as session:
        session.execute(update(Run).where(Run.flow_run_id == waiting)
                        .values(lease_expires_at=utcnow() - timedelta(minutes=1)))
    report = ctl.tick(prefect_client, engine=engine, stages=[SYNTHETIC], deployments={SYNTHETIC: name},
                      mirror=False, publish=False)
    assert not report.requeued and not report.stages[0].submitted
    held = [r for r in _runs(engine) if r.flow_run_id == waiting]
    assert held and all(r.state == RunState.CLAIMED and r.attempts == 1 and not r.history for r in held)
    assert all(r.lease_expires_at.replace(tzinfo=None) > utcnow().replace(tzinfo=None) for r in held)


def test_failed_submission_gives_the_claims_back(engine, prefect_client):
    strict = {"type": "object", "required": ["run_ids"],
              "properties": {"run_ids": {"type": "array", "items": {"type": "string"}}}}
    name, deployment_id = create_deployment(prefect_client, schema=strict, enforce=True)
    try:
        add_synthetic_items(engine, 30)
        _set_target(engine, 2)
        stage_tick = _tick(prefect_client, engine, name)
        assert stage_tick.submitted == () and stage_tick.released == BATCH
        assert "submitting" in stage_tick.error
        assert deployment_flow_runs(prefect_client, deployment_id) == []
    finally:
        delete_deployment(prefect_client, deployment_id)
    runs = _runs(engine)
    assert len(runs) == 30
    assert {(r.state, r.attempts, r.flow_run_id, r.claimant) for r in runs} == {(RunState.QUEUED, 0, None, None)}

    missing = _tick(prefect_client, engine, "synthetic/no-such-deployment")
    assert "not found" in missing.error and missing.claimed == 0
    assert {r.state for r in _runs(engine)} == {RunState.QUEUED}


def test_a_retried_submission_of_one_claim_makes_one_flow_run(engine, prefect_client, deployment):
    _, deployment_id = deployment
    add_synthetic_items(engine, 5)
    ids = [c.id for c in queue.claim(SYNTHETIC, 5, engine=engine, refresh=True)]
    first = submission.submit_batch(prefect_client, engine, SYNTHETIC, deployment_id, ids)
    again = submission.submit_batch(prefect_client, engine, SYNTHETIC, deployment_id, ids)
    assert first == again
    with session_scope(engine, write=True) as session:
        queue.release(session, ids)
    reclaimed = [c.id for c in queue.claim(SYNTHETIC, 5, engine=engine)]
    assert sorted(reclaimed) == sorted(ids)
    # a new claim is a new batch
    assert submission.submit_batch(prefect_client, engine, SYNTHETIC, deployment_id, reclaimed) != first
    assert len(deployment_flow_runs(prefect_client, deployment_id)) == 2


def test_manual_submission_never_duplicates_the_controllers_claims(engine, prefect_client, deployment):
    name, deployment_id = deployment
    items = add_synthetic_items(engine, 30)
    _set_target(engine, 1)
    controller_tick = _tick(prefect_client, engine, name)
    assert controller_tick.claimed == BATCH  # items[:20] belong to the controller's flow run
    chosen = [items[5], items[22], items[23], 999_999]

    report = submission.submit_items(prefect_client, SYNTHETIC, chosen, engine=engine, deployment=name, batch_size=1)

    assert report.skipped == (items[5], 999_999)
    assert len(report.flow_runs) == 2 and report.error is None
    runs = {r.id: r for r in _runs(engine)}
    assert sorted(runs[i].input_id for i in report.run_ids) == [items[22], items[23]]
    assert {runs[i].ranker for i in report.run_ids} == {"manual"}
    assert runs[next(r for r in runs if runs[r].input_id == items[5])].flow_run_id == controller_tick.submitted[0]

    repeat = submission.submit_items(prefect_client, SYNTHETIC, chosen, engine=engine, deployment=name)
    assert (repeat.run_ids, repeat.flow_runs) == ((), ())
    assert len(deployment_flow_runs(prefect_client, deployment_id)) == 3
    _set_target(engine, 2)
    assert _tick(prefect_client, engine, name).live == 3  # manual runs count against the target too


def _variable(client, name: str):
    return client.read_variable_by_name(name).value


def test_settings_mirror_round_trip(engine, prefect_client, cut_stage):
    with session_scope(engine, write=True) as session:
        first = mirror.mirror_settings(prefect_client, session)
    assert first.read_back == () and set(first.pushed) <= {mirror.TARGETS_VARIABLE, mirror.CUTOFFS_VARIABLE}
    assert _variable(prefect_client, mirror.TARGETS_VARIABLE)[SYNTHETIC] == 0
    assert _variable(prefect_client, mirror.CUTOFFS_VARIABLE)["synthetic-cut"] == {"max_priority": 10.0}

    targets = {**_variable(prefect_client, mirror.TARGETS_VARIABLE), SYNTHETIC: 4}  # edits in the UI
    prefect_client.update_variable(VariableUpdate(name=mirror.TARGETS_VARIABLE, value=targets))
    prefect_client.update_variable(VariableUpdate(name=mirror.CUTOFFS_VARIABLE,
                                                  value={"synthetic-cut": {"max_priority": 25.0}}))
    with session_scope(engine, write=True) as session:
        read = mirror.mirror_settings(prefect_client, session)
        assert queue.target(session, get_stage(SYNTHETIC)) == 4
        assert queue.cutoff_values(session, cut_stage) == {"max_priority": 25.0}
        reasons = session.scalars(select(StageSetting.reason).where(StageSetting.stage == SYNTHETIC)).all()
    assert sorted(read.read_back) == sorted([f"{mirror.TARGETS_VARIABLE}: {SYNTHETIC}=4",
                                             f"{mirror.CUTOFFS_VARIABLE}: synthetic-cut.max_priority=25.0"])
    assert reasons == [f"edited in the Prefect UI (variable {mirror.TARGETS_VARIABLE})"]

    _set_target(engine, 2)  # `hopflow target synthetic 2`: the database wins over the unchanged Variable
    with session_scope(engine, write=True) as session:
        pushed = mirror.mirror_settings(prefect_client, session)
    assert pushed.read_back == () and mirror.TARGETS_VARIABLE in pushed.pushed
    assert _variable(prefect_client, mirror.TARGETS_VARIABLE)[SYNTHETIC] == 2

    bad = {**_variable(prefect_client, mirror.TARGETS_VARIABLE), SYNTHETIC: -1, "synthetic-cut": "x", "nope": 3}
    prefect_client.update_variable(VariableUpdate(name=mirror.TARGETS_VARIABLE, value=bad))
    prefect_client.delete_variable_by_name(mirror.CUTOFFS_VARIABLE)
    with session_scope(engine, write=True) as session:
        rejected = mirror.mirror_settings(prefect_client, session)
        assert queue.target(session, get_stage(SYNTHETIC)) == 2
    assert len(rejected.rejected) == 3 and rejected.read_back == ()
    assert any("nope" in line and "unknown stage" in line for line in rejected.rejected)
    fixed = _variable(prefect_client, mirror.TARGETS_VARIABLE)
    assert fixed[SYNTHETIC] == 2 and "nope" not in fixed and fixed["synthetic-cut"] == 0
    assert _variable(prefect_client, mirror.CUTOFFS_VARIABLE)["synthetic-cut"] == {"max_priority": 25.0}  # recreated


def test_tick_broadens_a_cutoff_that_holds_everything_back(engine, prefect_client, deployment, cut_stage):
    name, _ = deployment
    add_synthetic_items(engine, 50)
    with session_scope(engine, write=True) as session:
        queue.set_cutoff(session, cut_stage, "max_priority", -1.0)
    _set_target(engine, 1, cut_stage.name)
    stage_tick = _tick(prefect_client, engine, name, stage=cut_stage.name)
    assert stage_tick.broadened == {"max_priority": 9.0}
    assert stage_tick.claimed == 10 and len(stage_tick.submitted) == 1  # priorities 0..9 are eligible now


def _latest_artifact(client, key: str):
    (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                        sort=ArtifactSort.CREATED_DESC, limit=1)
    return artifact


def test_tick_publishes_progress_and_leaderboard(engine, prefect_client, deployment, caf2, crystal):
    """The tick's leaderboard artifacts rank the barrier rows in the database: real hops of CaF2 and MgF2, results
    inserted out of order, lower flagged and legacy values besides; the expected order is derived here from them."""
    name, _ = deployment
    cells = {"CaF2": caf2.get_primitive_structure(), "MgF2": crystal("MgF2")}
    records = {"CaF2": find_pathways(cells["CaF2"], ion="F", max_hop=4.0, max_paths=5),  # a/2, a/sqrt2: both 3D
               "MgF2": find_pathways(cells["MgF2"], ion="F", max_hop=3.1, max_paths=5)}  # 0D, 3D, 1D
    assert [[p.dimensionality for p in records[f]] for f in ("CaF2", "MgF2")] == [[3, 3], [0, 3, 1]]
    with session_scope(engine, write=True) as session:
        caf2_id, (a2, a_sqrt2) = store_pathways(session, "CaF2", cells["CaF2"], records["CaF2"], max_paths=5,
                                                hops_found=2)
        mgf2_id, (m0, m3d, m1d) = store_pathways(session, "MgF2", cells["MgF2"], records["MgF2"], max_paths=5,
                                                 hops_found=3)
        inserted = [(a_sqrt2, 0.90, "ok"), (m1d, 0.25, "ok"), (a2, 0.30, "ok"), (a2, 0.05, "intermediate-minimum"),
                    (m3d, 0.60, "ok"), (m3d, 0.02, "unchecked"), (m0, None, "vacancy-moved")]
        add_results(session, *(barrier_row(Estimate, pid, barrier, flag=flag, reason=None if flag == "ok" else flag)
                               for pid, barrier, flag in inserted))
    add_synthetic_items(engine, 30)
    _set_target(engine, 1)
    ctl.tick(prefect_client, engine=engine, stages=[SYNTHETIC], deployments={SYNTHETIC: name}, mirror=False)

    progress = {row["stage"]: row for row in json.loads(_latest_artifact(prefect_client, artifacts.PROGRESS_KEY).data)}
    assert progress[SYNTHETIC] | {"note": ""} == {
        "stage": SYNTHETIC, "target": 1, "live_flow_runs": 0, "queued": 10, "claimed": BATCH, "running": 0,
        "done": 0, "failed": 0, "cached": 0, "submitted": 1, "note": ""}

    # per pathway: the lowest trusted ("ok") barrier, lowest first; a pathway with flagged results only comes last
    trusted = {pid: min(b for p, b, f in inserted if p == pid and f == "ok") for pid, _, f in inserted if f == "ok"}
    expected = sorted(trusted, key=trusted.__getitem__) + [m0]
    assert expected == [m1d, a2, m3d, a_sqrt2, m0]
    board = json.loads(_latest_artifact(prefect_client, artifacts.LEADERBOARD_KEY).data)
    assert [row["pathway_id"] for row in board] == expected
    assert [row["barrier"] for row in board] == [trusted[pid] for pid in expected[:-1]] + [None]
    assert [row["flag"] for row in board] == ["ok"] * 4 + ["vacancy-moved"]
    lengths = dict(zip([a2, a_sqrt2, m0, m3d, m1d], [p.length for p in records["CaF2"] + records["MgF2"]], strict=True))
    assert [row["hop_length"] for row in board] == pytest.approx([lengths[pid] for pid in expected])
    assert [row["formula"] for row in board] == ["MgF2", "CaF2", "MgF2", "CaF2", "MgF2"]

    # per material: CaF2's a/2 hop alone percolates in 3D at 0.30 eV; MgF2 has a hop without a trusted barrier
    materials = json.loads(_latest_artifact(prefect_client, artifacts.MATERIALS_KEY).data)
    assert [(m["formula"], m["structure_id"]) for m in materials] == [("CaF2", caf2_id), ("MgF2", mgf2_id)]
    caf2_row, mgf2_row = materials
    assert (caf2_row["e_star_3d"], caf2_row["status_3d"], caf2_row["pathways_3d"]) == (0.30, "complete", [a2])
    assert (caf2_row["hops_known"], caf2_row["hops_total"]) == (2, 2)
    assert (mgf2_row["e_star_3d"], mgf2_row["status_3d"]) == (None, "incomplete")
    assert (mgf2_row["hops_known"], mgf2_row["hops_total"]) == (2, 3)


def test_controller_flow_runs_a_tick_and_links_its_artifact(engine, prefect_client):
    state = ctl.controller(publish=True, return_state=True)
    assert state.is_completed()
    report = state.result()
    assert isinstance(report, ctl.TickReport) and report.stages == ()  # no stage has a target in a fresh database
    artifact = _latest_artifact(prefect_client, artifacts.PROGRESS_KEY)
    assert artifact.flow_run_id == state.state_details.flow_run_id
