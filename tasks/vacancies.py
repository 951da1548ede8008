"""Shared relaxed vacancies: one supercell per structure, its symmetry-distinct vacancy sites, their relaxation, and a
hop's relaxed endpoints mapped from them by the crystal's symmetry (docs/estimates.md)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
from pymatgen.util.coord import lattice_points_in_supercell

from hopflow.engines import Device, model_versions
from hopflow.errors import EngineError, InputError
from hopflow.settings import Optimizer
from hopflow.tasks.engines.potentials import Relaxed, pick_device, relax_bulk, relax_positions
from hopflow.tasks.pathways import SYMPREC, wyckoff_labels

SITE_TOL = 0.5
"""Å: a mapped point this close to a supercell site is that site (symmetric to SYMPREC, relaxed bulk included)."""
MAX_DIAGONAL = 8
"""Largest repeat along one axis tried for a diagonal supercell."""

Matrix = tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]


def plain(structure: Structure) -> Structure:
    """The structure with element species only (no oxidation states or site properties)."""
    return Structure(structure.lattice, [site.specie.symbol for site in structure], structure.frac_coords)


@dataclass(frozen=True)
class Operation:
    """A space-group operation on fractional coordinates of the stored cell: f -> rotation @ f + translation."""

    rotation: np.ndarray
    translation: np.ndarray


def symmetry_operations(structure: Structure) -> list[Operation]:
    """The space group of the structure (symprec as the path finder's) as operations on its fractional coordinates."""
    ops = SpacegroupAnalyzer(plain(structure), symprec=SYMPREC).get_symmetry_operations(cartesian=False)
    return [Operation(np.rint(op.rotation_matrix).astype(int), np.asarray(op.translation_vector, float)) for op in ops]


def _preserves(rotation: np.ndarray, matrix: np.ndarray) -> bool:
    """True when the rotation maps the supercell lattice (rows of `matrix`, stored basis) onto itself."""
    images = (rotation @ matrix.T).T  # each supercell vector, rotated, in the stored basis
    coefficients = images @ np.linalg.inv(matrix)
    return bool(np.allclose(coefficients, np.rint(coefficients), atol=1e-6))


@dataclass(frozen=True)
class Supercell:
    """The vacancy supercell of a structure: lattice = matrix @ stored lattice."""

    matrix: Matrix
    invariant: bool
    """True when every symmetry operation of the crystal is one of the supercell (vacancy orbits = Wyckoff orbits)."""

    @property
    def key(self) -> str:
        """The matrix as compact JSON (how `vacancy_sites.supercell` stores it)."""
        return json.dumps([list(row) for row in self.matrix], separators=(",", ":"))

    @classmethod
    def from_key(cls, key: str, invariant: bool = False) -> Supercell:
        rows = json.loads(key)
        return cls(tuple(tuple(int(x) for x in row) for row in rows), invariant)  # type: ignore[arg-type]

    @property
    def size(self) -> int:
        """Stored cells in the supercell."""
        return round(abs(np.linalg.det(np.array(self.matrix))))


def _shortest_vector(lattice: Lattice) -> float:
    return float(min(lattice.get_lll_reduced_lattice().abc))


def choose_supercell(structure: Structure, *, min_length: float, min_atoms: int, max_atoms: int,
                     ops: Sequence[Operation] | None = None) -> Supercell:
    """The diagonal supercell with the fewest atoms whose shortest lattice vector is at least `min_length` Å and whose
    atom count lies in [min_atoms, max_atoms]; supercells the whole point group preserves win over others."""
    ops = symmetry_operations(structure) if ops is None else ops
    rotations = {op.rotation.tobytes(): op.rotation for op in ops}.values()
    best: tuple[tuple[int, int, float], Supercell] | None = None
    for repeats in itertools.product(range(1, MAX_DIAGONAL + 1), repeat=3):
        natoms = len(structure) * int(np.prod(repeats))
        if not min_atoms <= natoms <= max_atoms:
            continue
        matrix = np.diag(repeats)
        lattice = Lattice(matrix @ structure.lattice.matrix)
        shortest = _shortest_vector(lattice)
        if shortest < min_length:
            continue
        invariant = all(_preserves(r, matrix) for r in rotations)
        score = (0 if invariant else 1, natoms, -shortest)
        if best is None or score < best[0]:
            best = (score, Supercell(tuple(tuple(int(x) for x in row) for row in matrix), invariant))  # type: ignore[arg-type]
    if best is None:
        formula = structure.composition.reduced_formula
        raise InputError(f"{formula}: no diagonal supercell of {len(structure)}-site cells has a shortest vector of "
                         f"at least {min_length} Å within {min_atoms}-{max_atoms} atoms")
    return best[1]


@dataclass(frozen=True)
class SupercellSites:
    """A structure repeated into a supercell in a fixed order: stored site i, lattice point j -> index i * n + j."""

    structure: Structure
    """The supercell (element species only)."""
    matrix: np.ndarray
    stored_frac: np.ndarray
    """Every supercell site's fractional coordinates in the stored cell's basis."""

    @classmethod
    def build(cls, bulk: Structure, supercell: Supercell) -> SupercellSites:
        matrix = np.array(supercell.matrix, dtype=float)
        points = lattice_points_in_supercell(matrix) @ matrix  # lattice points, stored basis (integers)
        points = np.rint(points)
        base = plain(bulk)
        stored = np.array([f + p for f in base.frac_coords for p in points])
        species = [site.specie.symbol for site in base for _ in points]
        lattice = Lattice(matrix @ base.lattice.matrix)
        structure = Structure(lattice, species, stored @ np.linalg.inv(matrix))
        return cls(structure, matrix, stored)

    def index_of(self, stored_frac: np.ndarray, element: str | None = None) -> int:
        """The supercell site at a point given in stored fractional coordinates (modulo the supercell lattice)."""
        return int(self.match(np.asarray(stored_frac, dtype=float)[None, :], element)[0])

    def match(self, points: np.ndarray, element: str | None = None,
              among: np.ndarray | None = None) -> np.ndarray:
        """For each point (stored fractional coordinates) the supercell site there, modulo the supercell lattice;
        `among` restricts the candidates to those site indices."""
        candidates = np.arange(len(self.structure)) if among is None else np.asarray(among)
        if element is not None:
            candidates = np.array([k for k in candidates if self.structure[int(k)].specie.symbol == element])
        inv = np.linalg.inv(self.matrix)
        delta = (points[:, None, :] - self.stored_frac[candidates][None, :, :]) @ inv
        delta -= np.rint(delta)
        dist = np.linalg.norm(delta @ self.structure.lattice.matrix, axis=2)
        best = np.argmin(dist, axis=1)
        worst = dist[np.arange(len(points)), best].max()
        if worst > SITE_TOL:
            raise EngineError(f"a point has no supercell site within {SITE_TOL} Å (closest {worst:.3f} Å)")
        return candidates[best]

    def permutation(self, op: Operation, among: np.ndarray | None = None) -> np.ndarray:
        """perm[i] = the site the operation takes site among[i] (default: every site) to."""
        sites = np.arange(len(self.structure)) if among is None else np.asarray(among)
        moved = self.stored_frac[sites] @ op.rotation.T + op.translation
        return self.match(moved, among=sites)


@dataclass(frozen=True)
class VacancySiteSpec:
    """One orbit of migrating-ion sites in the supercell: what a `vacancy_sites` row holds."""

    site_index: int
    """The orbit's lowest supercell index: the site that is removed and relaxed."""
    site_label: str
    orbit: tuple[int, ...]
    stored_frac: tuple[float, float, float]


@dataclass(frozen=True)
class VacancySymmetry:
    """A structure's supercell with the symmetry operations that preserve it, and the ion-site orbits under them."""

    structure: Structure
    ion: str
    supercell: Supercell
    operations: tuple[Operation, ...]

    @classmethod
    def of(cls, structure: Structure, ion: str, *, min_length: float, min_atoms: int, max_atoms: int,
           supercell: Supercell | None = None) -> VacancySymmetry:
        base = plain(structure)
        if ion not in {s.specie.symbol for s in base}:
            raise InputError(f"no {ion} sites in {base.composition.reduced_formula}")
        point_ops = symmetry_operations(base)
        supercell = supercell or choose_supercell(base, min_length=min_length, min_atoms=min_atoms,
                                                  max_atoms=max_atoms, ops=point_ops)
        matrix = np.array(supercell.matrix, dtype=float)
        translations = np.rint(lattice_points_in_supercell(matrix) @ matrix)
        kept = [op for op in point_ops if _preserves(op.rotation, matrix)]
        ops = tuple(Operation(op.rotation, op.translation + t) for op in kept for t in translations)
        return cls(base, ion, supercell, ops)

    @cached_property
    def sites(self) -> SupercellSites:
        return SupercellSites.build(self.structure, self.supercell)

    @cached_property
    def ion_sites(self) -> np.ndarray:
        return np.array([k for k, site in enumerate(self.sites.structure) if site.specie.symbol == self.ion])

    @cached_property
    def ion_permutations(self) -> dict[int, np.ndarray]:
        """Per operation, where it takes each ion site: {site: row of targets, one per operation}."""
        table = np.array([self.sites.permutation(op, self.ion_sites) for op in self.operations])
        return {int(k): table[:, i] for i, k in enumerate(self.ion_sites)}

    @cached_property
    def orbits(self) -> list[VacancySiteSpec]:
        """The distinct vacancy sites, by lowest supercell index."""
        labels = wyckoff_labels(self.structure, self.ion)
        per_cell = self.supercell.size
        seen: set[int] = set()
        specs = []
        for k, site in enumerate(self.sites.structure):
            if site.specie.symbol != self.ion or k in seen:
                continue
            orbit = tuple(sorted(set(int(i) for i in self.ion_permutations[k])))
            seen.update(orbit)
            frac = self.sites.stored_frac[k]
            specs.append(VacancySiteSpec(k, labels[k // per_cell], orbit, (float(frac[0]), float(frac[1]),
                                                                             float(frac[2]))))
        return specs

    def canonical(self, site: int) -> tuple[VacancySiteSpec, int]:
        """The orbit of a supercell site and the index of an operation taking the orbit's canonical site to it."""
        for spec in self.orbits:
            if site in spec.orbit:
                g = int(np.flatnonzero(self.ion_permutations[spec.site_index] == site)[0])
                return spec, g
        raise EngineError(f"supercell site {site} is not a {self.ion} site")

    def hop_sites(self, start_frac: Sequence[float], end_frac: Sequence[float]) -> tuple[int, int]:
        """Supercell indices of a hop's start (a) and end (b) sites."""
        return (self.sites.index_of(np.asarray(start_frac), self.ion),
                self.sites.index_of(np.asarray(end_frac), self.ion))


@dataclass(frozen=True)
class VacancyRelaxation:
    """A relaxed vacancy supercell and what it says about the vacancy."""

    structure: Structure
    energy: float
    max_force: float
    converged: bool
    steps: int
    max_displacement: float
    fill_distance: float
    flag: str
    reason: str | None


def vacancy_structure(sites: SupercellSites, site_index: int) -> Structure:
    """The supercell with one site removed (the remaining atoms keep the supercell order)."""
    structure = sites.structure.copy()
    structure.remove_sites([site_index])
    return structure


def assess_vacancy(ideal: SupercellSites, site_index: int, relaxed: Structure, *, fill_distance: float,
                   max_displacement: float) -> tuple[float, float, str, str | None]:
    """Largest displacement, distance from the vacant site to the closest atom, and the flag they give."""
    keep = [k for k in range(len(ideal.structure)) if k != site_index]
    start = ideal.structure.frac_coords[keep]
    delta = relaxed.frac_coords - start
    delta -= np.rint(delta)
    moved = np.linalg.norm(relaxed.lattice.get_cartesian_coords(delta), axis=1)
    hole = ideal.structure.frac_coords[site_index]
    to_hole = relaxed.frac_coords - hole
    to_hole -= np.rint(to_hole)
    closest = float(np.linalg.norm(relaxed.lattice.get_cartesian_coords(to_hole), axis=1).min())
    worst = float(moved.max())
    if closest < fill_distance:
        return worst, closest, "vacancy-moved", (f"an atom ends {closest:.2f} Å from the vacant site (limit "
                                                 f"{fill_distance:.2f} Å): a neighbour filled the vacancy")
    if worst > max_displacement:
        index = keep[int(moved.argmax())]
        return worst, closest, "vacancy-moved", (f"supercell atom {index} moved {worst:.2f} Å in the relaxation "
                                                 f"(limit {max_displacement:.2f} Å)")
    return worst, closest, "ok", None


def mapped_vacancy(symmetry: VacancySymmetry, bulk_sites: SupercellSites, canonical: VacancySiteSpec,
                   relaxed: Structure, target: int) -> np.ndarray:
    """Stored-basis fractional coordinates of every supercell site for the relaxed vacancy moved onto `target`
    (row k = site k; the target's own row is NaN). `relaxed` is the canonical vacancy in supercell order."""
    spec, g = symmetry.canonical(target)
    if spec.site_index != canonical.site_index:
        raise EngineError(f"site {target} belongs to the vacancy orbit of site {spec.site_index}, not "
                          f"{canonical.site_index}")
    op = symmetry.operations[g]
    perm = bulk_sites.permutation(op)
    matrix = bulk_sites.matrix
    keep = [k for k in range(len(bulk_sites.structure)) if k != canonical.site_index]
    relaxed_stored = relaxed.frac_coords @ matrix
    u = relaxed_stored - bulk_sites.stored_frac[keep]
    u -= np.rint(u @ np.linalg.inv(matrix)) @ matrix  # minimum image, in whole supercell vectors
    out = np.full((len(bulk_sites.structure), 3), np.nan)
    for row, k in enumerate(keep):
        out[perm[k]] = bulk_sites.stored_frac[perm[k]] + op.rotation @ u[row]
    return out


@dataclass(frozen=True)
class HopEndpoints:
    """A hop's relaxed start (vacancy at b) and end (vacancy at a) in one atom order, the moving ion last."""

    start: Structure
    end: Structure
    start_site: int
    """Supercell index of a, where the moving ion starts."""
    end_site: int
    """Supercell index of b, where it ends."""


def hop_endpoints(symmetry: VacancySymmetry, bulk: Structure, start_frac: Sequence[float], end_frac: Sequence[float],
                  relaxed: dict[int, Structure]) -> HopEndpoints:
    """The hop a -> b between relaxed vacancies: `relaxed` maps each needed orbit's canonical site index to its
    relaxed vacancy supercell (built on the relaxed `bulk`, supercell order)."""
    a, b = symmetry.hop_sites(start_frac, end_frac)
    if a == b:
        raise InputError("the hop's start and end are the same supercell site: the supercell is too small")
    sites = SupercellSites.build(bulk, symmetry.supercell)
    canonical_a, canonical_b = symmetry.canonical(a)[0], symmetry.canonical(b)[0]
    with_b_empty = mapped_vacancy(symmetry, sites, canonical_b, relaxed[canonical_b.site_index], b)
    with_a_empty = mapped_vacancy(symmetry, sites, canonical_a, relaxed[canonical_a.site_index], a)
    others = [k for k in range(len(sites.structure)) if k not in (a, b)]
    start_frac_rows = np.vstack([with_b_empty[others], with_b_empty[a]])
    end_frac_rows = np.vstack([with_a_empty[others], with_a_empty[b]])
    # the moving ion's end point continues the hop (unwrapped next to its start), so interpolation takes this hop
    jump = (np.asarray(end_frac) - np.asarray(start_frac)) @ np.linalg.inv(sites.matrix)
    moved_start = start_frac_rows[-1] @ np.linalg.inv(sites.matrix)
    moved_end = end_frac_rows[-1] @ np.linalg.inv(sites.matrix)
    offset = np.rint(moved_start + jump - moved_end)
    species = [sites.structure[k].specie.symbol for k in others] + [symmetry.ion]
    lattice = sites.structure.lattice
    inv = np.linalg.inv(sites.matrix)
    start = Structure(lattice, species, start_frac_rows @ inv)
    end_coords = end_frac_rows @ inv
    end_coords[-1] = moved_end + offset
    end = Structure(lattice, species, end_coords)
    return HopEndpoints(start=start, end=end, start_site=a, end_site=b)


@dataclass(frozen=True)
class RelaxedVacancy:
    """A `vacancies` row's values: the relaxed vacancy, the relaxed bulk it was made in, and the checks."""

    model: str
    energy: float
    max_force: float
    converged: bool
    steps: int
    structure: dict
    bulk_structure: dict
    bulk_energy: float
    bulk_converged: bool
    max_displacement: float
    fill_distance: float
    flag: str
    flag_reason: str | None
    settings: dict
    versions: dict
    relax_s: float


@lru_cache(maxsize=8)
def _relaxed_bulk(structure_json: str, model: str, device: Device, fmax: float, steps: int,
                  optimizer: Optimizer) -> Relaxed:
    # one bulk relaxation per structure and settings in a worker process, whatever number of its vacancies it relaxes
    return relax_bulk(Structure.from_str(structure_json, fmt="json"), model, device, fmax=fmax, steps=steps,
                      optimizer=optimizer)


def relax_vacancy(structure: Structure, supercell: Supercell, site_index: int, *, model: str, device: Device | None,
                  bulk_fmax: float, bulk_steps: int, fmax: float, steps: int, optimizer: Optimizer,
                  fill_distance: float, max_displacement: float) -> RelaxedVacancy:
    """Relax the bulk (lattice and positions, symmetry kept), then the vacancy at `site_index` of its supercell
    (positions, fixed cell), and check that the vacancy stayed where it was made."""
    clock = time.perf_counter()
    chosen = pick_device(device)
    bulk = _relaxed_bulk(plain(structure).to_json(), model, chosen, bulk_fmax, bulk_steps, optimizer)
    sites = SupercellSites.build(bulk.structure, supercell)
    relaxed = relax_positions(vacancy_structure(sites, site_index), model, chosen, fmax=fmax, steps=steps,
                              optimizer=optimizer)
    worst, closest, flag, reason = assess_vacancy(sites, site_index, relaxed.structure, fill_distance=fill_distance,
                                                  max_displacement=max_displacement)
    if not (relaxed.converged and bulk.converged):
        what = "vacancy" if bulk.converged else "bulk"
        threshold = fmax if bulk.converged else bulk_fmax
        flag, reason = "unconverged", f"the {what} relaxation did not reach {threshold} eV/Å"
    return RelaxedVacancy(
        model=model, energy=relaxed.energy, max_force=relaxed.max_force, converged=relaxed.converged,
        steps=relaxed.steps, structure=relaxed.structure.as_dict(), bulk_structure=bulk.structure.as_dict(),
        bulk_energy=bulk.energy, bulk_converged=bulk.converged, max_displacement=worst, fill_distance=closest,
        flag=flag, flag_reason=reason,
        settings={"bulk_fmax": bulk_fmax, "bulk_steps": bulk_steps, "fmax": fmax, "steps": steps,
                  "optimizer": optimizer, "supercell": supercell.key, "site_index": site_index, "device": device},
        versions=model_versions(model), relax_s=time.perf_counter() - clock)
