"""Content fingerprints of the pathway-derived stages (features, estimates, neb): the same hop found again by another
pathways run has the same identity, so its features come from the cache; different hops never share one."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from hopflow.db import init_db, session_scope
from hopflow.flows.batch import import_raw_inputs, run_batch
from hopflow.models import Features, Pathway
from hopflow.queue import fingerprints
from hopflow.registry import get_stage
from hopflow.settings import get_settings
from hopflow.tasks.structures import bundled_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_a_hop_found_twice_is_featurized_once(monkeypatch) -> None:
    monkeypatch.setenv("HOPFLOW_DASK_PROFILE", "local-threads")
    get_settings.cache_clear()
    init_db()
    import_raw_inputs([r for r in bundled_inputs() if r.location == "CaF2"])
    run_batch("pathways", {"max_hop": 4.0})
    first = run_batch("features")
    assert len(first.done) == 2 and not first.reused
    run_batch("pathways", {"max_hop": 4.0, "max_paths": 6})  # another parameter set, the same two hops
    again = run_batch("features")
    assert len(again.done) == 2 and sorted(again.reused) == sorted(again.done)  # both from the cache

    with session_scope() as session:
        pathways = session.scalars(select(Pathway).order_by(Pathway.id)).all()
        assert len(pathways) == 4
        ids = [p.id for p in pathways]
        for stage in ("features", "estimates", "neb"):
            prints = fingerprints(session, get_stage(stage), ids)
            if stage != "neb":  # neb takes pathways with a trusted estimate only (none here)
                assert set(prints) == set(ids)
            assert all(prints[p.id] == p.fingerprint for p in pathways if p.id in prints)
        by_rank = {}
        for p in pathways:
            by_rank.setdefault(p.rank, set()).add(p.fingerprint)
        assert all(len(prints) == 1 for prints in by_rank.values())  # the same hop, the same identity
        assert len(set.union(*by_rank.values())) == 2  # the a/2 and a/√2 hops differ
        copied = session.scalars(select(Features).order_by(Features.id)).all()
        assert [f.overlap_cation_max_change for f in copied[2:]] == [f.overlap_cation_max_change for f in copied[:2]]
