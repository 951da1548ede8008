"""Vacancy-hop endpoints and (IDPP) images in a supercell, checked so that exactly one ion moves, by the hop length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from pymatgen.analysis.diffusion.neb.pathfinder import IDPPSolver, MigrationHop
from pymatgen.core import Structure
from pymatgen.util.coord import pbc_shortest_vectors

from hopflow.errors import InputError
from hopflow.settings import get_settings

SORT_TOL = 1.0
"""Å: end-point atoms within this distance of a start-point atom are taken to be the same atom (autosort)."""
MOVE_TOL = 0.01
"""Å: the moving ion's displacement may differ from the hop length by at most this."""
STILL_TOL = 1e-3
"""Å: every other atom must move less than this between the end points."""


class VectorizedIDPPSolver(IDPPSolver):
    """pymatgen-analysis-diffusion's IDPP solver with its per-pair Python loops done as whole-array numpy.

    Same algorithm, same minimum-image translations and the same arithmetic per element, so the same images (the
    tests compare with the library's solver); the library's set-up makes one `get_distance_and_image` call per
    atom pair and image (3.9 s of 7.5 s for a 95-atom CaF2 path), and each iteration loops over atoms in Python.
    """

    def __init__(self, structures: list[Structure]) -> None:
        lattice = structures[0].lattice
        natoms = len(structures[0])
        nimages = len(structures) - 2
        start, end = structures[0].distance_matrix, structures[-1].distance_matrix
        target = np.array([start + i / (nimages + 1) * (end - start) for i in range(1, nimages + 1)])
        eye = np.eye(natoms, dtype=np.float64)
        upper = np.triu(np.ones((natoms, natoms), dtype=bool), k=1)
        weights = np.zeros_like(target)
        translations = np.zeros((nimages, natoms, natoms, 3))
        for ni in range(nimages):
            image = structures[ni + 1]
            weights[ni] = 1.0 / (((target[ni] + image.distance_matrix) / 2.0) ** 4 + eye * 1e-8)
            frac = image.frac_coords
            # as Lattice.get_distance_and_image: the lattice image of j closest to i, for every pair at once
            shortest = pbc_shortest_vectors(lattice, frac, frac)
            jimage = np.round(lattice.get_fractional_coords(shortest) + frac[:, None, :] - frac[None, :, :])
            cart = lattice.get_cartesian_coords(jimage.astype(np.int64))
            pairs = np.where(upper[:, :, None], cart, 0.0)  # i < j, as the library; j > i is its negative
            translations[ni] = pairs - np.transpose(pairs, (1, 0, 2))
        self.init_coords = np.array([lattice.get_cartesian_coords(s.frac_coords) for s in structures])
        self.translations = translations
        self.weights = weights
        self.structures = structures
        self.target_dists = target
        self.nimages = nimages

    def _get_funcs_and_forces(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        natoms = self.translations.shape[1]
        inner = x[1:-1]
        vec = inner[:, :, None, :] - inner[:, None, :, :] - self.translations
        trial = np.linalg.norm(vec, axis=3)
        excess = trial - self.target_dists
        aux = excess * self.weights / (trial + np.eye(natoms, dtype=np.float64))
        funcs = [np.sum(excess[ni] ** 2 * self.weights[ni]) for ni in range(len(inner))]
        grads = np.sum(aux[:, :, :, None] * vec, axis=2)
        return 0.5 * np.array(funcs), -2 * grads


class HopSource(Protocol):
    """Anything that can rebuild its MigrationHop in a structure (e.g. tasks.pathways.PathwayRecord)."""

    def as_hop(self, structure: Structure) -> MigrationHop: ...


@dataclass(frozen=True)
class HopImages:
    """A vacancy hop in a supercell: start, intermediate and end images with one atom order throughout."""

    images: list[Structure]
    """nimages + 2 structures (start, intermediates, end); same lattice, same species and atom order in each."""
    moving_index: int
    """Index of the moving ion in every image."""
    hop_length: float
    """Distance in Å the moving ion travels from start to end (the hop length)."""
    supercell_matrix: tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]
    """Integer matrix M with supercell lattice = M @ (lattice of the structure given to hop_images)."""
    vac_mode: bool
    """Always True: a vacancy mechanism (the ion hops into a vacant site of its own kind)."""
    vacancy_charge: float | None
    """Net charge of an image if the vacancy is ionic (sum of oxidation states, e.g. +1 for an F⁻ vacancy);
    None without oxidation states. A neutral vacancy (an F-centre for F) is the same geometry with charge 0."""
    idpp: bool
    """True when the intermediate images were relaxed with IDPP, False for linear interpolation."""

    @property
    def nsites(self) -> int:
        """Atoms per image (the supercell less the vacancy)."""
        return len(self.images[0])

    @property
    def nimages(self) -> int:
        """Intermediate images (excluding the two end points)."""
        return len(self.images) - 2

    @property
    def supercell_size(self) -> int:
        """Number of given cells in the supercell (|det M|)."""
        return round(abs(np.linalg.det(np.array(self.supercell_matrix))))


def hop_images(
    structure: Structure,
    hop: HopSource | MigrationHop,
    *,
    nimages: int | None = None,
    min_length: float | None = None,
    min_atoms: int | None = None,
    max_atoms: int | None = None,
    idpp: bool = True,
) -> HopImages:
    """Start/end supercells of a vacancy hop with `nimages` images between them (IDPP-relaxed unless idpp=False).

    `hop` is a pathway record of `structure` (anything with `as_hop(structure)`) or a MigrationHop built on it.
    Defaults come from the settings (nimages, supercell_min_length, supercell_min_atoms, supercell_max_atoms).
    The end points from pymatgen come in different atom orders; they are matched atom by atom (SORT_TOL), and the
    result must move exactly one ion, by the hop length, or InputError is raised.
    """
    settings = get_settings()
    nimages = settings.nimages if nimages is None else nimages
    min_length = settings.supercell_min_length if min_length is None else min_length
    min_atoms = settings.supercell_min_atoms if min_atoms is None else min_atoms
    max_atoms = settings.supercell_max_atoms if max_atoms is None else max_atoms
    if nimages < 1:
        raise ValueError(f"nimages must be at least 1, got {nimages}")

    migration_hop = hop if isinstance(hop, MigrationHop) else hop.as_hop(structure)
    formula = structure.composition.reduced_formula
    start, end, _ = migration_hop.get_sc_structures(
        vac_mode=True, min_atoms=min_atoms, max_atoms=max_atoms, min_length=min_length
    )
    try:
        # Not IDPPSolver.from_endpoints: on a failed match it silently falls back to the unsorted order.
        linear = start.interpolate(end, nimages=nimages + 1, autosort_tol=SORT_TOL)
    except ValueError as exc:
        raise InputError(f"{formula}: start and end supercells of the hop do not match atom by atom ({exc})") from exc
    moving_index = _check_single_move(linear[0], linear[-1], migration_hop.length, formula)
    images = linear
    if idpp:
        try:
            images = VectorizedIDPPSolver(linear).run()
        except Exception as exc:  # the solver raises bare numpy/ValueErrors on degenerate paths
            raise InputError(f"{formula}: IDPP relaxation of the hop failed: {exc}") from exc
    matrix = np.rint(np.linalg.solve(structure.lattice.matrix.T, start.lattice.matrix.T).T).astype(int)
    charge = float(sum(oxidation_state(site.specie) for site in start)) if _has_oxidation_states(start) else None
    return HopImages(
        images=list(images),
        moving_index=moving_index,
        hop_length=float(migration_hop.length),
        supercell_matrix=tuple(tuple(int(x) for x in row) for row in matrix),  # type: ignore[arg-type]
        vac_mode=True,
        vacancy_charge=charge,
        idpp=idpp,
    )


def displacements(start: Structure, end: Structure) -> np.ndarray:
    """Shortest periodic displacement of every atom from `start` to `end` (same lattice and order), in Å."""
    delta = np.array(end.frac_coords) - np.array(start.frac_coords)
    delta -= np.round(delta)
    return np.linalg.norm(start.lattice.get_cartesian_coords(delta), axis=1)


def _check_single_move(start: Structure, end: Structure, length: float, formula: str) -> int:
    """Index of the one atom that moves by `length`; InputError if any other atom moves or the distance is wrong."""
    moved = displacements(start, end)
    movers = np.flatnonzero(moved > STILL_TOL)
    if len(movers) != 1:
        raise InputError(
            f"{formula}: {len(movers)} atoms move between the hop's end points "
            f"(largest {moved.max():.3f} Å), expected one"
        )
    index = int(movers[0])
    if abs(moved[index] - length) > MOVE_TOL:
        raise InputError(
            f"{formula}: the moving ion travels {moved[index]:.3f} Å, not the hop length {length:.3f} Å "
            "(supercell too small for this hop?)"
        )
    return index


def oxidation_state(species: Any) -> float:
    """The oxidation state a decorated site's species carries (InputError where it carries none)."""
    state = getattr(species, "oxi_state", None)
    if state is None:
        raise InputError(f"{species} carries no oxidation state")
    return float(state)


def _has_oxidation_states(structure: Structure) -> bool:
    return all(getattr(site.specie, "oxi_state", None) is not None for site in structure)
