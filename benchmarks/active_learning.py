"""Synthetic active-learning benchmark of the learning loop's rankers (issue 8's acceptance), and the regeneration of
its fixture of real pathway features.

    python benchmarks/active_learning.py                      # per-seed figures for both hidden functions
    python benchmarks/active_learning.py --regenerate-features # recompute tests/data/bundled_pathway_features.csv

2,000 synthetic pathways resample the bundled structures' real pathway features with small noise; a hidden function
gives each a barrier 0.15 + 0.6 sigmoid(z) eV plus Gaussian noise of 0.05 eV (the synthetic engine's answer). A
campaign computes 20 % of them in batches of 5 %: the first batch by `diverse` (no model yet), each later one by a
ranker of a model retrained on every barrier computed so far. Random order is the baseline.

The fixture holds, per pathway of the bundled structures (tasks.structures sanitize -> tasks.pathways.find_pathways
under default settings), the numeric predictors of tasks.features.featurize and the pathway's multiplicity.
Regenerate it (about 5 minutes on 2 cores) whenever those definitions change; tests/test_surrogate.py checks one row
against a fresh featurization.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from hopflow.settings import get_settings
from hopflow.surrogate import (
    ModelParams,
    diverse_order,
    k_centre_cost,
    mixed_scores,
    predicted_scores,
    standardize,
    train,
    uncertain_scores,
)
from hopflow.tasks.features import featurize
from hopflow.tasks.pathways import PathwayRecord, find_pathways
from hopflow.tasks.structures import bundled_inputs, parse_input, sanitize

ROOT = Path(__file__).resolve().parents[1]
FEATURES_CSV = ROOT / "tests" / "data" / "bundled_pathway_features.csv"
ID_COLUMNS = ("structure", "rank")
"""Columns of the fixture that identify a pathway; every other column is a feature."""

N_PATHWAYS = 2000
BUDGET = 0.20
"""Fraction of the pathways computed in a campaign."""
STEP = 0.05
"""Fraction computed between two retrainings (the first step is chosen by `diverse`)."""
FEATURE_NOISE = 0.05
"""Gaussian noise added to resampled features, as a fraction of each feature's spread over the real pathways."""
BARRIER_NOISE = 0.05
"""eV: Gaussian noise of the synthetic engine's barrier."""
BARRIER_BASE, BARRIER_SPAN = 0.15, 0.6
"""eV: barrier = BARRIER_BASE + BARRIER_SPAN * sigmoid(z)."""
LOW_FRACTION = 0.10
"""The targets: the pathways with the lowest 10 % of barriers."""
SEEDS = tuple(range(10))
NON_NUMERIC_FEATURES = ("ion", "oxidation_states", "radii", "radii_description")
# a small, fast ensemble: 10 seeds x 2 hidden functions x 3 retrainings must run in minutes on 2 shared cores
BENCH_PARAMS = ModelParams(n_estimators=100)
BENCH_FOLDS = 3

Strategy = Callable[[object, np.ndarray], np.ndarray]
STRATEGIES: dict[str, Strategy] = {
    "predicted": predicted_scores,
    "uncertain": uncertain_scores,
    "mixed": mixed_scores,
}


@dataclass(frozen=True)
class RealFeatures:
    """The fixture: one row of features per real pathway of the bundled structures."""

    names: tuple[str, ...]
    labels: tuple[str, ...]
    matrix: np.ndarray


@dataclass(frozen=True)
class HiddenFunction:
    """z as a fixed function of the standardized real features (by name); barrier = 0.15 + 0.6 sigmoid(z) eV."""

    name: str
    formula: str
    z: Callable[[Callable[[str], np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class SeedResult:
    """One seed's campaign figures: hits = computed pathways among the true lowest 10 %."""

    seed: int
    hits_random: int
    hits_model: int
    targets: int
    kcentre_random: float
    kcentre_diverse: float
    final_cv_mae: float

    @property
    def ratio(self) -> float:
        """Hits of the model ranker over hits of random order."""
        return self.hits_model / self.hits_random if self.hits_random else math.inf


# Two different hidden functions of tasks.features' predictors: each uses at least four features and a product of two.
LINEAR_PRODUCT = HiddenFunction(
    name="linear+product",
    formula="z = 1.2 overlap_cation_max_change + 0.8 ewald_energy_change - 0.6 ion_fraction + 0.5 length_vs_dmin"
    " - 0.9 length*dimensionality_cumlengths",
    z=lambda f: 1.2 * f("overlap_cation_max_change") + 0.8 * f("ewald_energy_change") - 0.6 * f("ion_fraction")
    + 0.5 * f("length_vs_dmin") - 0.9 * f("length") * f("dimensionality_cumlengths"),
)
NONLINEAR = HiddenFunction(
    name="nonlinear",
    formula="z = 1.5 sin(ewald_energy_start) + 1.0 overlap_anion_midpoint*min_cation_anion_distance"
    " - 0.8 |overlap_cation_start| - 0.7 dimensionality",
    z=lambda f: 1.5 * np.sin(f("ewald_energy_start"))
    + 1.0 * f("overlap_anion_midpoint") * f("min_cation_anion_distance")
    - 0.8 * np.abs(f("overlap_cation_start")) - 0.7 * f("dimensionality"),
)
HIDDEN_FUNCTIONS = (LINEAR_PRODUCT, NONLINEAR)


def load_real_features(path: Path = FEATURES_CSV) -> RealFeatures:
    """Read the fixture CSV (id columns, then numeric features)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path} holds no pathways")
    names = tuple(c for c in rows[0] if c not in ID_COLUMNS)
    labels = tuple(f"{r['structure']}#{r['rank']}" for r in rows)
    matrix = np.array([[float(r[n]) if r[n] not in ("", "nan") else np.nan for n in names] for r in rows])
    return RealFeatures(names=names, labels=labels, matrix=matrix)


def synthetic_pathways(real: RealFeatures, n: int, seed: int, noise: float = FEATURE_NOISE) -> np.ndarray:
    """n feature vectors: real pathways drawn with replacement, each feature jittered by noise x its spread."""
    rng = np.random.default_rng(seed)
    rows = real.matrix[rng.integers(len(real.matrix), size=n)]
    spread = np.nanstd(real.matrix, axis=0)
    return rows + rng.normal(size=rows.shape) * noise * spread


def synthetic_barriers(real: RealFeatures, X: np.ndarray, hidden: HiddenFunction, seed: int) -> np.ndarray:
    """The synthetic engine: 0.15 + 0.6 sigmoid(z) eV plus Gaussian noise; z of X standardized as the real set."""
    Z = standardize(X, real.matrix)
    column = {name: Z[:, j] for j, name in enumerate(real.names)}
    z = hidden.z(lambda name: column[name])
    rng = np.random.default_rng(seed + 10_000)
    return BARRIER_BASE + BARRIER_SPAN / (1 + np.exp(-z)) + rng.normal(scale=BARRIER_NOISE, size=len(X))


def campaign(
    X: np.ndarray,
    y: np.ndarray,
    names: Sequence[str],
    strategy: str,
    seed: int,
    *,
    budget: float = BUDGET,
    step: float = STEP,
    params: ModelParams = BENCH_PARAMS,
    folds: int = BENCH_FOLDS,
) -> tuple[np.ndarray, float]:
    """Indices computed in order (budget x n of them) and the last model's CV MAE (NaN without a model).

    'random' draws a random order; any other strategy picks the first step by `diverse_order`, then retrains on
    everything computed so far after every step and takes the step's items with the lowest scores.
    """
    n = len(X)
    total, batch = int(round(budget * n)), int(round(step * n))
    if strategy == "random":
        return np.random.default_rng(seed).permutation(n)[:total], math.nan
    scores = diverse_order(X, k=batch, seed=seed)
    picked = list(np.argsort(scores, kind="stable")[:batch])
    cv_mae = math.nan
    while len(picked) < total:
        model = train(picked, X[picked], y[picked], names, seed=seed, params=params, folds=folds)
        cv_mae = model.cv_mae
        remaining = np.setdiff1d(np.arange(n), picked)
        order = remaining[np.argsort(STRATEGIES[strategy](model, X[remaining]), kind="stable")]
        picked.extend(order[: min(batch, total - len(picked))])
    return np.asarray(picked), cv_mae


def run_seed(real: RealFeatures, hidden: HiddenFunction, seed: int, strategy: str = "predicted") -> SeedResult:
    """One seed: a fresh synthetic set, a random campaign and a model campaign, and the first-step k-centre costs."""
    X = synthetic_pathways(real, N_PATHWAYS, seed)
    y = synthetic_barriers(real, X, hidden, seed)
    targets = set(np.argsort(y, kind="stable")[: int(round(LOW_FRACTION * len(y)))].tolist())
    batch = int(round(STEP * len(X)))
    random_order, _ = campaign(X, y, real.names, "random", seed)
    model_order, cv_mae = campaign(X, y, real.names, strategy, seed)
    return SeedResult(
        seed=seed,
        hits_random=len(targets.intersection(random_order.tolist())),
        hits_model=len(targets.intersection(model_order.tolist())),
        targets=len(targets),
        kcentre_random=k_centre_cost(X, random_order[:batch]),
        kcentre_diverse=k_centre_cost(X, model_order[:batch]),
        final_cv_mae=cv_mae,
    )


def run_benchmark(
    hidden: HiddenFunction, seeds: Sequence[int] = SEEDS, strategy: str = "predicted"
) -> list[SeedResult]:
    """Every seed's figures for one hidden function."""
    real = load_real_features()
    return [run_seed(real, hidden, seed, strategy) for seed in seeds]


def report(hidden: HiddenFunction, results: Sequence[SeedResult], strategy: str, seconds: float) -> str:
    """A per-seed table with the acceptance checks."""
    lines = [
        f"hidden function {hidden.name}: {hidden.formula}",
        f"{'seed':>4} {'targets':>7} {'random':>6} {strategy:>9} {'ratio':>6} "
        f"{'kc-random':>9} {'kc-diverse':>10} {'cv-mae':>7}",
    ]
    for r in results:
        lines.append(
            f"{r.seed:>4} {r.targets:>7} {r.hits_random:>6} {r.hits_model:>9} {r.ratio:>6.2f} "
            f"{r.kcentre_random:>9.3f} {r.kcentre_diverse:>10.3f} {r.final_cv_mae:>7.3f}"
        )
    hits_model, hits_random = np.mean([r.hits_model for r in results]), np.mean([r.hits_random for r in results])
    lines.append(
        f"mean hits {hits_model:.1f} vs random {hits_random:.1f} (x{hits_model / hits_random:.2f}); "
        f"min ratio {min(r.ratio for r in results):.2f}; diverse k-centre below random in "
        f"{sum(r.kcentre_diverse < r.kcentre_random for r in results)}/{len(results)} seeds; {seconds:.1f} s"
    )
    return "\n".join(lines)


def bundled_pathways_of(names: Sequence[str] | None = None) -> list[tuple[str, Structure, list[PathwayRecord]]]:
    """Bundled structures (all, or those named), sanitized as the import stage does, and their distinct pathways of
    the migrating ion under the default settings."""
    settings = get_settings()
    found = []
    for raw in bundled_inputs():
        if names is not None and raw.location not in names:
            continue
        structure = parse_input(raw)
        sanitized = sanitize(structure, ion=settings.migrating_ion, max_sites=settings.max_sites, name=raw.location)
        records = find_pathways(
            sanitized.structure, ion=settings.migrating_ion, max_hop=settings.max_hop, max_paths=settings.max_paths
        )
        found.append((raw.location, sanitized.structure, records))
    return found


def pathway_feature_row(structure: Structure, record: PathwayRecord) -> dict[str, float]:
    """The numeric predictors of tasks.features.featurize for one pathway (None -> NaN), plus its multiplicity."""
    features = featurize(structure, record)
    row = {"multiplicity": record.multiplicity}
    for item in fields(features):
        value = getattr(features, item.name)
        if item.name in NON_NUMERIC_FEATURES or isinstance(value, (str, dict)):
            continue
        row[item.name] = math.nan if value is None else float(value)
    return row


def regenerate_features(path: Path = FEATURES_CSV) -> int:
    """Recompute the fixture from the bundled structures' pathways; returns the number of rows written.

    Columns that are missing (NaN) for every pathway (e.g. overlap with neutral neighbours in ionic fluorides) or
    the same for every pathway carry no information and are left out.
    """
    rows = []
    for name, structure, records in bundled_pathways_of():
        for record in records:
            rows.append({"structure": name, "rank": record.rank, **pathway_feature_row(structure, record)})
    names = [key for key in rows[0] if key not in ID_COLUMNS]
    kept = [n for n in names if len({r[n] for r in rows if not math.isnan(r[n])}) > 1]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*ID_COLUMNS, *kept], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--regenerate-features", action="store_true", help="recompute the real-feature fixture and exit"
    )
    parser.add_argument("--strategy", default="predicted", choices=sorted(STRATEGIES))
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    args = parser.parse_args(argv)
    if args.regenerate_features:
        print(f"wrote {regenerate_features()} pathways to {FEATURES_CSV}")
        return 0
    for hidden in HIDDEN_FUNCTIONS:
        start = time.perf_counter()
        results = run_benchmark(hidden, range(args.seeds), args.strategy)
        print(report(hidden, results, args.strategy, time.perf_counter() - start), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
