"""The built-in stages: one registry entry each (input query, parameters, rankers, cutoffs, load, store)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from hopflow.engines import canonical_model, engine_parameters, model_version
from hopflow.fingerprints import pathway_fingerprint
from hopflow.loop import LEARNING_RANKERS, model_ranker_scores
from hopflow.models import (Estimate, Features, NebResult, Pathway, Run, RunState, Source, Structure, SyntheticItem,
                            SyntheticResult, Vacancy, VacancySite)
from hopflow.models.barriers import trusted
from hopflow.registry import Cutoff, Ranker, Reused, Stage, register
from hopflow.settings import Settings, get_settings

BY_ID = Ranker("id", "oldest input first", expression=lambda c: c.item_id)


# ---------------------------------------------------------------- import: sources -> structures


def _import_inputs() -> Any:
    return select(Source.id.label("item_id"), Source.kind, Source.key)


def _import_parameters(settings: Settings) -> dict[str, Any]:
    return {"ion": settings.migrating_ion, "max_sites": settings.max_sites, "sanitize": 1}


def _import_load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    rows = session.scalars(select(Source).where(Source.id.in_(list(ids))))
    return {s.id: {"kind": s.kind, "key": s.key, "location": s.location, "payload": s.payload,
                   "format": s.format, "meta": s.meta or {}} for s in rows}


def _import_store(session: Session, run: Run, result: Any) -> None:
    source = session.get(Source, run.input_id)
    if isinstance(result, Reused):
        reused = session.get(Source, result.run.input_id)
        structure_id = reused.structure_id if reused else None
    elif result.duplicate_of is not None:
        structure_id = result.duplicate_of
    else:
        s = result.sanitized
        row = Structure(
            formula=s.formula, chemsys=s.chemsys, spacegroup=s.spacegroup_symbol, spacegroup_number=s.spacegroup_number,
            nsites=s.nsites, density=s.density, volume=s.volume, oxidation_states=dict(s.oxidation_states) if s.oxidation_states else None,
            oxidation_method=s.oxidation_method, fingerprint=s.fingerprint, structure=s.structure.as_dict(),
            run_id=run.id, energy_above_hull=(source.meta or {}).get("energy_above_hull") if source else None,
        )
        session.add(row)
        session.flush()
        structure_id = row.id
    if source is not None and source.structure_id is None:
        source.structure_id = structure_id


IMPORT = register(Stage(
    name="import",
    description="Parse, sanitize and deduplicate source records into structures.",
    input_table="sources",
    output_table="structures",
    inputs=_import_inputs,
    parameters=_import_parameters,
    load=_import_load,
    store=_import_store,
    fingerprint=lambda c: c.key,
    rankers=(BY_ID,),
    default_ranker="id",
    entrypoint="flows/import_structures.py:import_structures",
    resources="local",
    batch_size=50,
    retry_limit=2,
    lease_seconds=600,
))


# ---------------------------------------------------------------- synthetic: test machinery, no science


def _synthetic_inputs() -> Any:
    return select(SyntheticItem.id.label("item_id"), SyntheticItem.priority, SyntheticItem.fingerprint)


def _synthetic_load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    rows = session.scalars(select(SyntheticItem).where(SyntheticItem.id.in_(list(ids))))
    attempts = dict(session.execute(select(Run.input_id, Run.attempts).where(
        Run.stage == "synthetic", Run.input_id.in_(list(ids)), Run.state.in_(RunState.LIVE))).all())
    return {r.id: {"item_id": r.id, "cpu_ms": r.cpu_ms, "sleep_ms": r.sleep_ms, "failure": r.failure,
                   "fail_attempts": r.fail_attempts, "attempt": attempts.get(r.id, 1)} for r in rows}


def _synthetic_store(session: Session, run: Run, result: Any) -> None:
    if isinstance(result, Reused):
        old = session.scalars(select(SyntheticResult).where(SyntheticResult.run_id == result.run.id)).one()
        session.add(SyntheticResult(run_id=run.id, item_id=run.input_id, value=old.value, elapsed_s=0.0))
        return
    session.add(SyntheticResult(run_id=run.id, item_id=run.input_id, value=result.value, elapsed_s=result.elapsed_s))


SYNTHETIC = register(Stage(
    name="synthetic",
    description="TEST MACHINERY: burns CPU or sleeps per item and fails on request; exercises queue and orchestration.",
    input_table="synthetic_items",
    output_table="synthetic_results",
    inputs=_synthetic_inputs,
    parameters=lambda settings: {"engine": "synthetic", "version": 1},
    load=_synthetic_load,
    store=_synthetic_store,
    fingerprint=lambda c: c.fingerprint,
    rankers=(BY_ID, Ranker("priority", "lowest priority value first", expression=lambda c: c.priority)),
    default_ranker="priority",
    entrypoint="flows/synthetic.py:synthetic",
    resources="local",
    batch_size=20,
    retry_limit=3,
    lease_seconds=300,
))


# ---------------------------------------------------------------- pathways: structures -> pathways

PATHWAY_FIELDS = ("ion", "rank", "length", "start_index", "end_index", "end_image", "start_frac", "end_frac",
                  "start_cart", "end_cart", "start_label", "end_label", "multiplicity", "dimensionality",
                  "dimensionality_cumlengths", "max_hop", "max_hop_automatic", "hops_found")
"""Columns of `pathways` that hold tasks.pathways.PathwayRecord's fields (the record is rebuilt from them)."""


def pathway_fields(row: Pathway) -> dict[str, Any]:
    """A stored pathway's PathwayRecord fields (vectors as lists)."""
    return {name: getattr(row, name) for name in PATHWAY_FIELDS}


def structure_producer(session: Session, structure_id: int) -> Run | None:
    """The import run that stored a structure."""
    structure = session.get(Structure, structure_id)
    return session.get(Run, structure.run_id) if structure and structure.run_id else None


def pathway_producer(session: Session, pathway_id: int) -> Run | None:
    """The pathways run that stored a pathway."""
    pathway = session.get(Pathway, pathway_id)
    return session.get(Run, pathway.run_id) if pathway else None


def _pathways_inputs() -> Any:
    return select(Structure.id.label("item_id"), Structure.nsites, Structure.formula, Structure.fingerprint)


def _pathways_parameters(settings: Settings) -> dict[str, Any]:
    return {"ion": settings.migrating_ion, "max_hop": settings.max_hop, "max_paths": settings.max_paths,
            "max_sites": settings.max_sites}


def _pathways_load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    rows = session.scalars(select(Structure).where(Structure.id.in_(list(ids))))
    return {s.id: {"structure_id": s.id, "formula": s.formula, "structure": s.structure,
                   "oxidation_states": s.oxidation_states} for s in rows}


def lattice_parameters(structure: dict[str, Any]) -> tuple[float, ...]:
    """a, b, c (Å) and α, β, γ (°) of a stored structure."""
    from pymatgen.core import Lattice

    lattice = Lattice(structure["lattice"]["matrix"])
    return (*lattice.abc, *lattice.angles)


def _pathways_store(session: Session, run: Run, result: Any) -> None:
    if isinstance(result, Reused):
        old = session.scalars(select(Pathway).where(Pathway.run_id == result.run.id).order_by(Pathway.rank))
        records = [pathway_fields(p) for p in old]
    else:
        records = [asdict(record) for record in result]
    structure = session.get(Structure, run.input_id)
    lattice = lattice_parameters(structure.structure)
    session.add_all([Pathway(run_id=run.id, structure_id=run.input_id,
                             fingerprint=pathway_fingerprint(structure.fingerprint, lattice, r["ion"], r["start_frac"],
                                                             r["end_frac"]), **r) for r in records])


PATHWAYS = register(Stage(
    name="pathways",
    description="Symmetry-distinct hops of the migrating ion per structure, shortest first.",
    input_table="structures",
    output_table="pathways",
    inputs=_pathways_inputs,
    parameters=_pathways_parameters,
    load=_pathways_load,
    store=_pathways_store,
    fingerprint=lambda c: c.fingerprint,
    rankers=(BY_ID, Ranker("smallest", "fewest sites first", expression=lambda c: c.nsites)),
    default_ranker="id",
    entrypoint="flows/pathways.py:pathways",
    producer=structure_producer,
    resources="local",
    min_chunk_items=8,  # ~0.5 core-s per structure: a Dask task per item would cost more than the item
    batch_size=20,
    retry_limit=2,
    lease_seconds=1800,
))


# ---------------------------------------------------------------- features: pathways -> features

FEATURE_COLUMNS = tuple(c.name for c in Features.__table__.columns if c.name not in ("id", "created_at", "run_id",
                                                                                    "pathway_id"))
"""Columns of `features` that hold tasks.features.PathwayFeatures' fields."""


def _features_inputs() -> Any:
    return select(Pathway.id.label("item_id"), Pathway.length, Pathway.rank, Pathway.ion, Pathway.structure_id,
                  Pathway.fingerprint)


def _features_parameters(settings: Settings) -> dict[str, Any]:
    return {"nimages": settings.nimages, "min_length": settings.supercell_min_length,
            "min_atoms": settings.supercell_min_atoms, "max_atoms": settings.supercell_max_atoms}


def _features_load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    rows = session.execute(select(Pathway, Structure.structure, Structure.formula)
                           .join(Structure, Structure.id == Pathway.structure_id)
                           .where(Pathway.id.in_(list(ids))))
    return {p.id: {"pathway_id": p.id, "structure_id": p.structure_id, "formula": formula, "structure": structure,
                   "pathway": pathway_fields(p)} for p, structure, formula in rows}


def _features_store(session: Session, run: Run, result: Any) -> None:
    if isinstance(result, Reused):
        old = session.scalars(select(Features).where(Features.run_id == result.run.id)).one()
        values = {name: getattr(old, name) for name in FEATURE_COLUMNS}
    else:
        values = asdict(result)
    session.add(Features(run_id=run.id, pathway_id=run.input_id, **values))


FEATURES = register(Stage(
    name="features",
    description="Barrier predictors per pathway: radii overlap and Ewald energy along the IDPP path, geometry.",
    input_table="pathways",
    output_table="features",
    inputs=_features_inputs,
    parameters=_features_parameters,
    load=_features_load,
    store=_features_store,
    fingerprint=lambda c: c.fingerprint,
    rankers=(BY_ID, Ranker("shortest", "shortest hop first", expression=lambda c: c.length)),
    default_ranker="id",
    entrypoint="flows/features.py:features",
    producer=pathway_producer,
    resources="local",
    min_chunk_items=2,  # ~4 core-s per pathway
    batch_size=20,
    retry_limit=2,
    lease_seconds=1800,
))


# ---------------------------------------------------------------- barriers: pathways -> estimates -> neb

BARRIER_COLUMNS = tuple(c.name for c in Estimate.__table__.columns if c.name not in ("id", "created_at", "run_id",
                                                                                   "pathway_id"))
"""Columns of `estimates` and `neb` that hold tasks.engines.BarrierResult's fields."""
OVERLAP_UNKNOWN = 1e9
"""Rank key of a pathway without a cation overlap change (no cation near the path): ranked last."""
MAX_OVERLAP_CHANGE = 1.0
"""Default estimates cutoff on features.overlap_cation_max_change (Å); the bundled set tops out near 0.5 Å."""
MAX_ESTIMATE = 1.0
"""Default neb cutoff on the best converged estimate (eV)."""
NEB_LEASE_SECONDS = 48 * 3600.0
"""A VASP NEB may run for a day or two on a node."""
LEARNING_DESCRIPTIONS = {
    "predicted": "lowest barrier predicted by the newest barrier model first (diverse until a model exists)",
    "uncertain": "largest uncertainty of the newest barrier model first (diverse until a model exists)",
    "mixed": "lowest predicted barrier minus its uncertainty first (diverse until a model exists)",
    "diverse": "farthest in feature space from the pathways with an accurate barrier first",
}


def learning_rankers(stage: str) -> tuple[Ranker, ...]:
    """The learning loop's rankers on a barrier stage (scores from hopflow.loop, refreshed after each retrain)."""
    return tuple(Ranker(name, LEARNING_DESCRIPTIONS[name], score=model_ranker_scores(name, stage))
                 for name in LEARNING_RANKERS)


def _image_parameters(settings: Settings) -> dict[str, Any]:
    return {"nimages": settings.nimages, "min_length": settings.supercell_min_length,
            "min_atoms": settings.supercell_min_atoms, "max_atoms": settings.supercell_max_atoms}


def barrier_values(result: Any) -> dict[str, Any]:
    """A BarrierResult's fields as `estimates`/`neb` column values (JSON-ready)."""
    data = result.model_dump(mode="json")
    return {name: data[name] for name in BARRIER_COLUMNS if name in data}


def _barrier_store(table: Any) -> Any:
    def store(session: Session, run: Run, result: Any) -> None:
        if isinstance(result, Reused):
            old = session.scalars(select(table).where(table.run_id == result.run.id)).one()
            values = {name: getattr(old, name) for name in BARRIER_COLUMNS}
        else:
            barrier = getattr(result, "result", result)  # a pathway barrier carries its vacancies beside the result
            values = barrier_values(barrier) | {"start_vacancy_id": getattr(result, "start_vacancy_id", None),
                                                "end_vacancy_id": getattr(result, "end_vacancy_id", None)}
        session.add(table(run_id=run.id, pathway_id=run.input_id, **values))

    return store


# ---------------------------------------------------------------- vacancies: vacancy sites -> relaxed vacancies

VACANCY_REVISION = "1"
"""Revision of the vacancy relaxation (bulk relaxation, supercell order, checks); a change re-relaxes."""


def vacancy_parameters(settings: Settings, model: str | None = None) -> dict[str, Any]:
    """What a relaxed vacancy depends on: the potential and the relaxation settings, never the barrier engine, so
    every ML engine with the same model shares one relaxation."""
    model = canonical_model(model or settings.barrier_model)
    return {"model": model, "model_version": model_version(model), "revision": VACANCY_REVISION,
            "bulk_fmax": settings.bulk_fmax, "bulk_steps": settings.bulk_steps, "fmax": settings.vacancy_fmax,
            "steps": settings.vacancy_steps, "optimizer": settings.vacancy_optimizer,
            "fill_distance": settings.vacancy_fill_distance, "max_displacement": settings.vacancy_max_displacement}


def vacancy_site_producer(session: Session, site_id: int) -> Run | None:
    """The import run of the structure a vacancy site belongs to."""
    site = session.get(VacancySite, site_id)
    return structure_producer(session, site.structure_id) if site else None


def _vacancies_inputs() -> Any:
    return (select(VacancySite.id.label("item_id"), VacancySite.structure_id, VacancySite.nsites,
                   VacancySite.fingerprint))


def _vacancies_load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    rows = session.execute(select(VacancySite, Structure.structure, Structure.formula)
                           .join(Structure, Structure.id == VacancySite.structure_id)
                           .where(VacancySite.id.in_(list(ids))))
    return {site.id: {"site_id": site.id, "structure_id": site.structure_id, "formula": formula,
                      "structure": structure, "supercell": site.supercell, "site_index": site.site_index,
                      "site_label": site.site_label} for site, structure, formula in rows}


VACANCY_COLUMNS = tuple(c.name for c in Vacancy.__table__.columns if c.name not in ("id", "created_at", "run_id",
                                                                                   "site_id", "structure_id"))


def _vacancies_store(session: Session, run: Run, result: Any) -> None:
    site = session.get(VacancySite, run.input_id)
    if isinstance(result, Reused):
        old = session.scalars(select(Vacancy).where(Vacancy.run_id == result.run.id)).one()
        values = {name: getattr(old, name) for name in VACANCY_COLUMNS}
    else:
        values = {name: getattr(result, name) for name in VACANCY_COLUMNS}
    session.add(Vacancy(run_id=run.id, site_id=run.input_id, structure_id=site.structure_id, **values))


VACANCIES = register(Stage(
    name="vacancies",
    description="Relaxed vacancy supercells per symmetry-distinct ion site (bulk relaxed first), shared by every "
                "pathway they end, under one model and relaxation settings.",
    input_table="vacancy_sites",
    output_table="vacancies",
    inputs=_vacancies_inputs,
    parameters=lambda settings: vacancy_parameters(settings),
    load=_vacancies_load,
    store=_vacancies_store,
    fingerprint=lambda c: c.fingerprint,
    rankers=(BY_ID, Ranker("smallest", "fewest supercell atoms first", expression=lambda c: c.nsites)),
    default_ranker="id",
    entrypoint="flows/vacancies.py:vacancies",
    producer=vacancy_site_producer,
    resources="local",
    batch_size=10,
    retry_limit=2,
    lease_seconds=3600,
))


# ---------------------------------------------------------------- estimates and neb: pathways -> barriers

PHYSICS_EWALD_WEIGHT = 0.25
"""Å per eV: one eV of electrostatic rise along the path counts as 0.25 Å of cation-overlap rise in the `physics`
ranker (the bundled set spans 0-1.4 eV and 0.05-0.52 Å: both terms then weigh alike; docs/features.md)."""
PHYSICS_ISOLATED_PENALTY = 0.5
"""Å added to the `physics` key of a hop that alone forms no infinite network (dimensionality 0: a hop around one
polyhedron), so that hops that can carry long-range transport are estimated first."""


def physics_score(c: Any) -> Any:
    """The `physics` rank key (lower first): steric hindrance (cation overlap rise, Å) plus weighted electrostatic
    hindrance (Ewald rise, eV) along the path, and a penalty for hops that alone percolate in no direction."""
    isolated = case((c.dimensionality == 0, PHYSICS_ISOLATED_PENALTY), else_=0.0)
    return func.coalesce(c.overlap, 0.0) + PHYSICS_EWALD_WEIGHT * func.coalesce(c.ewald, 0.0) + isolated


def _estimates_inputs() -> Any:
    predictors = (select(Features.pathway_id, func.min(Features.overlap_cation_max_change).label("overlap"),
                         func.min(Features.ewald_energy_change).label("ewald"))
                  .group_by(Features.pathway_id).subquery())
    return (select(Pathway.id.label("item_id"), Pathway.length, Pathway.structure_id, Pathway.fingerprint,
                   Pathway.dimensionality, predictors.c.overlap, predictors.c.ewald)
            .join(predictors, predictors.c.pathway_id == Pathway.id))


def _estimates_parameters(settings: Settings) -> dict[str, Any]:
    engine = engine_parameters(settings.estimate_engine)
    model = engine["engine_settings"].get("model")
    return {**engine, **_image_parameters(settings), "vacancy": vacancy_parameters(settings, model)}


def _estimates_engine_parameters(name: str, model: str | None = None) -> dict[str, Any]:
    """An engine choice on the command line: its identity and the vacancies its model needs."""
    engine = engine_parameters(name, model)
    chosen = engine["engine_settings"].get("model")
    return {**engine, "vacancy": vacancy_parameters(get_settings(), chosen)}


def _barrier_load(session: Session, ids: Sequence[int]) -> dict[int, Any]:
    """A pathway's payload (as features'), with the vacancy sites and relaxed vacancies of its structure."""
    payloads = _features_load(session, ids)
    structure_ids = {p["structure_id"] for p in payloads.values()}
    sites = session.scalars(select(VacancySite).where(VacancySite.structure_id.in_(structure_ids))).all()
    relaxed = session.execute(select(Vacancy, Run.param_hash).join(Run, Run.id == Vacancy.run_id)
                              .where(Vacancy.structure_id.in_(structure_ids))).all()
    for payload in payloads.values():
        sid = payload["structure_id"]
        payload["vacancy_sites"] = [{"site_id": v.id, "supercell": v.supercell, "site_index": v.site_index}
                                    for v in sites if v.structure_id == sid]
        payload["vacancies"] = [{"vacancy_id": v.id, "site_id": v.site_id, "param_hash": phash,
                                 "structure": v.structure, "bulk_structure": v.bulk_structure, "energy": v.energy,
                                 "flag": v.flag, "flag_reason": v.flag_reason}
                                for v, phash in relaxed if v.structure_id == sid]
    return payloads


ESTIMATES = register(Stage(
    name="estimates",
    description="Cheap barrier per featurized pathway with an ML potential between relaxed, shared vacancy "
                "endpoints (mlip-idpp by default, or mlip-neb); flagged unless the path is a well-defined hop.",
    input_table="pathways",
    output_table="estimates",
    inputs=_estimates_inputs,
    parameters=_estimates_parameters,
    load=_barrier_load,
    store=_barrier_store(Estimate),
    fingerprint=lambda c: c.fingerprint,
    rankers=(BY_ID, Ranker("physics", "least steric and electrostatic hindrance along the path first (cation "
                           "overlap rise + 0.25 Å/eV × Ewald rise, + 0.5 Å for a hop that alone percolates nowhere)",
                           expression=physics_score),
             Ranker("shortest", "shortest hop first", expression=lambda c: c.length),
             Ranker("overlap", "smallest rise of the cation radii overlap along the path first",
                    expression=lambda c: func.coalesce(c.overlap, OVERLAP_UNKNOWN)),
             *learning_rankers("estimates")),
    default_ranker="physics",
    cutoffs=(Cutoff("max_overlap_change", "largest cation overlap change along the path (Å; path_overlap_cutoff)",
                    default=MAX_OVERLAP_CHANGE, criterion=lambda c, v: or_(c.overlap.is_(None), c.overlap <= v),
                    broaden_step=0.25, broaden_limit=3.0),),
    entrypoint="flows/estimates.py:estimates",
    producer=pathway_producer,
    engine_choice=_estimates_engine_parameters,
    resources="local",
    batch_size=10,
    retry_limit=2,
    lease_seconds=3600,
))


def _neb_inputs() -> Any:
    best = (select(Estimate.pathway_id, func.min(Estimate.barrier).label("estimate"))
            .where(trusted(Estimate)).group_by(Estimate.pathway_id).subquery())
    return (select(Pathway.id.label("item_id"), Pathway.length, Pathway.structure_id, Pathway.fingerprint,
                   best.c.estimate)
            .join(best, best.c.pathway_id == Pathway.id))


def _neb_parameters(settings: Settings) -> dict[str, Any]:
    return {**engine_parameters("vasp-neb"), **_image_parameters(settings)}


NEB = register(Stage(
    name="neb",
    description="VASP CI-NEB barrier (through custodian) of pathways whose best trusted estimate is low enough.",
    input_table="pathways",
    output_table="neb",
    inputs=_neb_inputs,
    parameters=_neb_parameters,
    load=_features_load,
    store=_barrier_store(NebResult),
    fingerprint=lambda c: c.fingerprint,
    rankers=(BY_ID, Ranker("estimate", "lowest trusted estimate first", expression=lambda c: c.estimate),
             Ranker("shortest", "shortest hop first", expression=lambda c: c.length), *learning_rankers("neb")),
    default_ranker="estimate",
    cutoffs=(Cutoff("max_estimate", "largest best trusted estimate (eV)", default=MAX_ESTIMATE,
                    criterion=lambda c, v: c.estimate <= v, broaden_step=0.25, broaden_limit=2.0),),
    entrypoint="flows/neb.py:neb",
    producer=pathway_producer,
    engine_choice=engine_parameters,
    resources="slurm-vasp",
    batch_size=1,
    retry_limit=3,
    lease_seconds=NEB_LEASE_SECONDS,
))
