"""Database rows for leaderboard tests (a helper module, not a test module): a structure with one pathways run's
real hops, and barrier result rows (estimates, neb) each with its own run, as the stages would store them."""

from __future__ import annotations

from dataclasses import asdict

from pymatgen.core import Structure as PmgStructure
from sqlalchemy.orm import Session

from hopflow.models import Estimate, NebResult, Pathway, Run, Structure
from hopflow.tasks.pathways import PathwayRecord

CHGNET, SEVENNET = "chgnet-0.3.0", "7net-0"
PATHWAY_COLUMNS = {c.name for c in Pathway.__table__.columns}


def store_pathways(session: Session, formula: str, structure: PmgStructure, records: list[PathwayRecord], *,
                   max_paths: int, hops_found: int) -> tuple[int, list[int]]:
    """A structure and one pathways run's rows; returns the structure id and the pathway ids by rank."""
    run = Run(stage="pathways", input_id=0, param_hash=f"test-{formula}", parameters={"max_paths": max_paths},
              state="done")
    session.add(run)
    session.flush()
    row = Structure(formula=formula, chemsys="-".join(sorted(e.symbol for e in structure.composition)),
                    spacegroup="test", spacegroup_number=1, nsites=len(structure), density=structure.density,
                    volume=structure.volume, oxidation_states=None, oxidation_method=None,
                    fingerprint=f"fp-{formula}", structure=structure.as_dict(), run_id=run.id)
    session.add(row)
    session.flush()
    pathways = [Pathway(run_id=run.id, structure_id=row.id,
                        **{**{k: v for k, v in asdict(r).items() if k in PATHWAY_COLUMNS}, "hops_found": hops_found})
                for r in records]
    session.add_all(pathways)
    session.flush()
    return row.id, [p.id for p in pathways]


def barrier_row(table: type, pathway_id: int, barrier: float | None, *, flag: str = "ok", reason: str | None = None,
                engine: str = "mlip-idpp", model: str | None = CHGNET, energies: list[float] | None = None,
                vacancies: tuple[int, int] | None = None) -> Estimate | NebResult:
    """A result row (no run yet: add_results gives it one) with a flat profile of height `barrier`."""
    energies = energies or [0.0, barrier or 0.1, 0.0]
    start_vacancy, end_vacancy = vacancies or (None, None)
    return table(run_id=None, pathway_id=pathway_id, engine=engine, engine_version="test-1", barrier=barrier,
                 forward_barrier=barrier, reverse_barrier=barrier, flag=flag, flag_reason=reason, model=model,
                 start_vacancy_id=start_vacancy, end_vacancy_id=end_vacancy, converged=True, energies=energies,
                 relative_energies=[e - energies[0] for e in energies], reaction_coordinate=[0.0, 0.5, 1.0],
                 max_forces=[0.01] * 3, n_images=1, moving_index=0, steps=1, vacancy_mode="neutral", charge=0,
                 timings={}, settings={}, corrections=[], continued=False, versions={}, workdir=None)


def add_results(session: Session, *rows: Estimate | NebResult) -> None:
    """Rows in this order (the later, the newer), each with its own run."""
    for row in rows:
        run = Run(stage=row.__tablename__, input_id=row.pathway_id, param_hash=f"r{id(row)}", parameters={},
                  state="done")
        session.add(run)
        session.flush()
        row.run_id = run.id
        session.add(row)
        session.flush()
