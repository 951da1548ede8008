"""The learning loop's machine learning: barrier model, rankers, calibration, plots, active-learning benchmark."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from crystals import CAF2_A
from matplotlib.image import imread

from hopflow.errors import InsufficientDataError
from hopflow.surrogate import (
    MIN_TRAINING_SIZE,
    BarrierModel,
    Calibration,
    ModelParams,
    TrainedModel,
    cross_validated_error,
    diverse_order,
    feature_matrix,
    fit_calibration,
    k_centre_cost,
    learning_curve,
    learning_curve_plot,
    mixed_scores,
    parity_plot,
    predicted_scores,
    ranker_scores,
    standardize,
    train,
    uncertain_scores,
)

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def smooth(X: np.ndarray) -> np.ndarray:
    """A smooth 'barrier' (eV) of four features with an interaction."""
    return 0.4 + 0.2 * np.sin(3 * X[:, 0]) + 0.15 * X[:, 1] ** 2 + 0.1 * X[:, 0] * X[:, 2]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    X = rng.uniform(-1, 1, size=(400, 4))
    return X, smooth(X) + rng.normal(scale=0.02, size=len(X))


@pytest.fixture(scope="module")
def trained(data) -> TrainedModel:
    X, y = data
    return train(range(100, 300), X[:200], y[:200], ["a", "b", "c", "d"], seed=3, target="synthetic barrier")


def load_benchmark():
    """benchmarks/ is no package: load the benchmark module from its file."""
    spec = importlib.util.spec_from_file_location("active_learning", ROOT / "benchmarks" / "active_learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- model


def test_model_beats_the_mean_baseline_on_a_smooth_function(data, trained):
    X, y = data
    test_X, test_y = X[200:], y[200:]
    pred = trained.predict(test_X)
    model_mae = np.mean(np.abs(pred.mean - test_y))
    baseline_mae = np.mean(np.abs(y[:200].mean() - test_y))
    assert model_mae < 0.35 * baseline_mae
    assert pred.std.shape == test_y.shape and (pred.std >= 0).all()
    # the recorded cross-validated error is an honest estimate of the held-out error
    assert trained.cv_mae == pytest.approx(model_mae, rel=0.5)
    assert trained.cv_mae == pytest.approx(np.mean(np.abs(np.array(trained.cv_mean) - np.array(trained.targets))))


def test_uncertainty_is_larger_between_training_clusters_than_inside_them():
    rng = np.random.default_rng(0)
    centres = np.array([[-2.0, -2.0], [2.0, 2.0], [-2.0, 2.0]])
    X = np.vstack([c + rng.normal(scale=0.3, size=(30, 2)) for c in centres])
    y = 0.3 + 0.1 * X[:, 0] + 0.08 * X[:, 1] + rng.normal(scale=0.02, size=len(X))
    model = BarrierModel(seed=1).fit(X, y)
    inside = model.predict(centres).std
    between = model.predict(np.array([[0.0, 0.0], [0.0, 2.0], [-2.0, 0.0]])).std
    assert between.min() > 3 * inside.max()


def test_cross_validated_error_and_learning_curve_fall_with_more_data(data):
    X, y = data
    params = ModelParams(n_estimators=50)
    small = cross_validated_error(X[:20], y[:20], params, seed=0)
    large = cross_validated_error(X[:300], y[:300], params, seed=0)
    assert large < small
    curve = learning_curve(X[:300], y[:300], params, points=4, seed=0)
    assert curve.sizes[0] == MIN_TRAINING_SIZE and list(curve.sizes) == sorted(curve.sizes) and len(curve.sizes) == 4
    assert curve.mae[-1] < 0.6 * curve.mae[0]


def test_trained_model_records_provenance_and_round_trips(data, trained, tmp_path):
    X, _ = data
    meta = trained.metadata()
    assert meta["ids"] == list(range(100, 300)) and meta["feature_names"] == ["a", "b", "c", "d"]
    assert meta["kind"] == "extra-trees" and meta["n_train"] == 200 and meta["params"]["n_estimators"] == 200
    assert meta["target"] == "synthetic barrier" and meta["cv_folds"] == 5
    stored = json.loads(json.dumps(meta))  # as a JSON column would hold it
    again = TrainedModel.from_stored(stored, trained.to_bytes())
    assert again == trained  # every provenance field; the estimator is compared by its predictions below
    np.testing.assert_array_equal(again.predict(X[200:]).mean, trained.predict(X[200:]).mean)
    np.testing.assert_array_equal(again.predict(X[200:]).std, trained.predict(X[200:]).std)


def test_training_is_reproducible_by_seed(data):
    X, y = data
    params = ModelParams(n_estimators=50)
    first = train(range(30), X[:30], y[:30], list("abcd"), seed=5, params=params)
    second = train(range(30), X[:30], y[:30], list("abcd"), seed=5, params=params)
    np.testing.assert_array_equal(first.predict(X[300:]).mean, second.predict(X[300:]).mean)
    assert first.cv_mae == second.cv_mae


def test_too_little_data_raises_a_clear_error(data):
    X, y = data
    n = MIN_TRAINING_SIZE - 1
    with pytest.raises(InsufficientDataError, match=f"{n} barriers are too few"):
        train(range(n), X[:n], y[:n], list("abcd"))
    with pytest.raises(InsufficientDataError, match="all 20 barriers are equal"):
        train(range(20), X[:20], np.full(20, 0.3), list("abcd"))
    with pytest.raises(InsufficientDataError, match="not finite"):
        train(range(20), X[:20], np.where(np.arange(20) == 3, np.nan, y[:20]), list("abcd"))
    with pytest.raises(ValueError, match="distinct ids"):
        train([1] * 20, X[:20], y[:20], list("abcd"))
    with pytest.raises(ValueError, match="3 feature names for 4"):
        train(range(20), X[:20], y[:20], list("abc"))


def test_missing_features_become_nan_and_the_model_still_predicts(data):
    X, y = data
    rows = [{"a": a, "b": b, "c": None if i % 7 == 0 else c, "d": d} for i, (a, b, c, d) in enumerate(X[:100])]
    matrix = feature_matrix(rows, ["a", "b", "c", "d"])
    assert np.isnan(matrix[::7, 2]).all() and not np.isnan(matrix[1:7]).any()
    pred = train(range(100), matrix, y[:100], list("abcd")).predict(matrix)
    assert np.isfinite(pred.mean).all()


# ---------------------------------------------------------------- rankers


def test_rankers_order_by_mean_by_uncertainty_and_by_their_mix(data, trained):
    X, _ = data
    pred = trained.predict(X[200:])
    np.testing.assert_array_equal(predicted_scores(trained, X[200:]), pred.mean)
    np.testing.assert_array_equal(uncertain_scores(trained, X[200:]), -pred.std)
    np.testing.assert_allclose(mixed_scores(trained, X[200:], 2.0), pred.mean - 2.0 * pred.std)
    np.testing.assert_array_equal(mixed_scores(trained, X[200:], 0.0), predicted_scores(trained, X[200:]))
    # lower score = claimed first: the first claim under `predicted` is the lowest predicted barrier
    assert np.argmin(predicted_scores(trained, X[200:])) == np.argmin(pred.mean)
    assert np.argmin(uncertain_scores(trained, X[200:])) == np.argmax(pred.std)
    with pytest.raises(ValueError, match="must not be negative"):
        mixed_scores(trained, X[200:], -1.0)
    # the same rankers by name, as a stage's ranker setting selects them
    np.testing.assert_array_equal(ranker_scores("predicted", X[200:], trained), pred.mean)
    np.testing.assert_array_equal(ranker_scores("uncertain", X[200:], trained), -pred.std)
    np.testing.assert_allclose(ranker_scores("mixed", X[200:], trained, weight=0.5), pred.mean - 0.5 * pred.std)
    np.testing.assert_array_equal(ranker_scores("diverse", X[200:], seed=2), diverse_order(X[200:], seed=2))
    with pytest.raises(InsufficientDataError, match="needs a trained model"):
        ranker_scores("predicted", X[200:], None)
    with pytest.raises(ValueError, match="unknown learning ranker 'best'"):
        ranker_scores("best", X[200:], trained)


def grid(n: int = 10) -> np.ndarray:
    return np.array([[i, j] for i in range(n) for j in range(n)], dtype=float)


def test_diverse_order_is_a_permutation_starting_far_apart():
    X = grid()
    scores = diverse_order(X, seed=4)
    assert sorted(scores) == list(range(len(X)))
    first, second = X[np.argsort(scores)[:2]]
    # the second pick is the grid point farthest from the (random) first one: a corner
    assert tuple(second) in {(0, 0), (0, 9), (9, 0), (9, 9)}
    assert np.linalg.norm(second - first) == pytest.approx(np.max(np.linalg.norm(X - first, axis=1)))


def test_diverse_k_centre_cost_on_a_grid():
    X = grid()
    spread = X[:, 0].std()  # the standardized space scales both axes by this
    # 4 centres at the quarter points cover the 10 x 10 grid within 2*sqrt(2) grid units: OPT <= that, and
    # farthest-point sampling is within a factor 2 of OPT
    costs = [k_centre_cost(X, np.argsort(diverse_order(X, k=4, seed=s))[:4]) for s in range(10)]
    assert max(costs) <= 2 * 2 * np.sqrt(2) / spread + 1e-9
    rng = np.random.default_rng(0)
    random_costs = [k_centre_cost(X, rng.choice(len(X), 4, replace=False)) for _ in range(10)]
    assert np.mean(costs) < np.mean(random_costs)
    # the cost can only fall as k grows, and is 0 once every point is picked
    order = np.argsort(diverse_order(X, seed=0))
    series = [k_centre_cost(X, order[:k]) for k in (1, 4, 16, 64, 100)]
    assert series == sorted(series, reverse=True) and series[-1] == 0.0


def test_diverse_order_avoids_what_was_already_computed():
    X = grid()
    corners = np.array([[0, 0], [0, 9], [9, 0], [9, 9]], dtype=float)
    scores = diverse_order(X, k=1, chosen=corners)
    assert tuple(X[np.argmin(scores)]) in {(4, 4), (4, 5), (5, 4), (5, 5)}
    # past the first k, items follow by distance to the picked set: the corners themselves come last
    last = {tuple(p) for p in X[np.argsort(scores)[-4:]]}
    assert last == {tuple(c) for c in corners}


def test_standardize_handles_constant_and_missing_columns():
    X = np.array([[1.0, 5.0, np.nan], [3.0, 5.0, 2.0], [5.0, 5.0, 4.0]])
    Z = standardize(X)
    np.testing.assert_allclose(Z[:, 0], [-1.224744871, 0.0, 1.224744871])
    assert (Z[:, 1] == 0).all() and Z[0, 2] == 0.0 and np.isfinite(Z).all()


# ---------------------------------------------------------------- calibration


def test_calibration_recovers_a_known_line():
    rng = np.random.default_rng(2)
    mlip = rng.uniform(0.1, 0.8, size=40)
    vasp = 1.35 * mlip + 0.08 + rng.normal(scale=0.01, size=40)
    cal = fit_calibration(range(40), mlip, vasp, source="mlip-neb", reference="vasp-neb")
    assert cal.slope == pytest.approx(1.35, abs=0.03) and cal.intercept == pytest.approx(0.08, abs=0.02)
    assert cal.n == 40 and cal.rmse < 0.015 < cal.rmse_before
    np.testing.assert_allclose(cal.apply([0.2, 0.5]), cal.slope * np.array([0.2, 0.5]) + cal.intercept)
    assert Calibration.from_metadata(json.loads(json.dumps(cal.metadata()))) == cal


def test_calibration_drops_unfinished_pairs_and_needs_enough():
    mlip = np.array([0.1, 0.2, np.nan, 0.4, 0.5, 0.6, 0.7])
    vasp = np.array([0.2, 0.3, 0.4, np.nan, 0.6, 0.7, 0.8])
    cal = fit_calibration([10, 11, 12, 13, 14, 15, 16], mlip, vasp)
    assert cal.ids == (10, 11, 14, 15, 16) and cal.slope == pytest.approx(1.0) and cal.intercept == pytest.approx(0.1)
    with pytest.raises(InsufficientDataError, match="4 pairs of mlip and vasp-neb barriers are too few"):
        fit_calibration(range(4), [0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.5])
    with pytest.raises(InsufficientDataError, match="slope is undefined"):
        fit_calibration(range(6), [0.3] * 6, [0.2, 0.3, 0.4, 0.5, 0.6, 0.7])


# ---------------------------------------------------------------- plots


def test_plots_write_valid_pngs(trained, tmp_path):
    parity = parity_plot(trained.targets, trained.cv_mean, trained.cv_std, tmp_path / "plots" / "parity.png")
    curve = learning_curve_plot([10, 30, 100, 200], [0.12, 0.07, 0.04, 0.03], tmp_path / "curve.png")
    for path in (parity, curve):
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 200
        assert image[..., :3].std() > 0.01  # something was drawn


# ---------------------------------------------------------------- the acceptance benchmark


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark()


def test_benchmark_fixture_holds_real_pathway_features(benchmark):
    real = benchmark.load_real_features()
    assert len(real.labels) >= 30 and len(set(real.labels)) == len(real.labels)
    assert len(real.names) >= 4 and np.isfinite(real.matrix).mean() > 0.9
    # the synthetic set stays close to the real pathways: small noise around resampled rows
    X = benchmark.synthetic_pathways(real, 500, seed=0)
    Z, R = standardize(X, real.matrix), standardize(real.matrix)
    nearest = np.array([np.min(np.nanmax(np.abs(R - z), axis=1)) for z in Z])
    assert np.nanmax(nearest) < 0.5


def test_fixture_matches_tasks_features_for_fluorite(benchmark):
    """The fixture holds what tasks.features computes today (else: regenerate it, see the benchmark's docstring)."""
    real = benchmark.load_real_features()
    name, structure, records = next(entry for entry in benchmark.bundled_pathways_of(["CaF2"]))
    row = benchmark.pathway_feature_row(structure, records[0])
    stored = dict(zip(real.names, real.matrix[real.labels.index(f"{name}#0")], strict=True))
    assert set(stored) <= set(row)
    assert {k: pytest.approx(row[k], rel=1e-4, abs=1e-6) for k in stored} == stored
    assert stored["length"] == pytest.approx(CAF2_A / 2, abs=1e-3)  # fluorite's a/2 hop


@pytest.mark.slow
@pytest.mark.parametrize("hidden_name", ["linear+product", "nonlinear"])
def test_active_learning_benchmark(benchmark, hidden_name):
    hidden = next(h for h in benchmark.HIDDEN_FUNCTIONS if h.name == hidden_name)
    start = time.perf_counter()
    results = benchmark.run_benchmark(hidden, benchmark.SEEDS)
    print("\n" + benchmark.report(hidden, results, "predicted", time.perf_counter() - start))
    assert len(results) == 10 and all(r.targets == 200 for r in results)
    hits_model, hits_random = np.mean([r.hits_model for r in results]), np.mean([r.hits_random for r in results])
    assert hits_model >= 2 * hits_random
    assert all(r.hits_model >= 1.5 * r.hits_random for r in results)
    assert sum(r.kcentre_diverse < r.kcentre_random for r in results) >= 9
