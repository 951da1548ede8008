"""The two leaderboards, from one place: the best trusted barrier per pathway and the percolation barriers E*(d) per
structure (docs/estimates.md); the CLI and the controller's artifacts both read them here."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hopflow.models import CalibrationRow, Estimate, NebResult, Pathway, Run, Structure, Vacancy, VacancySite
from hopflow.models.barriers import BarrierRow, trusted
from hopflow.percolation import HopBarrier, MaterialBarriers, material_barriers, unestimated
from hopflow.retraining import latest_calibrations

ENGINE_TIERS = ("vasp-neb", "mlip-neb", "mlip-idpp")
"""Most trusted first: a pathway's barrier comes from the first tier with a trusted one, the newest within it."""
TABLES: tuple[type[BarrierRow], ...] = (NebResult, Estimate)


@dataclass(frozen=True)
class PathwayEntry:
    """One pathway's best trusted barrier, or (barrier None) the flag of its best result when none is trusted."""

    formula: str
    structure_id: int
    pathway_id: int
    hop_length: float
    barrier: float | None
    engine: str
    model: str | None
    table: str
    result_id: int
    """The row's id in `table`."""
    run_id: int
    flag: str
    """`ok`, or the flag of the best available result (intermediate-minimum, vacancy-moved, unconverged, unchecked)."""
    flag_reason: str | None
    model_spread: float | None = None
    """|difference| (eV) of the newest trusted barriers of two models of the same engine: a spread, not an error."""
    calibrated_barrier: float | None = None
    """An estimate corrected by the newest calibration of its engine against VASP (None for VASP barriers)."""
    calibration: str | None = None
    """Marks a calibrated value: 'calibrated <engine> -> vasp-neb (n pairs)'."""


@dataclass(frozen=True)
class MaterialEntry:
    """One structure's percolation barriers E*(d) (eV) or their bounds, per dimensionality, with what they rest on."""

    formula: str
    structure_id: int
    e_star_3d: float | None
    lower_3d: float | None
    upper_3d: float | None
    status_3d: str
    e_star_2d: float | None
    lower_2d: float | None
    upper_2d: float | None
    status_2d: str
    e_star_1d: float | None
    lower_1d: float | None
    upper_1d: float | None
    status_1d: str
    hops_known: int
    """Distinct hops with a trusted barrier."""
    hops_total: int
    """Distinct hops found (more than the stored ones when max_paths cut them)."""
    cut_off: str | None
    """Why the stored hops may not be all (automatic max_hop, max_paths); None when they are."""
    mode: str
    """`ts` (thresholds over transition-state energies) or `barrier`."""
    pathways_3d: tuple[int, ...]
    pathways_2d: tuple[int, ...]
    pathways_1d: tuple[int, ...]
    pathways_run_id: int
    """The pathways run whose hops make the network (the structure's newest)."""

    def e_star_text(self, d: int, dash: str = " – ") -> str:
        """E*(d) with 3 decimals, `none`, or its bounds `lower – upper (incomplete)` (`?`: no upper bound)."""
        status = getattr(self, f"status_{d}d")
        if status == "complete":
            return f"{getattr(self, f'e_star_{d}d'):.3f}"
        if status == "none":
            return "none"
        lower, upper = getattr(self, f"lower_{d}d"), getattr(self, f"upper_{d}d")
        return f"{lower:.3f}{dash}{'?' if upper is None else f'{upper:.3f}'} (incomplete)"

    @classmethod
    def of(cls, formula: str, structure_id: int, run_id: int, answer: MaterialBarriers, *, known: int, total: int,
           cut_off: str | None) -> MaterialEntry:
        """Flatten a structure's MaterialBarriers into one row."""
        per_d: dict[str, Any] = {}
        for d in (3, 2, 1):
            p = answer.at(d)
            per_d |= {f"e_star_{d}d": p.e_star, f"lower_{d}d": p.lower, f"upper_{d}d": p.upper,
                      f"status_{d}d": p.status, f"pathways_{d}d": p.pathway_ids}
        return cls(formula=formula, structure_id=structure_id, hops_known=known, hops_total=total,
                   cut_off=cut_off, mode=answer.mode, pathways_run_id=run_id, **per_d)

    def value(self, d: int) -> float | None:
        """The ranking value of dimensionality d: E* when complete, else the upper bound."""
        return getattr(self, f"e_star_{d}d") if getattr(self, f"status_{d}d") == "complete" \
            else getattr(self, f"upper_{d}d")


@dataclass(frozen=True)
class _Result:
    """One stored barrier row as the leaderboards read it (barrier None unless it passes `trusted`)."""

    table: str
    id: int
    run_id: int
    pathway_id: int
    engine: str
    model: str | None
    barrier: float | None
    trusted: bool
    flag: str
    flag_reason: str | None
    formula: str
    structure_id: int
    hop_length: float


def _results(session: Session) -> list[_Result]:
    """Every barrier row of both tables with its pathway's structure; trust decided by `trusted(table)`."""
    out = []
    for table in TABLES:
        query = (select(table.id, table.run_id, table.pathway_id, table.engine, table.model, table.barrier,
                        trusted(table).label("trusted"), table.flag, table.flag_reason, Structure.formula,
                        Pathway.structure_id, Pathway.length)
                 .join(Pathway, Pathway.id == table.pathway_id).join(Structure, Structure.id == Pathway.structure_id))
        for row in session.execute(query):
            ok = bool(row.trusted)
            out.append(_Result(table.__tablename__, row.id, row.run_id, row.pathway_id, row.engine, row.model,
                               row.barrier if ok else None, ok, row.flag, row.flag_reason, row.formula,
                               row.structure_id, row.length))
    return out


def _rank(result: _Result) -> tuple[bool, int, int]:
    """Trusted first, then by engine tier, newest first."""
    tier = ENGINE_TIERS.index(result.engine) if result.engine in ENGINE_TIERS else len(ENGINE_TIERS)
    return (not result.trusted, tier, -result.id)


def _spread(results: Iterable[_Result], best: _Result) -> float | None:
    """Largest difference between the newest trusted barriers of the models of the best result's engine."""
    newest: dict[str, float] = {}
    for r in sorted(results, key=lambda r: r.id):
        if r.trusted and r.engine == best.engine and r.model is not None and r.barrier is not None:
            newest[r.model] = r.barrier
    return max(newest.values()) - min(newest.values()) if len(newest) > 1 else None


def _entry(results: Sequence[_Result], calibrations: Mapping[str, CalibrationRow]) -> PathwayEntry:
    """A pathway's entry from all its results: the best one, its model spread and calibration."""
    best = min(results, key=_rank)
    entry = PathwayEntry(formula=best.formula, structure_id=best.structure_id, pathway_id=best.pathway_id,
                         hop_length=best.hop_length, barrier=best.barrier, engine=best.engine, model=best.model,
                         table=best.table, result_id=best.id, run_id=best.run_id, model_spread=_spread(results, best),
                         flag="ok" if best.trusted else best.flag,
                         flag_reason=None if best.trusted else best.flag_reason)
    cal = calibrations.get(entry.engine) if entry.table == Estimate.__tablename__ else None
    if cal is None or entry.barrier is None:
        return entry
    return replace(entry, calibrated_barrier=cal.slope * entry.barrier + cal.intercept,
                   calibration=f"calibrated {cal.source} -> {cal.reference} ({cal.n} pairs)")


def pathway_leaderboard(session: Session, limit: int | None = None) -> list[PathwayEntry]:
    """Best trusted barrier per pathway (vasp-neb > mlip-neb > mlip-idpp, newest within a tier), lowest first;
    pathways whose results are all flagged come last, without a barrier, with the flag of their best result."""
    by_pathway: dict[int, list[_Result]] = defaultdict(list)
    for result in _results(session):
        by_pathway[result.pathway_id].append(result)
    calibrations = latest_calibrations(session)
    entries = sorted((_entry(rows, calibrations) for rows in by_pathway.values()),
                     key=lambda e: (e.barrier is None, e.barrier or 0.0, e.pathway_id))
    return entries[:limit] if limit is not None else entries


# ---------------------------------------------------------------- per material


def _newest_pathways(session: Session) -> dict[int, list[Pathway]]:
    """Per structure, the pathway rows of its newest pathways run, by rank."""
    rows: dict[tuple[int, int], list[Pathway]] = defaultdict(list)
    for pathway in session.scalars(select(Pathway).order_by(Pathway.rank, Pathway.id)):
        rows[(pathway.structure_id, pathway.run_id)].append(pathway)
    newest: dict[int, int] = {}
    for structure_id, run_id in rows:
        newest[structure_id] = max(run_id, newest.get(structure_id, run_id))
    return {structure_id: rows[(structure_id, run_id)] for structure_id, run_id in newest.items()}


def _cut_off(pathways: Sequence[Pathway], max_paths: int | None) -> str | None:
    """Why the stored hops may not be all the structure has; None when the search kept every hop it was asked for."""
    reasons = []
    if any(p.max_hop_automatic for p in pathways):
        reasons.append(f"automatic max_hop ({pathways[0].max_hop:.2f} Å)")
    found = pathways[0].hops_found
    if found is not None and found > len(pathways):
        reasons.append(f"max_paths kept {len(pathways)} of {found} hops")
    elif found is None and max_paths is not None and len(pathways) >= max_paths:
        reasons.append(f"max_paths kept {len(pathways)} hops, more may exist")
    return "; ".join(reasons) or None


def _energies(session: Session, chosen: Sequence[PathwayEntry]) -> dict[int, tuple[float, float, float]] | None:
    """(E_TS, E_start, E_end) per pathway when the chosen results share one table, engine and model and were mapped
    from relaxed vacancies of one supercell (their total energies then compare); None otherwise."""
    if not chosen or len({(e.table, e.engine, e.model) for e in chosen}) != 1:
        return None
    table = next(t for t in TABLES if t.__tablename__ == chosen[0].table)
    rows = session.execute(select(table.pathway_id, table.energies, table.start_vacancy_id, table.end_vacancy_id)
                           .where(table.id.in_([e.result_id for e in chosen]))).all()
    vacancies = {v for row in rows for v in (row.start_vacancy_id, row.end_vacancy_id)}
    if None in vacancies:
        return None
    supercells = session.scalars(select(VacancySite.supercell).join(Vacancy, Vacancy.site_id == VacancySite.id)
                                 .where(Vacancy.id.in_(vacancies)).distinct()).all()
    if len(supercells) != 1:
        return None
    return {row.pathway_id: (float(max(row.energies)), float(row.energies[0]), float(row.energies[-1]))
            for row in rows}


def _hops(pathways: Sequence[Pathway], best: Mapping[int, PathwayEntry],
          energies: Mapping[int, tuple[float, float, float]] | None) -> list[HopBarrier]:
    """The structure's hops with their known barriers (and energies, where they compare)."""
    hops = []
    for p in pathways:
        entry = best.get(p.id)
        ts, start, end = (energies or {}).get(p.id, (None, None, None))
        hops.append(HopBarrier(p.id, _vector(p.start_frac), _vector(p.end_frac), p.start_label, p.end_label,
                               entry.barrier if entry else None, ts, start, end))
    return hops


def _vector(values: Sequence[float]) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))


def _material(session: Session, formula: str, pathways: Sequence[Pathway], best: Mapping[int, PathwayEntry],
              max_paths: int | None) -> MaterialEntry:
    """One structure's entry from its newest pathways and their best trusted barriers."""
    structure_id = pathways[0].structure_id
    chosen = [best[p.id] for p in pathways if p.id in best and best[p.id].barrier is not None]
    cut = _cut_off(pathways, max_paths)
    if chosen:
        hops = _hops(pathways, {e.pathway_id: e for e in chosen}, _energies(session, chosen))
        from pymatgen.core import Structure as PmgStructure  # on use: only structures with barriers need it

        stored = session.execute(select(Structure.structure).where(Structure.id == structure_id)).scalar_one()
        answer = material_barriers(PmgStructure.from_dict(stored), hops, cut_off=cut is not None)
    else:
        answer = unestimated(max(p.dimensionality_cumlengths for p in pathways), cut_off=cut is not None)
    found = pathways[0].hops_found
    total = max(len(pathways), found or 0)
    return MaterialEntry.of(formula, structure_id, pathways[0].run_id, answer, known=len(chosen), total=total,
                            cut_off=cut)


def _material_order(entry: MaterialEntry) -> tuple[Any, ...]:
    """By the 3D value (E* or upper bound; complete first at equal value), then 2D, then 1D; no value last."""
    key: list[Any] = []
    for d in (3, 2, 1):
        value = entry.value(d)
        key += [value is None, value or 0.0, getattr(entry, f"status_{d}d") != "complete"]
    return (*key, entry.structure_id)


def material_leaderboard(session: Session, limit: int | None = None) -> list[MaterialEntry]:
    """Per structure with pathways: E*(1D/2D/3D) or bounds from the best trusted barrier of each of its hops (the
    same choice as `pathway_leaderboard`), ordered by the 3D value, then 2D, then 1D; structures with no answer last."""
    best = {e.pathway_id: e for e in pathway_leaderboard(session)}
    by_structure = _newest_pathways(session)
    formulas = {row.id: row.formula for row in session.execute(
        select(Structure.id, Structure.formula).where(Structure.id.in_(list(by_structure))))}
    run_ids = {rows[0].run_id for rows in by_structure.values()}
    max_paths = {run.id: (run.parameters or {}).get("max_paths")
                 for run in session.scalars(select(Run).where(Run.id.in_(list(run_ids))))}
    entries = sorted((_material(session, formulas[sid], rows, best, max_paths.get(rows[0].run_id))
                      for sid, rows in by_structure.items()), key=_material_order)
    return entries[:limit] if limit is not None else entries

