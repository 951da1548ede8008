"""The vacancy sites a claimed barrier run needs: their rows (the vacancies stage's inputs) and their relaxations."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from hopflow.fingerprints import vacancy_site_fingerprint
from hopflow.models import Run, RunState, Structure, VacancySite
from hopflow.queue import _insert, param_hash


@dataclass(frozen=True)
class SiteRow:
    """A vacancy site as the estimates flow found it (tasks.vacancies.VacancySiteSpec, located in a structure)."""

    structure_id: int
    supercell: str
    site_index: int
    site_label: str
    orbit_size: int
    nsites: int
    stored_frac: tuple[float, float, float]


def ensure_sites(session: Session, rows: Iterable[SiteRow], lattices: Mapping[int, Sequence[float]]) -> dict[
        tuple[int, str, int], int]:
    """Insert the vacancy sites not stored yet (never twice: unique per structure, supercell, site); returns
    (structure id, supercell, site index) -> site id for every given row."""
    rows = list(rows)
    if not rows:
        return {}
    fingerprints: dict[int, str] = {structure_id: fingerprint for structure_id, fingerprint in session.execute(
        select(Structure.id, Structure.fingerprint).where(Structure.id.in_({r.structure_id for r in rows})))}
    values = [{"structure_id": r.structure_id, "supercell": r.supercell, "site_index": r.site_index,
               "site_label": r.site_label, "orbit_size": r.orbit_size, "nsites": r.nsites,
               "fingerprint": vacancy_site_fingerprint(fingerprints[r.structure_id], lattices[r.structure_id],
                                                       r.supercell, r.stored_frac)} for r in rows]
    session.execute(_insert(session, VacancySite.__table__).on_conflict_do_nothing(), values)
    stored = session.scalars(select(VacancySite).where(VacancySite.structure_id.in_({r.structure_id for r in rows})))
    return {(v.structure_id, v.supercell, v.site_index): v.id for v in stored}


def site_states(session: Session, site_ids: Sequence[int], parameters: Mapping[str, object]) -> dict[int, str]:
    """The state of each site's vacancies run under these parameters (sites without a run are left out)."""
    rows = session.execute(select(Run.input_id, Run.state).where(
        Run.stage == "vacancies", Run.param_hash == param_hash(parameters), Run.input_id.in_(list(site_ids))))
    return {site_id: state for site_id, state in rows}


def settled(states: Mapping[int, str], site_ids: Iterable[int]) -> bool:
    """True when no site's run is still queued, claimed or running."""
    return all(states.get(i) in (RunState.DONE, RunState.FAILED) for i in site_ids)
