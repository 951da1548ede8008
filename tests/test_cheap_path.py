"""The cheap path's faster code gives the answers of the slower reference path it replaced, on CaF2 and the ternary
KMgF3: IDPP images as pymatgen-analysis-diffusion's own solver makes them, hop lengths and features to 1e-6 relative,
barriers within 5 meV, rankings identical (benchmarks/cheap_path.py measures the speed)."""

from __future__ import annotations

import dataclasses
import math
from functools import cache

import numpy as np
import pytest
from pymatgen.analysis.diffusion.neb.pathfinder import IDPPSolver
from pymatgen.core import Structure

from hopflow.tasks.engines import compute_barrier
from hopflow.tasks.engines.mlip import idpp_path, known_energy, with_known_energy
from hopflow.tasks.engines.potentials import atom_batches, single_points
from hopflow.tasks.features import NEIGHBOUR_CUTOFF, PathwayFeatures, featurize, shannon_radius
from hopflow.tasks.images import HopImages, VectorizedIDPPSolver, hop_images
from hopflow.tasks.pathways import PathwayRecord, find_pathways
from hopflow.tasks.structures import bundled_inputs, parse_input, sanitize
from hopflow.tasks.vacancies import VacancySymmetry, hop_endpoints, relax_vacancy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CRYSTALS = ("CaF2", "KMgF3")
DEFAULT_CELL = {"min_length": 10.0, "min_atoms": 40, "max_atoms": 240}
SMALL_CELL = {"min_length": 7.0, "min_atoms": 1, "max_atoms": 240}
"""Barriers are compared in 23-atom (CaF2) and 39-atom (KMgF3) vacancy cells: the comparison is of code paths, and
the relaxations stay quick on 2 CPU cores."""
MODEL = "chgnet-0.3.0"


@cache
def crystal(name: str) -> Structure:
    """A bundled structure as import stores it (reduced cell, oxidation states)."""
    [raw] = [r for r in bundled_inputs() if r.location == name]
    return sanitize(parse_input(raw), ion="F", max_sites=500).structure


@cache
def pathways(name: str) -> tuple[PathwayRecord, ...]:
    return tuple(find_pathways(crystal(name), ion="F", max_hop=4.0, max_paths=2))


def reference_images(structure: Structure, record: PathwayRecord, nimages: int) -> HopImages:
    """hop_images as it was: the library's IDPP solver on the same matched linear path."""
    linear = hop_images(structure, record, nimages=nimages, idpp=False, **DEFAULT_CELL)
    return dataclasses.replace(linear, images=list(IDPPSolver(linear.images).run()), idpp=True)


def reference_overlap(image: Structure, index: int, radii: dict[str, float], kind: str) -> float | None:
    """The overlap feature as it was computed: one neighbour search per neighbour class."""
    member = {"cation": lambda q: q > 0, "anion": lambda q: q < 0, "neutral": lambda q: q == 0}[kind]
    site = image[index]
    values = [radii[str(site.specie)] + radii[str(n.specie)] - n.nn_distance
              for n in image.get_neighbors(site, NEIGHBOUR_CUTOFF) if member(n.specie.oxi_state)]
    return max(values) if values else None


def assert_same(fast: object, reference: object, what: str) -> None:
    if isinstance(reference, float):
        assert isinstance(fast, float) and math.isclose(fast, reference, rel_tol=1e-6, abs_tol=1e-9), what
    elif isinstance(reference, dict):
        assert isinstance(fast, dict) and fast.keys() == reference.keys(), what
        for key in reference:
            assert_same(fast[key], reference[key], f"{what}[{key}]")
    else:
        assert fast == reference, what


@pytest.mark.parametrize("name", CRYSTALS)
def test_vectorized_idpp_makes_the_librarys_images(name: str) -> None:
    structure = crystal(name)
    for record in pathways(name):
        linear = hop_images(structure, record, nimages=3, idpp=False, **DEFAULT_CELL).images
        ours, library = VectorizedIDPPSolver(linear).run(), IDPPSolver(linear).run()
        assert len(ours) == len(library) == 5
        worst = max(np.abs(a.cart_coords - b.cart_coords).max() for a, b in zip(ours, library, strict=True))
        assert worst < 1e-9, f"{name} {record.length:.3f} Å: images differ by {worst:.2e} Å"
        moved = np.linalg.norm(library[2].cart_coords - linear[2].cart_coords, axis=1).max()
        assert moved > 1e-3  # IDPP really moved atoms off the linear path: the comparison is not of inputs


@pytest.mark.parametrize("name", CRYSTALS)
def test_features_and_their_ranking_match_the_reference_path(name: str) -> None:
    structure = crystal(name)
    records = pathways(name)
    assert len(records) >= 2  # several hops: the ranking below compares an order, not a single item
    fast, slow = [], []
    for record in records:
        fast.append(featurize(structure, record, nimages=3, **DEFAULT_CELL))
        images = reference_images(structure, record, 3)
        feats = featurize(structure, record, images=images)
        radii = feats.radii
        kinds = {kind: [reference_overlap(image, images.moving_index, radii, kind) for image in images.images]
                 for kind in ("cation", "anion", "neutral")}
        assert [kinds["cation"][0], max(v for v in kinds["cation"] if v is not None)] == [
            feats.overlap_cation_start, feats.overlap_cation_max]
        slow.append(feats)
    for a, b in zip(fast, slow, strict=True):
        for field in dataclasses.fields(PathwayFeatures):
            assert_same(getattr(a, field.name), getattr(b, field.name), f"{name} {b.length:.3f} Å {field.name}")
        assert a.length == pytest.approx(b.length, rel=1e-6)
    assert all(r == shannon_radius(s) for s in structure.composition for r in [fast[0].radii[str(s)]])

    def physics_order(rows: list[PathwayFeatures]) -> list[int]:
        return sorted(range(len(rows)), key=lambda i: (rows[i].overlap_cation_max_change or 0.0,
                                                       rows[i].ewald_energy_change, rows[i].length))

    assert physics_order(fast) == physics_order(slow)


@cache
def relaxed_endpoints(name: str) -> list[tuple[PathwayRecord, Structure, Structure]]:
    """Each hop's endpoints between relaxed vacancies (one relaxation per vacancy orbit), marked with the relaxed
    vacancies' energies as the estimates flow marks them."""
    structure = crystal(name)
    symmetry = VacancySymmetry.of(structure, "F", **SMALL_CELL)
    relaxed = {spec.site_index: relax_vacancy(structure, symmetry.supercell, spec.site_index, model=MODEL,
                                              device="cpu", bulk_fmax=0.02, bulk_steps=300, fmax=0.05, steps=300,
                                              optimizer="BFGS", fill_distance=1.0, max_displacement=1.0)
               for spec in symmetry.orbits}
    assert all(r.flag == "ok" for r in relaxed.values())
    bulk = Structure.from_dict(next(iter(relaxed.values())).bulk_structure)
    vacancies = {k: Structure.from_dict(r.structure) for k, r in relaxed.items()}
    out = []
    for record in pathways(name):
        ends = hop_endpoints(symmetry, bulk, record.start_frac, record.end_frac, vacancies)
        start_energy = relaxed[symmetry.canonical(ends.end_site)[0].site_index].energy  # the vacancy is at b
        end_energy = relaxed[symmetry.canonical(ends.start_site)[0].site_index].energy
        out.append((record, with_known_energy(ends.start, start_energy, MODEL),
                    with_known_energy(ends.end, end_energy, MODEL)))
    return out


@pytest.mark.parametrize("name", CRYSTALS)
def test_barriers_and_their_ranking_match_the_reference_path(name: str, tmp_path) -> None:
    """mlip-idpp as the estimates stage runs it (vectorized IDPP; energies without forces; the endpoints' energies
    taken from their relaxed vacancies) against the reference (the library's IDPP, energy and forces of every image
    computed): barriers within 5 meV, the same order."""
    fast, slow = [], []
    for k, (record, start, end) in enumerate(relaxed_endpoints(name)):
        images = idpp_path(start, end, 3)
        images = [with_known_energy(images[0], known_energy(start, MODEL), MODEL), *images[1:-1],
                  with_known_energy(images[-1], known_energy(end, MODEL), MODEL)]
        result = compute_barrier("mlip-idpp", images, tmp_path / f"fast-{k}", {"model": MODEL})
        assert (result.energies[0], result.energies[-1]) == (known_energy(start, MODEL), known_energy(end, MODEL))
        guess = start.interpolate(end, 4, pbc=True)
        points = single_points(IDPPSolver(guess).run(), MODEL, "cpu", forces=True)
        energies = [e for e, _ in points]
        assert all(f is not None and f > 0 for _, f in points)
        reference = max(energies) - min(energies[0], energies[-1])
        assert result.flag == "ok" and result.barrier is not None, f"{name} {record.length:.3f} Å: {result.flag}"
        assert result.barrier == pytest.approx(reference, abs=0.005), f"{name} {record.length:.3f} Å"
        assert np.allclose(result.energies, energies, atol=0.005)
        assert reference > 0.05  # a real barrier, not a flat profile
        fast.append(result.barrier)
        slow.append(reference)
    assert sorted(range(len(fast)), key=fast.__getitem__) == sorted(range(len(slow)), key=slow.__getitem__)


def test_atom_batches_bound_the_atoms_per_call() -> None:
    assert atom_batches([95, 95, 95, 95, 95], 200) == [[0, 1], [2, 3], [4]]
    assert atom_batches([250, 10, 10], 200) == [[0], [1, 2]]  # a structure over the limit still runs, alone
    assert atom_batches([], 100) == []


def test_batched_energies_are_the_one_at_a_time_energies() -> None:
    """Energy-only CHGNet calls in batches (what a GPU gets) give each image the energy of its own call."""
    [(record, start, end)] = relaxed_endpoints("CaF2")[:1]
    images = idpp_path(start, end, 3)
    alone = single_points(images, MODEL, "cpu")
    batched = single_points(images, MODEL, "cpu", batch_atoms=2 * len(images[0]))  # two images per call
    assert [f for _, f in batched] == [None] * 5
    assert np.allclose([e for e, _ in batched], [e for e, _ in alone], atol=1e-4)
    assert max(e for e, _ in alone) - min(e for e, _ in alone) > 0.05  # the images differ: not one energy five times
