"""Shared relaxed vacancies: supercell and orbits against crystallography, symmetry-mapped endpoints, and the CaF2
acceptance through the real stages (CHGNet on the CPU): one relaxation for every pathway and both ML engines."""

from __future__ import annotations

import numpy as np
import pytest
from crystals import CAF2_A, caf2
from pymatgen.core import Lattice, Structure
from sqlalchemy import func, select

from hopflow.db import init_db, session_scope
from hopflow.flows.batch import import_raw_inputs, run_batch
from hopflow.leaderboard import material_leaderboard, pathway_leaderboard
from hopflow.models import Estimate, Pathway, Run, Vacancy, VacancySite
from hopflow.settings import get_settings
from hopflow.stages import ESTIMATES
from hopflow.tasks.engines import compute_barrier
from hopflow.tasks.engines.mlip import idpp_path
from hopflow.tasks.pathways import find_pathways
from hopflow.tasks.structures import bundled_inputs
from hopflow.tasks.vacancies import VacancySymmetry, hop_endpoints, relax_vacancy, vacancy_structure

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DEFAULT_CELL = {"min_length": 10.0, "min_atoms": 40, "max_atoms": 240}


def fluorite(a: float = CAF2_A) -> Structure:
    return caf2(a)


def lanthanum_fluoride() -> Structure:
    """LaF3, tysonite P-3c1 (Zalkin & Templeton 1985): F1 12g, F2 4d, F3 2a."""
    return Structure.from_spacegroup("P-3c1", Lattice.hexagonal(7.185, 7.351), ["La", "F", "F", "F"],
                                     [[0.3400, 0, 0.25], [0.3050, 0.3820, 0.0810], [1 / 3, 2 / 3, 0.1870],
                                      [0, 0, 0.25]])


def _distances(structure: Structure) -> np.ndarray:
    return np.sort(structure.distance_matrix[np.triu_indices(len(structure), 1)])


def test_caf2_has_one_vacancy_orbit_in_an_invariant_supercell() -> None:
    primitive = fluorite().get_primitive_structure().get_reduced_structure()
    symmetry = VacancySymmetry.of(primitive, "F", **DEFAULT_CELL)
    assert symmetry.supercell.invariant
    assert len(symmetry.sites.structure) == 81  # 3x3x3 primitive cells of 3 atoms: shortest vector 11.6 Å
    [orbit] = symmetry.orbits
    assert orbit.site_label == "F 8c" and len(orbit.orbit) == 54  # every F of the supercell


def test_laf3_orbits_follow_the_wyckoff_multiplicities() -> None:
    symmetry = VacancySymmetry.of(lanthanum_fluoride(), "F", **DEFAULT_CELL)
    sizes = {o.site_label: len(o.orbit) for o in symmetry.orbits}
    cells = symmetry.supercell.size
    assert sizes == {"F 12g": 12 * cells, "F 4d": 4 * cells, "F 2a": 2 * cells}


def test_mapped_endpoints_are_the_canonical_vacancy_seen_from_another_site() -> None:
    """A deliberately distorted vacancy (neighbours pulled in) mapped onto both ends of every CaF2 hop keeps every
    interatomic distance: the mapping is an isometry, and exactly one ion moves, by the hop length."""
    primitive = fluorite().get_primitive_structure().get_reduced_structure()
    symmetry = VacancySymmetry.of(primitive, "F", **DEFAULT_CELL)
    canonical = symmetry.orbits[0].site_index
    vacancy = vacancy_structure(symmetry.sites, canonical)
    hole = symmetry.sites.structure[canonical].coords
    for i, site in enumerate(vacancy):
        d = site.coords - hole
        r = np.linalg.norm(d)
        if r < 3.0:  # a radial relaxation, as a real vacancy has
            vacancy.translate_sites([i], -0.1 * d / r, frac_coords=False, to_unit_cell=False)
    reference = _distances(vacancy)
    for record in find_pathways(primitive, ion="F", max_hop=4.0, max_paths=5):
        ends = hop_endpoints(symmetry, primitive, record.start_frac, record.end_frac, {canonical: vacancy})
        assert np.allclose(_distances(ends.start), reference, atol=1e-6)
        assert np.allclose(_distances(ends.end), reference, atol=1e-6)
        moved = [ends.start[k].distance(ends.end[k]) for k in range(len(ends.start))]
        pulled = 2 * 0.1 if record.length < 3.0 else 0.0  # the moving ion itself relaxed toward the hole at both ends
        assert moved[-1] == pytest.approx(record.length - pulled, abs=1e-6)
        assert max(moved[:-1]) < 0.5


SMALL_CELLS = {"HOPFLOW_SUPERCELL_MIN_LENGTH": "7", "HOPFLOW_SUPERCELL_MIN_ATOMS": "1", "HOPFLOW_NIMAGES": "3",
               "HOPFLOW_DASK_PROFILE": "local-threads"}
"""A 2x2x2 primitive CaF2 supercell (23 atoms after the vacancy), and Dask worker threads in this process (one model
load for all five stage runs), keep the stage test quick on 2 CPU cores."""


def test_caf2_one_vacancy_for_every_pathway_and_both_engines(monkeypatch) -> None:
    """CaF2 with max_hop 4.0 Å has the a/2 and a/√2 hops; one vacancy relaxation serves both and both ML engines; a
    second run relaxes nothing; the a/2 endpoints are equal in energy; the per-material 3D barrier is that hop's."""
    for key, value in {**SMALL_CELLS, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    init_db()
    import_raw_inputs([r for r in bundled_inputs() if r.location == "CaF2"])
    run_batch("pathways", {"max_hop": 4.0})
    run_batch("features")
    run_batch("estimates")
    neb = ESTIMATES.engine_choice("mlip-neb")
    neb["engine_settings"] = {**neb["engine_settings"], "steps": 2}  # a short band: only the sharing is tested here
    run_batch("estimates", neb)
    run_batch("estimates")  # nothing left: a second look relaxes nothing

    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(VacancySite)) == 1
        assert session.scalar(select(func.count()).select_from(Vacancy)) == 1
        assert session.scalar(select(func.count()).select_from(Run).where(Run.stage == "vacancies")) == 1
        [vacancy] = session.scalars(select(Vacancy)).all()
        assert vacancy.flag == "ok" and vacancy.converged and vacancy.bulk_converged
        rows = session.execute(select(Estimate, Pathway.length).join(Pathway, Pathway.id == Estimate.pathway_id)
                               .order_by(Pathway.length, Estimate.id)).all()
        assert sorted(e.engine for e, _ in rows) == ["mlip-idpp", "mlip-idpp", "mlip-neb", "mlip-neb"]
        assert all(e.start_vacancy_id == e.end_vacancy_id == vacancy.id for e, _ in rows)
        short = [e for e, length in rows if length < 3.0]
        for estimate in short:
            assert abs(estimate.energies[0] - estimate.energies[-1]) < 1e-3
            assert abs(estimate.energies[0] - vacancy.energy) < 1e-3
        [idpp] = [e for e in short if e.engine == "mlip-idpp"]
        assert idpp.flag == "ok" and idpp.forward_barrier == pytest.approx(idpp.reverse_barrier, abs=1e-3)
        [caf2] = material_leaderboard(session)
        assert caf2.status_3d == "complete"
        assert caf2.e_star_3d == pytest.approx(idpp.barrier, abs=1e-9)
        assert [p.pathway_id for p in pathway_leaderboard(session)][0] == idpp.pathway_id


def test_caf2_default_cheap_path_gives_a_believable_barrier(tmp_path) -> None:
    """The default cheap path with its default supercell (81-site CaF2 cell) and CHGNet: relaxed bulk, one relaxed
    vacancy mapped onto both ends of the a/2 hop, IDPP images, single points. CI-NEB with CHGNet gives 0.245 eV;
    the issue asks for 0.15-0.45 eV, and equal endpoint energies."""
    settings = get_settings()
    primitive = fluorite().get_primitive_structure().get_reduced_structure()
    symmetry = VacancySymmetry.of(primitive, "F", **DEFAULT_CELL)
    canonical = symmetry.orbits[0].site_index
    relaxed = relax_vacancy(primitive, symmetry.supercell, canonical, model=settings.barrier_model, device=None,
                            bulk_fmax=settings.bulk_fmax, bulk_steps=settings.bulk_steps, fmax=settings.vacancy_fmax,
                            steps=settings.vacancy_steps, optimizer=settings.vacancy_optimizer,
                            fill_distance=settings.vacancy_fill_distance,
                            max_displacement=settings.vacancy_max_displacement)
    assert relaxed.flag == "ok" and relaxed.converged and relaxed.bulk_converged
    bulk = Structure.from_dict(relaxed.bulk_structure)
    assert bulk.lattice.abc[0] * np.sqrt(2) == pytest.approx(CAF2_A, rel=0.03)  # CHGNet's fluorite lattice
    short = find_pathways(primitive, ion="F", max_hop=3.0, max_paths=1)[0]
    ends = hop_endpoints(symmetry, bulk, short.start_frac, short.end_frac,
                         {canonical: Structure.from_dict(relaxed.structure)})
    images = idpp_path(ends.start, ends.end, settings.nimages)
    result = compute_barrier("mlip-idpp", images, tmp_path / "work")
    assert result.flag == "ok"
    assert abs(result.energies[0] - result.energies[-1]) < 1e-3
    assert abs(result.energies[0] - relaxed.energy) < 1e-3
    assert 0.15 <= result.barrier <= 0.45
