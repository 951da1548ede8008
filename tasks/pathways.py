"""Distinct migration hops of one ion in a crystal (pymatgen-analysis-diffusion), in an order no cell choice changes."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import spglib
from pymatgen.analysis.diffusion.neb.full_path_mapper import MigrationGraph
from pymatgen.analysis.diffusion.neb.pathfinder import DistinctPathFinder, MigrationHop
from pymatgen.analysis.dimensionality import get_dimensionality_larsen
from pymatgen.core import PeriodicSite, Structure
from pymatgen.core.graphs import StructureGraph
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
from pymatgen.symmetry.structure import SymmetrizedStructure

from hopflow.errors import InputError
from hopflow.settings import get_settings

SYMPREC = 0.1
"""Symmetry tolerance in Å (MigrationGraph's default): decides which hops are equivalent."""
ANGLE_TOL = 5.0
"""Degrees: spglib's angle tolerance, as pymatgen's SpacegroupAnalyzer uses it."""
LENGTH_TOL = 1e-3
"""Å: two hop lengths closer than this are equal; also the slack added to the hop-length limit."""
PRIMITIVE_TOL = 0.01
"""Å: position tolerance for finding the primitive cell (pymatgen's default 0.25 Å would average away real
distortions of pseudo-symmetric cells)."""
SITE_MATCH_TOL = 0.05
"""Å: how close a site of the canonical cell must lie to a site of the given cell to be the same atom."""
FINGERPRINT_CUTOFF = 4.0
"""Å: radius of the neighbour shells that break ties between hops of equal length and site labels."""
FINGERPRINT_DECIMALS = 2
"""Neighbour distances in the tie-breaking fingerprint are rounded to this many decimals (Å)."""
MAX_GRAPH_HOPS = 20_000
"""Most ion–ion hops (edges per primitive cell) the hop graph may hold; more means the max hop is far too long."""

Vector = tuple[float, float, float]
Image = tuple[int, int, int]
Edge = tuple[int, int, Image, int]
"""A hop-graph edge: from site, to site, lattice image of the to-site, hop label."""


class _MigrationGraph(MigrationGraph):
    """MigrationGraph that symmetrizes its structure once.

    The library recomputes `symm_structure` for every edge; the hop grouping then compares those separate copies
    site by site, O(edges²·sites²) (27 s for 52-site Ba3AlF9). One shared object makes that an identity check.
    """

    @cached_property
    def symm_structure(self) -> SymmetrizedStructure:
        return super().symm_structure


@dataclass(frozen=True)
class PathwayRecord:
    """One symmetry-distinct hop of the migrating ion, located in the structure it was found in.

    Fields that depend on the cell (coordinates, indices, image) refer to the structure given to `find_pathways`;
    all others (rank, length, labels, multiplicity, dimensionality) are properties of the crystal.
    """

    ion: str
    """Element symbol of the migrating ion."""
    rank: int
    """Position in the structure's cell-independent order, 0 = shortest hop."""
    length: float
    """Hop length in Å (straight line from start to end site)."""
    start_index: int
    """Index of the start site in the given structure."""
    end_index: int
    """Index of the end site in the given structure (its periodic image is `end_image`)."""
    end_image: Image
    """Lattice translation of the end site: end_frac = structure[end_index].frac_coords + end_image."""
    start_frac: Vector
    """Fractional coordinates of the start site (the given structure's own coordinates of start_index)."""
    end_frac: Vector
    """Fractional coordinates of the end site, unwrapped so that end - start is the hop vector."""
    start_cart: Vector
    """Cartesian coordinates of the start site in Å."""
    end_cart: Vector
    """Cartesian coordinates of the end site in Å (unwrapped)."""
    start_label: str
    """Start site as element and Wyckoff position of the standard conventional cell, e.g. 'F 8c'."""
    end_label: str
    """End site label, as start_label; hops between two orbits start at the smaller label."""
    multiplicity: float
    """Equivalent hops per migrating-ion site of the primitive cell (mean hop coordination by this hop type)."""
    dimensionality: int
    """Dimensions (0-3) in which the network of this hop type alone percolates."""
    dimensionality_cumlengths: int
    """Dimensions (0-3) in which the network of all hops up to this length (this one and all shorter) percolates."""
    max_hop: float
    """The hop-length limit in Å the search used (explicit or automatic)."""
    max_hop_automatic: bool
    """True when max_hop was chosen by pymatgen-analysis-diffusion's automatic rule."""
    hops_found: int | None = None
    """Distinct hops up to max_hop before `max_paths` kept the shortest (more than the records: some were cut)."""

    @property
    def hop_vector(self) -> Vector:
        """Cartesian hop vector (end - start) in Å."""
        return _float3(np.array(self.end_cart) - np.array(self.start_cart))

    def as_hop(self, structure: Structure, *, symprec: float = SYMPREC) -> MigrationHop:
        """Rebuild the pymatgen MigrationHop in `structure` (the structure this record was found in)."""
        if not (0 <= self.start_index < len(structure) and 0 <= self.end_index < len(structure)):
            raise InputError(
                f"pathway sites {self.start_index}/{self.end_index} are not in a {len(structure)}-site structure"
            )
        start, end = structure[self.start_index], structure[self.end_index]
        end_frac = np.array(end.frac_coords) + np.array(self.end_image)
        length = np.linalg.norm(structure.lattice.get_cartesian_coords(end_frac - start.frac_coords))
        if (
            start.specie.symbol != self.ion
            or end.specie.symbol != self.ion
            or np.abs(np.array(start.frac_coords) - self.start_frac).max() > 1e-6
            or np.abs(end_frac - self.end_frac).max() > 1e-6
            or abs(length - self.length) > LENGTH_TOL
        ):
            raise InputError(f"pathway {self.rank} ({self.ion}, {self.length:.3f} Å) is not a hop of this structure")
        symm = SpacegroupAnalyzer(structure, symprec=symprec).get_symmetrized_structure()
        isite = PeriodicSite(start.specie, self.start_frac, structure.lattice)
        esite = PeriodicSite(start.specie, self.end_frac, structure.lattice)
        return MigrationHop(isite, esite, symm, symprec=symprec)


def find_pathways(
    structure: Structure,
    *,
    ion: str,
    max_hop: float | None,
    max_paths: int,
    max_sites: int | None = None,
) -> list[PathwayRecord]:
    """Symmetry-distinct hops of `ion`, shortest first, at most `max_paths`, each at most `max_hop` Å long.

    `max_hop=None` uses pymatgen-analysis-diffusion's automatic limit (`DistinctPathFinder`: the shortest length
    at which the hops form a >1D percolating network or junctions). The search runs on the Niggli-reduced primitive
    cell, so any cell of the same crystal gives the same hops in the same order; the records are then located in
    the given structure. `max_sites` (default: the `max_sites` setting) bounds the primitive cell's size.
    """
    if max_paths < 1:
        raise ValueError(f"max_paths must be at least 1, got {max_paths}")
    if max_hop is not None and max_hop <= 0:
        raise InputError(f"max hop length must be positive, got {max_hop} Å")
    max_sites = get_settings().max_sites if max_sites is None else max_sites
    _check_input(structure, ion)
    prim = canonical_cell(structure)
    if len(prim) > max_sites:
        raise InputError(
            f"{structure.composition.reduced_formula}: primitive cell has {len(prim)} sites, "
            f"more than the limit of {max_sites}"
        )

    automatic = max_hop is None
    limit = automatic_max_hop(prim, ion) if max_hop is None else float(max_hop)
    _check_graph_size(prim, ion, limit)
    graph = _MigrationGraph.with_distance(prim, ion, max_distance=limit + LENGTH_TOL, symprec=SYMPREC)
    if not graph.unique_hops:
        raise InputError(f"{structure.composition.reduced_formula}: no {ion}-{ion} hop up to {limit:.3f} Å")

    edges = [
        (u, v, _int3(data["to_jimage"]), data["hop_label"]) for u, v, data in graph.m_graph.graph.edges(data=True)
    ]
    candidates = sorted(_candidates(prim, ion, graph, edges), key=lambda candidate: candidate.key)
    records = []
    for rank, hop in enumerate(candidates[:max_paths]):
        shorter = {other.label for other in candidates if other.length <= hop.length + LENGTH_TOL}
        start_index, end_index, end_image = _locate(structure, ion, hop.start_cart, hop.end_cart)
        start_frac = np.array(structure[start_index].frac_coords)
        end_frac = np.array(structure[end_index].frac_coords) + end_image
        records.append(
            PathwayRecord(
                ion=ion,
                rank=rank,
                length=float(np.linalg.norm(structure.lattice.get_cartesian_coords(end_frac - start_frac))),
                start_index=start_index,
                end_index=end_index,
                end_image=_int3(end_image),
                start_frac=_float3(start_frac),
                end_frac=_float3(end_frac),
                start_cart=_float3(structure.lattice.get_cartesian_coords(start_frac)),
                end_cart=_float3(structure.lattice.get_cartesian_coords(end_frac)),
                start_label=hop.start_label,
                end_label=hop.end_label,
                multiplicity=hop.multiplicity,
                dimensionality=_dimensionality(graph.only_sites, edges, {hop.label}),
                dimensionality_cumlengths=_dimensionality(graph.only_sites, edges, shorter),
                max_hop=limit,
                max_hop_automatic=automatic,
                hops_found=len(candidates),
            )
        )
    return records


@dataclass(frozen=True)
class _Candidate:
    """A distinct hop of the canonical cell with its cell-independent sort key."""

    key: tuple
    label: int
    length: float
    start_cart: np.ndarray
    end_cart: np.ndarray
    start_label: str
    end_label: str
    multiplicity: float


def _candidates(prim: Structure, ion: str, graph: MigrationGraph, edges: list[Edge]) -> list[_Candidate]:
    """One oriented candidate per hop label; the key orders by length, site labels, multiplicity, then environments."""
    counts = Counter(label for *_, label in edges)
    n_ion = len(graph.only_sites)
    lengths = {label: float(data["hop"].length) for label, data in graph.unique_hops.items()}
    classes = _length_classes(lengths)
    site_labels = wyckoff_labels(prim, ion)
    result = []
    for label, data in graph.unique_hops.items():
        hop: MigrationHop = data["hop"]
        start, end = np.array(hop.isite.coords), np.array(hop.esite.coords)
        start_label, end_label = (site_labels[_match_site(prim, ion, point)[0]] for point in (start, end))
        start_fp, end_fp = _fingerprint(prim, start), _fingerprint(prim, end)
        if (end_label, end_fp) < (start_label, start_fp):
            start, end, start_label, end_label, start_fp, end_fp = end, start, end_label, start_label, end_fp, start_fp
        multiplicity = 2 * counts[label] / n_ion  # each undirected edge is a hop for both of its sites
        middle_fp = _fingerprint(prim, (start + end) / 2)
        key = (classes[label], start_label, end_label, -multiplicity, start_fp, end_fp, middle_fp)
        result.append(_Candidate(key, label, lengths[label], start, end, start_label, end_label, multiplicity))
    return result


def canonical_cell(structure: Structure) -> Structure:
    """The Niggli-reduced primitive cell, undecorated (no oxidation states or site properties), same Cartesian frame."""
    plain = Structure(structure.lattice, [site.specie.symbol for site in structure], structure.frac_coords)
    return plain.get_primitive_structure(tolerance=PRIMITIVE_TOL).get_reduced_structure()


def automatic_max_hop(structure: Structure, ion: str) -> float:
    """pymatgen-analysis-diffusion's automatic hop-length limit (DistinctPathFinder, perc_mode='>1d') in Å."""
    return float(DistinctPathFinder(structure, ion, max_path_length=None, symprec=SYMPREC).max_path_length)


def wyckoff_labels(structure: Structure, ion: str) -> list[str]:
    """Per site: element and Wyckoff position of the standard conventional cell (e.g. 'F 8c') in a canonical origin.

    spglib's letters depend on which of several equivalent origins it picks (Ca 4a or 4b in fluorite, F 4f or 4g in
    rutile), and that depends on how the cell is placed. Each atom is tried at the origin and the assignment with
    the earliest letters wins, compared element by element: other elements by decreasing electronegativity, `ion`
    last. Any placement of a crystal then gets the same letters, mostly the conventional ones (Ca 4a/F 8c,
    Mg 2a/F 4f, Mg 1a/K 1b/F 3d in KMgF3).
    """
    cell_matrix, frac = structure.lattice.matrix, np.array(structure.frac_coords)
    symbols = [site.specie.symbol for site in structure]
    numbers = [site.specie.Z for site in structure]
    elements = sorted(
        set(structure.composition.elements),
        key=lambda el: (el.symbol == ion, -(el.X if not math.isnan(el.X) else 0.0), el.symbol),
    )
    best_key, best = None, None
    for origin in frac:
        cell = (cell_matrix, frac - origin, numbers)
        dataset = spglib.get_symmetry_dataset(cell, symprec=SYMPREC,  # type: ignore[arg-type]  # arrays are fine
                                              angle_tolerance=ANGLE_TOL)
        if dataset is None:
            formula = structure.composition.reduced_formula
            raise InputError(f"{formula}: spglib found no symmetry ({spglib.get_error_message()})")
        key = tuple(
            tuple(sorted(letter for sym, letter in zip(symbols, dataset.wyckoffs, strict=True) if sym == el.symbol))
            for el in elements
        )
        if best_key is None or key < best_key:
            per_cell = len(dataset.std_types) / len(structure)  # conventional cell / this cell
            orbit_size = Counter(dataset.equivalent_atoms)
            best_key = key
            best = [
                f"{symbol} {round(orbit_size[orbit] * per_cell)}{letter}"
                for symbol, orbit, letter in zip(symbols, dataset.equivalent_atoms, dataset.wyckoffs, strict=True)
            ]
    assert best is not None
    return best


def _check_input(structure: Structure, ion: str) -> None:
    formula = structure.composition.reduced_formula
    if not structure.is_ordered:
        raise InputError(f"{formula} is disordered (partial occupancies): hops need an ordered structure")
    if ion not in {el.symbol for el in structure.composition.elements}:
        raise InputError(f"no {ion} sites in {formula}")


def _check_graph_size(prim: Structure, ion: str, limit: float) -> None:
    """Refuse limits that would make the hop graph (one MigrationHop per edge) explode; estimate from ion density."""
    n_ion = sum(1 for site in prim if site.specie.symbol == ion)
    estimate = n_ion * (n_ion / prim.volume) * (4 / 3) * math.pi * limit**3 / 2
    if estimate > MAX_GRAPH_HOPS:
        raise InputError(
            f"{prim.composition.reduced_formula}: a {limit:.2f} Å hop limit gives about {estimate:.0f} "
            f"{ion}-{ion} hops per cell (at most {MAX_GRAPH_HOPS}); use a shorter max hop"
        )


def _length_classes(lengths: dict[int, float]) -> dict[int, int]:
    """Number the distinct lengths in increasing order; lengths within LENGTH_TOL of their neighbour share a number."""
    order = sorted(lengths, key=lengths.__getitem__)
    classes, current, previous = {}, -1, -math.inf
    for label in order:
        if lengths[label] - previous > LENGTH_TOL:
            current += 1
        classes[label] = current
        previous = lengths[label]
    return classes


def _fingerprint(prim: Structure, cart: np.ndarray) -> tuple[tuple[str, float], ...]:
    """Neighbour shell around a point as sorted (element, rounded distance) pairs: a cell-independent tie-breaker."""
    sites = prim.get_sites_in_sphere(cart, FINGERPRINT_CUTOFF)
    return tuple(sorted((site.specie.symbol, round(float(site.nn_distance), FINGERPRINT_DECIMALS)) for site in sites))


def _dimensionality(only_sites: Structure, edges: list[Edge], labels: set[int]) -> int:
    """Larsen dimensionality (0-3) of the ion network made of the hops whose label is in `labels`."""
    chosen = {(u, v, (0, 0, 0), image): None for u, v, image, label in edges if label in labels}
    return int(get_dimensionality_larsen(StructureGraph.from_edges(only_sites, chosen)))


def _match_site(structure: Structure, ion: str, cart: np.ndarray) -> tuple[int, np.ndarray]:
    """Index of the `ion` site of `structure` at `cart` (modulo the lattice) and the translation that reaches it."""
    delta = structure.lattice.get_fractional_coords(cart) - structure.frac_coords
    image = np.round(delta)
    dist = np.linalg.norm(structure.lattice.get_cartesian_coords(delta - image), axis=1)
    dist[[site.specie.symbol != ion for site in structure]] = np.inf
    index = int(np.argmin(dist))
    if dist[index] > SITE_MATCH_TOL:
        raise RuntimeError(f"no {ion} site of the given cell at {cart} (closest {dist[index]:.4f} Å): mapping failed")
    return index, image[index].astype(int)


def _locate(structure: Structure, ion: str, start: np.ndarray, end: np.ndarray) -> tuple[int, int, np.ndarray]:
    """A hop of the canonical cell (Cartesian start and end) in the given structure: start and end site indices and
    the end site's lattice image, with the start in the home cell (the given site's own coordinates)."""
    start_index, _ = _match_site(structure, ion, start)
    start_frac = np.array(structure[start_index].frac_coords)
    end_frac = start_frac + structure.lattice.get_fractional_coords(end - start)
    end_index, _ = _match_site(structure, ion, structure.lattice.get_cartesian_coords(end_frac))
    end_image = np.round(end_frac - structure[end_index].frac_coords).astype(int)
    return start_index, end_index, end_image


def _float3(values: np.ndarray) -> Vector:
    return (float(values[0]), float(values[1]), float(values[2]))


def _int3(values) -> Image:  # noqa: ANN001 - any 3-sequence of integers
    return (int(values[0]), int(values[1]), int(values[2]))
