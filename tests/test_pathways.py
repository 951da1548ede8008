"""find_pathways against crystallography (fluorite, rutile, rocksalt, olivine) and under every choice of cell."""

from __future__ import annotations

import math

import numpy as np
import pytest
from crystals import bundled_entry, bundled_names, crystal, lattice_a
from pymatgen.analysis.diffusion.neb.pathfinder import DistinctPathFinder
from pymatgen.core import Structure
from pymatgen.util.testing import MatSciTest

from hopflow.errors import InputError
from hopflow.tasks.pathways import PathwayRecord, automatic_max_hop, canonical_cell, find_pathways


def summary(paths: list[PathwayRecord]) -> list[tuple]:
    """The cell-independent part of each record (lengths compared apart, with a tolerance)."""
    return [
        (p.rank, p.start_label, p.end_label, round(p.multiplicity, 6), p.dimensionality,
         p.dimensionality_cumlengths, p.max_hop_automatic)
        for p in paths
    ]


def assert_located(structure: Structure, paths: list[PathwayRecord], ion: str) -> None:
    """Every record points at real ion sites of `structure`, and the hop vector has the hop's length."""
    for p in paths:
        assert structure[p.start_index].specie.symbol == ion
        assert structure[p.end_index].specie.symbol == ion
        np.testing.assert_allclose(structure[p.start_index].frac_coords, p.start_frac, atol=1e-9)
        np.testing.assert_allclose(np.array(structure[p.end_index].frac_coords) + p.end_image, p.end_frac, atol=1e-6)
        np.testing.assert_allclose(structure.lattice.get_cartesian_coords(p.end_frac), p.end_cart, atol=1e-6)
        assert np.linalg.norm(p.hop_vector) == pytest.approx(p.length, abs=1e-6)


def test_fluorite_caf2_hops_at_4_angstrom() -> None:
    structure = crystal("CaF2")
    a = lattice_a("CaF2")
    paths = find_pathways(structure, ion="F", max_hop=4.0, max_paths=5)
    # F sublattice is simple cubic with edge a/2: <100> hop a/2 (6 per F), <110> hop a/sqrt2 (12 per F)
    assert [p.length for p in paths] == pytest.approx([a / 2, a / math.sqrt(2)], abs=1e-4)
    assert [round(p.length, 3) for p in paths] == [2.732, 3.863]
    assert [p.multiplicity for p in paths] == [6, 12]
    assert [p.dimensionality for p in paths] == [3, 3]
    assert {p.start_label for p in paths} == {"F 8c"}
    assert [p.rank for p in paths] == [0, 1]
    assert all(not p.max_hop_automatic and p.max_hop == 4.0 for p in paths)
    assert_located(structure, paths, "F")


def test_fluorite_automatic_limit_gives_the_shortest_hop_only() -> None:
    paths = find_pathways(crystal("CaF2"), ion="F", max_hop=None, max_paths=5)
    assert [round(p.length, 3) for p in paths] == [2.732]
    assert paths[0].max_hop_automatic and paths[0].max_hop == pytest.approx(lattice_a("CaF2") / 2)


def test_rutile_mgf2_two_hops_at_the_automatic_limit() -> None:
    entry = bundled_entry("MgF2")
    a, c = entry["lattice"]["a"], entry["lattice"]["c"]
    x = entry["sites"][1]["coords"][0]
    # F at (x,x,0): shared octahedron edge to (1-x,1-x,0), and to (1/2-x,1/2+x,1/2) in the next chain
    shared_edge = (1 - 2 * x) * a * math.sqrt(2)
    next_chain = math.sqrt(((0.5 - 2 * x) * a) ** 2 + (a / 2) ** 2 + (c / 2) ** 2)
    expected = sorted([shared_edge, next_chain])
    paths = find_pathways(crystal("MgF2"), ion="F", max_hop=None, max_paths=5)
    assert [p.length for p in paths] == pytest.approx(expected, abs=1e-4)
    assert [round(p.length, 3) for p in paths] == [2.578, 2.812]
    # the shared-edge hop only links F pairs (0D); the longer one alone already percolates in 3D
    assert [(p.multiplicity, p.dimensionality, p.dimensionality_cumlengths) for p in paths] == [(1, 0, 0), (8, 3, 3)]


@pytest.mark.parametrize(("a", "rounded"), [(None, 2.841), (4.027, 2.848)])
def test_rocksalt_lif_hop_is_a_over_root_two(a: float | None, rounded: float) -> None:
    structure = crystal("LiF", a=a)
    edge = a or lattice_a("LiF")
    paths = find_pathways(structure, ion="F", max_hop=None, max_paths=5)
    assert len(paths) == 1
    assert paths[0].length == pytest.approx(edge / math.sqrt(2), abs=1e-4)
    assert round(paths[0].length, 3) == rounded
    assert paths[0].multiplicity == 12  # fcc anion sublattice


def test_lifepo4_lithium_has_one_hop_forming_1d_channels() -> None:
    structure = MatSciTest.get_structure("LiFePO4")
    paths = find_pathways(structure, ion="Li", max_hop=4.0, max_paths=5)
    assert len(paths) == 1
    assert paths[0].length == pytest.approx(3.03, abs=0.01)
    # olivine: Li chains along b, two neighbours each, one-dimensional diffusion (Morgan et al. 2004)
    assert (paths[0].multiplicity, paths[0].dimensionality) == (2, 1)
    assert paths[0].start_label == paths[0].end_label == "Li 4a"
    assert_located(structure, paths, "Li")


def _settings(structure: Structure) -> dict[str, Structure]:
    """Four cells of one crystal: primitive, conventional, 2x1x1 supercell, and a permuted, un-reduced, shifted cell."""
    permuted = structure.copy()
    # cyclic permutation of a, b, c followed by a -> a + b (det +1), then a rigid shift of every atom
    permuted.make_supercell([[1, 1, 0], [0, 0, 1], [1, 0, 0]])
    permuted.translate_sites(list(range(len(permuted))), [0.13, 0.27, 0.41])
    return {
        "primitive": structure.get_primitive_structure(),
        "conventional": structure,
        "supercell_2x1x1": structure * (2, 1, 1),
        "permuted_unreduced": permuted,
    }


@pytest.mark.parametrize(("name", "max_hop"), [("CaF2", 4.0), ("LiF", 4.5), ("MgF2", None), ("CeF3", None)])
def test_same_pathways_in_the_same_order_for_every_cell_choice(name: str, max_hop: float | None) -> None:
    results = {}
    for setting, structure in _settings(crystal(name)).items():
        paths = find_pathways(structure, ion="F", max_hop=max_hop, max_paths=5)
        assert_located(structure, paths, "F")
        results[setting] = paths
    reference = results["conventional"]
    assert len(reference) >= 2
    for setting, found in results.items():
        assert summary(found) == summary(reference), setting
        assert [p.length for p in found] == pytest.approx([p.length for p in reference], abs=1e-6), setting
        assert [p.max_hop for p in found] == pytest.approx([p.max_hop for p in reference], abs=1e-6), setting


@pytest.mark.parametrize("name", ["CaF2", "LiF"])
def test_cell_choices_are_really_different(name: str) -> None:
    cells = _settings(crystal(name))
    assert len({len(s) for s in cells.values()}) == 3  # the permuted cell has the conventional cell's size
    assert len({tuple(np.round(s.lattice.abc, 3)) for s in cells.values()}) == 4
    assert len(canonical_cell(cells["permuted_unreduced"])) == len(cells["primitive"])


def test_tysonite_cef3_orders_hops_between_different_orbits() -> None:
    paths = find_pathways(crystal("CeF3"), ion="F", max_hop=None, max_paths=5)
    assert [p.length for p in paths] == sorted(p.length for p in paths)
    assert len({p.start_label for p in paths} | {p.end_label for p in paths}) == 3  # 12g, 4d and 2a all involved
    assert all(p.start_label <= p.end_label for p in paths)
    # cumulative network never percolates in fewer dimensions than a longer prefix of it
    cumulative = [p.dimensionality_cumlengths for p in paths]
    assert cumulative == sorted(cumulative)


def test_oxidation_states_do_not_change_pathways() -> None:
    plain = find_pathways(crystal("CaF2"), ion="F", max_hop=4.0, max_paths=5)
    decorated_structure = crystal("CaF2", oxidation_states=True)
    decorated = find_pathways(decorated_structure, ion="F", max_hop=4.0, max_paths=5)
    assert summary(decorated) == summary(plain)
    assert [p.length for p in decorated] == [p.length for p in plain]
    assert decorated[0].as_hop(decorated_structure).length == pytest.approx(decorated[0].length)


def test_max_paths_keeps_the_shortest() -> None:
    paths = find_pathways(crystal("CaF2"), ion="F", max_hop=4.0, max_paths=1)
    assert [round(p.length, 3) for p in paths] == [2.732]


def test_as_hop_rebuilds_the_hop_in_its_structure() -> None:
    structure = crystal("MgF2")
    for p in find_pathways(structure, ion="F", max_hop=None, max_paths=5):
        hop = p.as_hop(structure)
        assert hop.length == pytest.approx(p.length, abs=1e-6)
        np.testing.assert_allclose(hop.isite.coords, p.start_cart, atol=1e-6)
    with pytest.raises(InputError, match="is not a hop of this structure"):
        p.as_hop(crystal("CaF2"))


def _ion_shells(structure: Structure, ion: str) -> list[list[float]]:
    """Per `ion` site: sorted distances to every other `ion` site up to the shortest lattice length, by brute force
    over periodic images (independent of pymatgen's neighbour search)."""
    frac = np.array([s.frac_coords for s in structure if s.specie.symbol == ion])
    shifts = np.array(np.meshgrid(*[range(-2, 3)] * 3, indexing="ij")).reshape(3, -1).T
    limit = min(structure.lattice.abc)
    shells = []
    for f in frac:
        d = np.linalg.norm(structure.lattice.get_cartesian_coords(
            (frac[:, None, :] + shifts[None, :, :] - f).reshape(-1, 3)), axis=1)
        shells.append(sorted(d[(d > 1e-6) & (d < limit)]))
    return shells


@pytest.mark.parametrize("name", ["MgF2", "CaF2", "CeF3", "Na3AlF6", "TlF"])
def test_automatic_limit_is_the_shell_that_connects_every_ion(name: str) -> None:
    """pymatgen-analysis-diffusion's '>1d' rule: every ion reaches its second-nearest ion (a chain), and the
    junction sites their third (a branch): max(max_i d2_i, min_j d3_j), from distances computed here."""
    prim = canonical_cell(crystal(name))
    shells = _ion_shells(prim, "F")
    path_cutoff = max(s[1] for s in shells)
    junction_cutoff = min(s[2] for s in shells if len(s) >= 3)
    limit = automatic_max_hop(prim, "F")
    assert limit == pytest.approx(max(path_cutoff, junction_cutoff), abs=1e-3)
    # every ion has at least two hops within the limit, so the hop graph has no dead ends
    assert all(sum(d <= limit + 1e-3 for d in s) >= 2 for s in shells)


@pytest.mark.parametrize("name", bundled_names())
def test_automatic_limit_is_the_librarys(name: str) -> None:
    """The automatic limit is pymatgen-analysis-diffusion's own choice: DistinctPathFinder with max_path_length=None
    and its defaults (perc_mode '>1d', symprec 0.1), asked here on the bundled conventional cell, not on the canonical
    primitive cell hopflow hands it; find_pathways records that limit on every hop it returns."""
    structure = crystal(name)
    library = DistinctPathFinder(structure, "F", max_path_length=None).max_path_length
    assert 2.0 < library < min(structure.lattice.abc)  # a real F-F shell, not the library's fallback
    assert automatic_max_hop(canonical_cell(structure), "F") == pytest.approx(library, abs=1e-3)
    paths = find_pathways(structure, ion="F", max_hop=None, max_paths=5)
    assert paths and all(p.max_hop_automatic and p.max_hop == pytest.approx(library, abs=1e-3) for p in paths)
    assert max(p.length for p in paths) <= library + 1e-3


def test_rutile_limit_is_beyond_the_shared_edge() -> None:
    """In rutile MgF2 each F has one F at 2.58 Å (the shared octahedral edge), so the limit must reach the next
    shell (2.81 Å, four F): hops along the edge alone pair the ions into dimers and go nowhere."""
    prim = canonical_cell(crystal("MgF2"))
    first, second = sorted({round(d, 3) for d in _ion_shells(prim, "F")[0]})[:2]
    assert first < 2.6 < second
    assert automatic_max_hop(prim, "F") == pytest.approx(second, abs=1e-3)


def test_bad_input_is_an_input_error_with_a_reason() -> None:
    caf2 = crystal("CaF2")
    with pytest.raises(InputError, match="no Cl sites in CaF2"):
        find_pathways(caf2, ion="Cl", max_hop=None, max_paths=5)
    with pytest.raises(InputError, match="no F-F hop up to 2.000"):
        find_pathways(caf2, ion="F", max_hop=2.0, max_paths=5)
    with pytest.raises(InputError, match="primitive cell has 3 sites, more than the limit of 2"):
        find_pathways(caf2, ion="F", max_hop=None, max_paths=5, max_sites=2)
    with pytest.raises(InputError, match="hops per cell"):
        find_pathways(caf2, ion="F", max_hop=80.0, max_paths=5)
    disordered = caf2.copy()
    disordered.replace(0, {"Ca": 0.5, "Sr": 0.5})
    with pytest.raises(InputError, match="disordered"):
        find_pathways(disordered, ion="F", max_hop=None, max_paths=5)
