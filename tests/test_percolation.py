"""The per-material answer: the periodic hop network from real pathways, percolation thresholds E*(d), bounds when
hops are unknown or cut off, and transition-state thresholds with two site orbits."""

from __future__ import annotations

import dataclasses

import crystals
import pytest
from pymatgen.core import Lattice, Structure

from hopflow.percolation import HopBarrier, hop_network, material_barriers, unestimated
from hopflow.tasks.pathways import PathwayRecord, find_pathways


def _hops(records: list[PathwayRecord], barriers: list[float | None]) -> list[HopBarrier]:
    return [HopBarrier(rank, r.start_frac, r.end_frac, r.start_label, r.end_label, barrier)
            for rank, (r, barrier) in enumerate(zip(records, barriers, strict=True))]


def _values(result, attribute: str) -> list[float | None]:
    return [getattr(result.at(d), attribute) for d in (1, 2, 3)]


@pytest.fixture(scope="module")
def rutile() -> tuple[Structure, list[PathwayRecord]]:
    """MgF2: three F hops up to 3.1 Å, by length: 2.57 Å (0D alone), 2.81 Å (3D alone), the c axis 3.05 Å (1D)."""
    mgf2 = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.621, 3.052), ["Mg", "F"],
                                     [[0, 0, 0], [0.303, 0.303, 0]])
    records = find_pathways(mgf2, ion="F", max_hop=3.1, max_paths=5)
    assert [round(r.length, 2) for r in records] == [2.57, 2.81, 3.05]
    return mgf2, records


@pytest.fixture(scope="module")
def fluorite() -> tuple[Structure, list[PathwayRecord]]:
    """CaF2 primitive cell: the a/2 hop (2.73 Å) and the a/√2 hop (3.86 Å)."""
    caf2 = crystals.caf2()
    records = find_pathways(caf2.get_primitive_structure(), ion="F", max_hop=4.0, max_paths=5)
    assert [round(r.length, 2) for r in records] == [2.73, 3.86]
    return caf2.get_primitive_structure(), records


def test_network_has_every_equivalent_hop_and_the_stored_dimensionality(rutile, fluorite) -> None:
    for structure, records in (rutile, fluorite):
        network = hop_network(structure, _hops(records, [None] * len(records)))
        n_ion = len(network.sites)
        for rank, record in enumerate(records):
            assert len(network.edges[rank]) == record.multiplicity * n_ion / 2  # undirected, each counted once
            assert network.dimensionality([rank]) == record.dimensionality
    network = hop_network(rutile[0], _hops(rutile[1], [None] * 3))
    assert [network.dimensionality([rank]) for rank in range(3)] == [0, 3, 1]  # the c-axis hop alone is 1D
    assert network.dimensionality([0, 2]) == 1 and network.dimensionality([]) == 0


def test_rutile_thresholds_rise_with_dimensionality(rutile) -> None:
    structure, records = rutile
    # lowest: the c-axis chains (1D); then the 2.57 Å hop (ladders, still 1D); then the 2.81 Å hop makes it 3D
    result = material_barriers(structure, _hops(records, [0.35, 0.5, 0.2]), cut_off=False)
    assert result.mode == "barrier"
    assert _values(result, "status") == ["complete"] * 3
    assert _values(result, "e_star") == [0.2, 0.5, 0.5]
    assert _values(result, "lower") == _values(result, "upper") == [0.2, 0.5, 0.5]
    assert [result.at(d).pathway_ids for d in (1, 2, 3)] == [(2,), (0, 1, 2), (0, 1, 2)]


def test_an_unknown_hop_gives_bounds(rutile) -> None:
    structure, records = rutile
    # the c-axis hop unknown: at zero it percolates in 1D at once; the known ones reach 3D only at 0.6
    result = material_barriers(structure, _hops(records, [0.3, 0.6, None]), cut_off=False)
    assert _values(result, "status") == ["incomplete"] * 3 and _values(result, "e_star") == [None] * 3
    assert _values(result, "lower") == [0.0, 0.6, 0.6]
    assert _values(result, "upper") == [0.6, 0.6, 0.6]
    # the 2.81 Å hop unknown: the known ones stay 1D (no upper bound for 2D, 3D); at zero it makes 3D at once
    result = material_barriers(structure, _hops(records, [0.4, None, 0.2]), cut_off=False)
    assert _values(result, "upper") == [0.2, None, None]
    assert _values(result, "lower") == [0.0, 0.0, 0.0]
    # the 0D hop unknown: it cannot help at any barrier, so the bounds meet, still incomplete
    result = material_barriers(structure, _hops(records, [None, 0.8, 0.3]), cut_off=False)
    assert _values(result, "lower") == _values(result, "upper") == [0.3, 0.8, 0.8]
    assert _values(result, "status") == ["incomplete"] * 3 and result.at(1).pathway_ids == (2,)


def test_hops_that_cannot_percolate_have_no_answer(rutile) -> None:
    structure, records = rutile
    result = material_barriers(structure, _hops(records[:1], [0.1]), cut_off=False)
    assert _values(result, "status") == ["none"] * 3 and _values(result, "upper") == [None] * 3
    result = material_barriers(structure, _hops(records[:1], [0.1]), cut_off=True)  # longer hops may percolate
    assert _values(result, "status") == ["incomplete"] * 3
    assert _values(result, "lower") == [0.0] * 3 and _values(result, "upper") == [None] * 3


def test_fluorite_percolates_in_3d_through_its_shortest_hop(fluorite) -> None:
    structure, records = fluorite
    result = material_barriers(structure, _hops(records, [0.3, 0.9]), cut_off=False)
    assert _values(result, "status") == ["complete"] * 3 and result.at(3).e_star == 0.3
    assert result.at(3).pathway_ids == (0,)
    cut = material_barriers(structure, _hops(records, [0.3, 0.9]), cut_off=True)
    assert cut.at(3).status == "incomplete" and (cut.at(3).lower, cut.at(3).upper) == (0.0, 0.3)
    missing = material_barriers(structure, _hops(records, [None, 0.9]), cut_off=False)
    assert (missing.at(3).lower, missing.at(3).upper) == (0.0, 0.9)


@pytest.fixture(scope="module")
def two_orbits() -> tuple[Structure, list[PathwayRecord]]:
    """Tetragonal LiF2 stand-in with two F orbits, 1b and 1c. Hops by rank: 1b-1c (3D alone), 1b-1b in-plane (2D),
    1c-1c in-plane (2D), 1b-1b along c (1D), 1c-1c along c (1D)."""
    structure = Structure(Lattice.tetragonal(3.0, 4.2), ["Li", "F", "F"], [[0.5, 0.5, 0], [0, 0, 0], [0.5, 0.5, 0.5]])
    records = find_pathways(structure, ion="F", max_hop=4.3, max_paths=5)
    assert [(r.start_label, r.end_label, r.dimensionality) for r in records] == [
        ("F 1b", "F 1c", 3), ("F 1b", "F 1b", 2), ("F 1c", "F 1c", 2), ("F 1b", "F 1b", 1), ("F 1c", "F 1c", 1)]
    return structure, records


def test_transition_state_thresholds_with_two_site_orbits(two_orbits) -> None:
    structure, records = two_orbits
    site = {"F 1b": 0.0, "F 1c": -0.5}  # vacancy energies: the 1c vacancy is the lower one
    ts = [0.5, 0.15, 0.8, 0.7, -0.1]  # E_max per hop, on the same scale
    hops = []
    for hop, e_ts in zip(_hops(records, [0.0] * 5), ts, strict=True):
        start, end = site[hop.end_label], site[hop.start_label]  # the start image has its vacancy at the end site
        hops.append(dataclasses.replace(hop, barrier=e_ts - min(start, end), ts_energy=e_ts, start_energy=start,
                                        end_energy=end))
    result = material_barriers(structure, hops, cut_off=False)
    assert result.mode == "ts" and _values(result, "status") == ["complete"] * 3
    # 1D: the 1c chains (TS -0.1). 2D: + the 1b planes (TS 0.15), while the network touches 1c sites (-0.5): 0.65,
    # no single hop's barrier. 3D: + the 1b-1c hop (TS 0.5).
    assert _values(result, "e_star") == pytest.approx([0.4, 0.65, 1.0])
    assert [result.at(d).pathway_ids for d in (1, 2, 3)] == [(4,), (1, 4), (0, 1, 4)]

    # Barriers alone (no energies) rank the 1b planes first and close 3D through the 1b c-axis hop instead.
    plain = [dataclasses.replace(h, ts_energy=None, start_energy=None, end_energy=None) for h in hops]
    barrier_mode = material_barriers(structure, plain, cut_off=False)
    assert barrier_mode.mode == "barrier"
    assert _values(barrier_mode, "e_star") == pytest.approx([0.15, 0.15, 0.7])

    # The 1b-1c hop unknown: upper from the known TS (3D at 0.7 through the 1b c axis) minus the lowest site energy;
    # lower with it at its higher end's energy (0.0: 3D at once) minus the highest site energy.
    unknown = [dataclasses.replace(hops[0], barrier=None, ts_energy=None), *hops[1:]]
    bounds = material_barriers(structure, unknown, cut_off=False)
    assert bounds.mode == "ts" and _values(bounds, "status") == ["incomplete"] * 3
    assert _values(bounds, "upper") == pytest.approx([0.4, 0.65, 1.2])
    assert _values(bounds, "lower") == pytest.approx([0.0, 0.0, 0.0])


def test_without_any_known_hop_the_answer_needs_no_network(rutile) -> None:
    structure, records = rutile
    for hops, cut_off in ((records, False), (records[:1], False), (records[:1], True)):
        built = material_barriers(structure, _hops(hops, [None] * len(hops)), cut_off=cut_off)
        reach = max(r.dimensionality_cumlengths for r in hops)
        assert unestimated(reach, cut_off=cut_off) == built


def test_site_orbits_come_from_symmetry_not_labels(two_orbits) -> None:
    """One Wyckoff label can name several orbits (Na3AlF6's three F 4e): the answer must not change when the two F
    orbits share a label. The lowest TS is the 1c chain, which touches only the higher-energy 1c sites."""
    structure, records = two_orbits
    site = {"F 1b": -0.5, "F 1c": 0.0}
    ts = [0.5, 0.4, 0.8, 0.3, 0.2]
    hops = []
    for hop, e_ts in zip(_hops(records, [0.0] * 5), ts, strict=True):
        start, end = site[hop.end_label], site[hop.start_label]
        hops.append(dataclasses.replace(hop, barrier=e_ts - min(start, end), ts_energy=e_ts, start_energy=start,
                                        end_energy=end))
    expected = material_barriers(structure, hops, cut_off=False)
    assert _values(expected, "e_star") == pytest.approx([0.2, 0.9, 0.9])  # 3D: the 1b planes and 1b chains
    same_label = [dataclasses.replace(h, start_label="F 2x", end_label="F 2x") for h in hops]
    assert material_barriers(structure, same_label, cut_off=False) == expected
