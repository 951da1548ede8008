"""Estimates stage flow: relax the vacancies the claimed pathways need (once each, through the vacancies stage), then
a cheap ML-potential barrier per pathway between those relaxed endpoints (tasks.vacancies + tasks.engines)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from pymatgen.core import Structure

from hopflow import queue
from hopflow.db import session_scope
from hopflow.errors import EngineError
from hopflow.flows.common import stage_run_name, stage_task_runner
from hopflow.flows.features import pathway_record
from hopflow.flows.runner import StageReport, claim_all, holding_claims, run_stage
from hopflow.flows.vacancies import relax_vacancy_site
from hopflow.queue import param_hash
from hopflow.registry import get_stage
from hopflow.settings import get_settings
from hopflow.stages.barriers import EngineParams
from hopflow.stages.estimates import EstimatesParams
from hopflow.stages.features import ImageParams
from hopflow.stages.pathways import lattice_parameters
from hopflow.tasks.engines import BarrierResult, compute_barrier, get_engine
from hopflow.tasks.engines.mlip import idpp_path, with_known_energy
from hopflow.tasks.images import hop_images
from hopflow.tasks.vacancies import VacancySymmetry, hop_endpoints
from hopflow.vacancies import SiteRow, ensure_sites, settled, site_states

WORK_DIR = "work"
"""Work directories live under Settings.home / WORK_DIR."""
VACANCY_POLL_S = 5.0
"""Seconds between looks at vacancies another flow run is relaxing."""
SAME_BULK_TOL = 1e-8
"""Two relaxed vacancies reuse their energies as endpoint energies only when relaxed from one bulk (Å, fractional)."""
SYMMETRY_CACHE_SIZE = 16
"""Structures whose vacancy supercell and orbits a worker keeps (pathways of one structure come in rank order, not
together)."""


@dataclass(frozen=True)
class PathwayBarrier:
    """A barrier result with the two relaxed vacancies its endpoints were mapped from."""

    result: BarrierResult
    start_vacancy_id: int | None
    end_vacancy_id: int | None


def barrier_workdir(stage: str, pathway_id: int, params: EngineParams) -> Path:
    """The one work directory of a pathway under a parameter set: a retry continues in the same place."""
    return get_settings().home / WORK_DIR / f"{stage}-{pathway_id}-{param_hash(params.as_dict())[:8]}"


def _engine(params: EngineParams) -> Any:
    engine = get_engine(params.engine, params.engine_settings)
    if engine.version != params.engine_version:
        raise EngineError(f"this worker has {engine.name} {engine.version}, the run asks for {params.engine_version}")
    return engine


def vacancy_symmetry(item: dict[str, Any], params: ImageParams) -> VacancySymmetry:
    """The supercell and vacancy orbits of a pathway's structure under the run's supercell bounds."""
    return _vacancy_symmetry(json.dumps(item["structure"], sort_keys=True), item["pathway"]["ion"],
                             params.min_length, params.min_atoms, params.max_atoms)


@lru_cache(maxsize=SYMMETRY_CACHE_SIZE)
def _vacancy_symmetry(structure_json: str, ion: str, min_length: float, min_atoms: int,
                      max_atoms: int) -> VacancySymmetry:
    # once per structure and worker, not once per pathway (1.2-1.8 s for CaF2 and KMgF3: symmetry and supercell)
    return VacancySymmetry.of(Structure.from_dict(json.loads(structure_json)), ion, min_length=min_length,
                              min_atoms=min_atoms, max_atoms=max_atoms)


@task(name="needed-vacancies")
def needed_vacancies(items: Sequence[dict[str, Any]], params: ImageParams) -> list[SiteRow]:
    """The vacancy sites (orbit representatives) the pathways' two endpoints come from, once each."""
    rows: dict[tuple[int, str, int], SiteRow] = {}
    by_structure: dict[int, VacancySymmetry] = {}
    for item in items:
        sid = item["structure_id"]
        try:
            if sid not in by_structure:
                by_structure[sid] = vacancy_symmetry(item, params)
            symmetry = by_structure[sid]
            sites = symmetry.hop_sites(item["pathway"]["start_frac"], item["pathway"]["end_frac"])
        except Exception:  # noqa: BLE001  (a bad pathway fails on its own, with this reason, when it is estimated)
            continue
        for site in sites:
            spec, _ = symmetry.canonical(site)
            key = (sid, symmetry.supercell.key, spec.site_index)
            rows[key] = SiteRow(sid, symmetry.supercell.key, spec.site_index, spec.site_label, len(spec.orbit),
                                len(symmetry.sites.structure), spec.stored_frac)
    return list(rows.values())


def relax_needed_vacancies(run_ids: Sequence[int]) -> None:
    """Relax, through the vacancies stage, the vacancies the claimed estimate runs need and nobody relaxed yet; wait
    for those another flow run holds. Pathways whose vacancies fail then fail with the vacancies' reason."""
    logger = get_run_logger()
    stage, vacancies = get_stage("estimates"), get_stage("vacancies")
    with session_scope() as session:
        runs = queue.runs(session, run_ids)
        payloads = stage.load(session, [r.input_id for r in runs])
    groups: dict[str, tuple[EstimatesParams, list[dict[str, Any]]]] = {}
    for run in runs:
        if run.input_id in payloads:
            params = EstimatesParams.from_mapping(run.parameters)
            groups.setdefault(param_hash(run.parameters), (params, []))[1].append(payloads[run.input_id])
    for params, items in groups.values():
        try:
            rows = needed_vacancies(items, params)
        except Exception as exc:  # noqa: BLE001  (a structure without a supercell fails its own pathways later)
            logger.warning(f"vacancy sites of this batch could not all be found: {exc}")
            continue
        lattices = {item["structure_id"]: lattice_parameters(item["structure"]) for item in items}
        with session_scope(write=True) as session:
            site_ids = sorted(ensure_sites(session, rows, lattices)[(r.structure_id, r.supercell, r.site_index)]
                              for r in rows)
            claimed = queue.claim_ids(session, vacancies, site_ids, parameters=params.vacancy.as_dict())
        if claimed:
            run_stage("vacancies", [c.id for c in claimed], relax_vacancy_site)
        _wait_for(site_ids, params.vacancy.as_dict(), vacancies.lease)


def _wait_for(site_ids: Sequence[int], parameters: dict[str, Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope() as session:
            if settled(site_states(session, site_ids, parameters), site_ids):
                return
        time.sleep(VACANCY_POLL_S)


def _relaxed(item: dict[str, Any], site_id: int, phash: str) -> dict[str, Any]:
    for vacancy in item["vacancies"]:
        if vacancy["site_id"] == site_id and vacancy["param_hash"] == phash:
            return vacancy
    raise EngineError(f"vacancy site {site_id} has no relaxed vacancy under these settings yet (its vacancies run "
                      "failed or is still running)")


def relaxed_pathway_barrier(stage: str, item: dict[str, Any], params: EstimatesParams) -> PathwayBarrier:
    """The pathway's barrier between its two relaxed vacancy endpoints (mapped by symmetry), IDPP images between."""
    engine = _engine(params)
    record = pathway_record(item["pathway"])
    record.as_hop(Structure.from_dict(item["structure"]))  # InputError, never retried, unless a hop of it
    symmetry = vacancy_symmetry(item, params)
    a, b = symmetry.hop_sites(record.start_frac, record.end_frac)
    site_ids = {(v["supercell"], v["site_index"]): v["site_id"] for v in item["vacancy_sites"]}
    phash = param_hash(params.vacancy.as_dict())
    vacancy = {}
    for site in (a, b):
        spec, _ = symmetry.canonical(site)
        key = (symmetry.supercell.key, spec.site_index)
        if key not in site_ids:
            raise EngineError(f"vacancy site {spec.site_label} #{spec.site_index} of this supercell is not stored yet")
        vacancy[site] = _relaxed(item, site_ids[key], phash)
    bulk = Structure.from_dict(vacancy[b]["bulk_structure"])
    relaxed = {symmetry.canonical(s)[0].site_index: Structure.from_dict(vacancy[s]["structure"]) for s in (a, b)}
    ends = hop_endpoints(symmetry, bulk, record.start_frac, record.end_frac, relaxed)
    images = idpp_path(ends.start, ends.end, params.nimages)
    model = params.vacancy.model
    if (model == getattr(engine.settings, "model", None)
            and _same_structure(vacancy[a]["bulk_structure"], vacancy[b]["bulk_structure"])):
        # each endpoint is a relaxed vacancy moved by a symmetry operation: its energy is the vacancy's
        images = [with_known_energy(images[0], vacancy[b]["energy"], model), *images[1:-1],
                  with_known_energy(images[-1], vacancy[a]["energy"], model)]
    result = compute_barrier(engine.name, images, barrier_workdir(stage, item["pathway_id"], params),
                             engine.settings)
    for end, v in (("start", vacancy[b]), ("end", vacancy[a])):
        if v["flag"] != "ok" and result.flag == "ok":
            result = result.flagged(v["flag"], f"{end} vacancy (#{v['vacancy_id']}): {v['flag_reason']}")
    return PathwayBarrier(result, start_vacancy_id=vacancy[b]["vacancy_id"], end_vacancy_id=vacancy[a]["vacancy_id"])


def _same_structure(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """True when two stored structures are one (the endpoints are both built on one of their bulks)."""
    a, b = Structure.from_dict(first), Structure.from_dict(second)
    return (len(a) == len(b) and np.allclose(a.lattice.matrix, b.lattice.matrix, atol=SAME_BULK_TOL)
            and np.allclose(a.frac_coords, b.frac_coords, atol=SAME_BULK_TOL))


def pathway_barrier(stage: str, item: dict[str, Any], params: EngineParams) -> BarrierResult:
    """The barrier from the hop's unrelaxed supercell images (the engine relaxes what it needs: VASP's endpoints)."""
    engine = _engine(params)
    structure = Structure.from_dict(item["structure"])
    images = hop_images(structure, pathway_record(item["pathway"]), **params.images())
    workdir = barrier_workdir(stage, item["pathway_id"], params)
    return compute_barrier(engine.name, images, workdir, engine.settings)


@task(name="estimate-barrier")
def estimate_barrier(item: dict[str, Any], params: EstimatesParams) -> PathwayBarrier:
    """The barrier estimate of one stored pathway (flagged, without a barrier, unless the path is a clean hop)."""
    return relaxed_pathway_barrier("estimates", item, params)


@flow(name="estimates", flow_run_name=lambda: stage_run_name("estimates"),
      task_runner=stage_task_runner("estimates"))
def estimates(run_ids: list[int] | None = None, parameters: dict[str, Any] | None = None) -> StageReport:
    """Estimate barriers of the claimed runs' pathways, or of every eligible pathway when `run_ids` is None."""
    ids = list(run_ids) if run_ids is not None else claim_all("estimates", parameters)
    try:
        with holding_claims(ids, "estimates", release_at_end=False):  # relaxing may outlast the estimates' lease
            relax_needed_vacancies(ids)
    except Exception as exc:  # noqa: BLE001  (each pathway then fails on its own, with its vacancy's reason)
        get_run_logger().warning(f"relaxing the needed vacancies failed: {type(exc).__name__}: {exc}")
    return run_stage("estimates", ids, estimate_barrier)
