"""The per-material answer: percolation barriers E*(d) of a structure's periodic hop network, from its distinct hops
(docs/estimates.md, "The per-material answer")."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pymatgen's graphs and dimensionality take 4 s to import: only where a network is built
    from pymatgen.core import Structure

SYMPREC = 0.1
"""Å: symmetry tolerance of the operations that expand a hop into its equivalent copies (as tasks.pathways)."""
SITE_MATCH_TOL = 0.25
"""Å: how close a symmetry image of a hop end must lie to an ion site to be that site."""
DIMENSIONS = (1, 2, 3)

Vector = tuple[float, float, float]
Image = tuple[int, int, int]
Edge = tuple[int, int, Image]
"""An undirected edge of the ion network: from ion site, to ion site, lattice image of the to-site."""


@dataclass(frozen=True)
class HopBarrier:
    """One distinct hop of a structure with what is known of its barrier (None: not estimated, or only flagged).

    Coordinates are fractional in the stored structure's cell, the end unwrapped (the `pathways` columns)."""

    pathway_id: int
    start_frac: Vector
    end_frac: Vector
    start_label: str
    end_label: str
    barrier: float | None = None
    ts_energy: float | None = None
    """E_max of the hop's profile (eV), comparable across the structure's hops (same supercell, same model)."""
    start_energy: float | None = None
    """Energy of the start image: ion at the start site, vacancy at the end site."""
    end_energy: float | None = None
    """Energy of the end image: vacancy at the start site."""


@dataclass(frozen=True)
class HopNetwork:
    """The periodic ion network: the ion-only sites and, per distinct hop, all its symmetry-equivalent edges."""

    sites: Structure
    edges: Mapping[int, frozenset[Edge]]
    ends: Mapping[int, tuple[int, int]]
    """Per distinct hop, the site orbits of its start and end (each orbit named by its lowest ion-site index): the
    keys of the site energies, since one Wyckoff label can name several orbits (Na3AlF6's three F 4e)."""

    def dimensionality(self, pathway_ids: Iterable[int]) -> int:
        """Larsen dimensionality (0-3) of the network made of the given hop types."""
        from pymatgen.analysis.dimensionality import get_dimensionality_larsen
        from pymatgen.core.graphs import StructureGraph

        chosen = {(u, v, (0, 0, 0), image): None for pid in set(pathway_ids) for u, v, image in self.edges[pid]}
        if not chosen:
            return 0
        return int(get_dimensionality_larsen(StructureGraph.from_edges(self.sites, chosen)))


@dataclass(frozen=True)
class Percolation:
    """E*(d) of one dimensionality d, or its bounds.

    status: `complete` (e_star = lower = upper), `incomplete` (bounds only: upper from the known hops, None when they
    never reach d; lower with the unknown hops at zero), `none` (the listed hops cannot reach d at any barrier)."""

    dimension: int
    status: str
    e_star: float | None = None
    lower: float | None = None
    upper: float | None = None
    pathway_ids: tuple[int, ...] = ()
    """The known hops of the percolating network (of e_star, or of the upper bound)."""


@dataclass(frozen=True)
class MaterialBarriers:
    """A structure's percolation barriers in 1, 2 and 3 dimensions."""

    mode: str
    """`ts` (threshold over transition-state energies, minus the lowest site energy) or `barrier` (over barriers)."""
    dimensions: tuple[Percolation, Percolation, Percolation]

    def at(self, d: int) -> Percolation:
        """The answer for dimensionality d (1, 2 or 3)."""
        return self.dimensions[DIMENSIONS.index(d)]


def hop_network(structure: Structure, hops: Sequence[HopBarrier]) -> HopNetwork:
    """Expand each distinct hop into all its symmetry-equivalent edges of the periodic ion network."""
    from pymatgen.core import Structure
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    if not hops:
        raise ValueError("a hop network needs at least one hop")
    symbol = structure[_nearest(structure, structure.frac_coords, hops[0].start_frac)[0]].specie.symbol
    indices = [i for i, site in enumerate(structure) if site.specie.symbol == symbol]
    sites = Structure(structure.lattice, [symbol] * len(indices), structure.frac_coords[indices])
    ops = SpacegroupAnalyzer(structure, symprec=SYMPREC).get_symmetry_operations()
    orbit = [min(_nearest(sites, sites.frac_coords, op.operate(frac))[0] for op in ops) for frac in sites.frac_coords]
    edges, ends = {}, {}
    for hop in hops:
        start, end = np.array(hop.start_frac), np.array(hop.end_frac)
        edges[hop.pathway_id] = frozenset(_edge(sites, op.operate(start), op.operate(end)) for op in ops)
        ends[hop.pathway_id] = (orbit[_nearest(sites, sites.frac_coords, start)[0]],
                                orbit[_nearest(sites, sites.frac_coords, end)[0]])
    return HopNetwork(sites, edges, ends)


def _edge(sites: Structure, start: np.ndarray, end: np.ndarray) -> Edge:
    """The undirected network edge between two points that lie on ion sites, in a canonical orientation."""
    i, start_image = _nearest(sites, sites.frac_coords, start)
    j, end_image = _nearest(sites, sites.frac_coords, end)
    image = tuple(int(x) for x in end_image - start_image)
    reverse = tuple(-x for x in image)
    return min((i, j, image), (j, i, reverse))  # type: ignore[return-value]


def _nearest(structure: Structure, frac_coords: np.ndarray,
             point: np.ndarray | Sequence[float]) -> tuple[int, np.ndarray]:
    """Index of the site at `point` (modulo the lattice) and the lattice image of it that lies there."""
    delta = np.asarray(point, dtype=float) - frac_coords
    image = np.round(delta)
    dist = np.linalg.norm(structure.lattice.get_cartesian_coords(delta - image), axis=1)
    index = int(np.argmin(dist))
    if dist[index] > SITE_MATCH_TOL:
        raise ValueError(f"no site at fractional {np.asarray(point).round(4).tolist()} (closest {dist[index]:.3f} Å)")
    return index, image[index].astype(int)


def site_energies(hops: Sequence[HopBarrier], ends: Mapping[int, tuple[int, int]]) -> dict[int, float]:
    """Energy of a vacancy per site orbit (`HopNetwork.ends`): a hop's start image has its vacancy at the END site,
    so E[end orbit] = start_energy and E[start orbit] = end_energy; the lowest over hops."""
    energies: dict[int, float] = {}
    for hop in hops:
        start, end = ends[hop.pathway_id]
        for orbit, energy in ((end, hop.start_energy), (start, hop.end_energy)):
            if energy is not None:
                energies[orbit] = min(energy, energies.get(orbit, energy))
    return energies


def _ts_energies(hops: Sequence[HopBarrier], ends: Mapping[int, tuple[int, int]]) -> dict[int, float] | None:
    """The site energies when every known hop has its transition-state and end energies and every site orbit of the
    hops gets an energy (then thresholds sweep transition states); None otherwise."""
    known = [h for h in hops if h.barrier is not None]
    if not known or any(None in (h.ts_energy, h.start_energy, h.end_energy) for h in known):
        return None
    energies = site_energies(known, ends)
    orbits = {orbit for h in hops for orbit in ends[h.pathway_id]}
    return energies if orbits <= energies.keys() else None


Sweep = list[tuple[float, frozenset[int], int]]
"""Ascending thresholds: (threshold, hops at or below it, their network's dimensionality)."""


def _sweep(network: HopNetwork, costs: Mapping[int, float]) -> Sweep:
    """Grow the network hop by hop in order of cost; stops once it is 3D."""
    steps: Sweep = []
    for threshold in sorted(set(costs.values())):
        chosen = frozenset(pid for pid, cost in costs.items() if cost <= threshold)
        steps.append((threshold, chosen, network.dimensionality(chosen)))
        if steps[-1][2] == 3:
            break
    return steps


def _first(steps: Sweep, d: int) -> tuple[float, frozenset[int]] | None:
    """The lowest threshold whose network reaches dimensionality d, and its hops."""
    return next(((threshold, chosen) for threshold, chosen, dim in steps if dim >= d), None)


def material_barriers(structure: Structure, hops: Sequence[HopBarrier], *, cut_off: bool) -> MaterialBarriers:
    """E*(d) for d = 1, 2, 3 of a structure from its distinct hops; bounds when a hop is unknown or `cut_off` (the
    listed hops are not all hops: longer ones were cut by max_paths or the automatic max_hop, so lower is 0).

    Thresholds sweep transition-state energies when every known hop has them and every site orbit gets an energy
    (`ts` mode: E* = T_d - lowest site energy the network touches), else barriers. Bounds in `ts` mode hold wherever
    the unknown transition states lie: upper = T_d of the known hops - the lowest site energy; lower = T_d with each
    unknown hop at its higher end's site energy - the highest site energy (at least 0)."""
    network = hop_network(structure, hops)
    energies = _ts_energies(hops, network.ends)
    known = {h.pathway_id: h for h in hops if h.barrier is not None}
    unknown = [h for h in hops if h.barrier is None]
    if energies is None:
        costs = {pid: float(h.barrier) for pid, h in known.items()}  # type: ignore[arg-type]
        floors = {h.pathway_id: 0.0 for h in unknown}
    else:
        costs = {pid: float(h.ts_energy) for pid, h in known.items()}  # type: ignore[arg-type]
        floors = {h.pathway_id: max(energies[orbit] for orbit in network.ends[h.pathway_id]) for h in unknown}
    reach = 3 if cut_off else network.dimensionality(h.pathway_id for h in hops)
    upper = _sweep(network, costs)
    lower = _sweep(network, {**costs, **floors}) if unknown and not cut_off else []
    answers = tuple(_answer(d, reach, upper, lower, network.ends, energies, incomplete=bool(unknown) or cut_off,
                            cut_off=cut_off) for d in DIMENSIONS)
    return MaterialBarriers("barrier" if energies is None else "ts", answers)  # type: ignore[arg-type]


def _answer(d: int, reach: int, upper: Sweep, lower: Sweep, ends: Mapping[int, tuple[int, int]],
            energies: Mapping[int, float] | None, *, incomplete: bool, cut_off: bool) -> Percolation:
    """One dimensionality's E* (or bounds) from the sweeps over the known hops and with the unknown ones at zero."""
    if reach < d:
        return Percolation(d, "none")
    hit = _first(upper, d)
    ids = tuple(sorted(hit[1])) if hit else ()
    if not incomplete:
        assert hit is not None  # every hop is known and together they reach d
        value = hit[0] - (_lowest_site(hit[1], ends, energies) if energies is not None else 0.0)
        return Percolation(d, "complete", value, value, value, ids)
    high, low = (max(energies.values()), min(energies.values())) if energies is not None else (0.0, 0.0)
    top = hit[0] - low if hit else None
    floor = _first(lower, d)  # the listed hops reach d, so with the unknown ones at zero they do
    bottom = 0.0 if cut_off or floor is None else max(0.0, floor[0] - high)
    return Percolation(d, "incomplete", None, bottom, top, ids)


def _lowest_site(chosen: Collection[int], ends: Mapping[int, tuple[int, int]], energies: Mapping[int, float]) -> float:
    """The lowest vacancy energy among the site orbits the chosen hops touch."""
    return min(energies[orbit] for pid in chosen for orbit in ends[pid])


def unestimated(reach: int, *, cut_off: bool) -> MaterialBarriers:
    """The answer when no hop's barrier is known, without building the network: `reach` is the dimensionality of
    all listed hops together (the stored `dimensionality_cumlengths` of the longest); lower 0 and no upper bound
    wherever they, or the cut-off ones, could percolate."""
    answers = tuple(Percolation(d, "incomplete", lower=0.0) if cut_off or reach >= d else Percolation(d, "none")
                    for d in DIMENSIONS)
    return MaterialBarriers("barrier", answers)  # type: ignore[arg-type]
