"""hop_images on fluorite CaF2: matching atom order, one ion moving by the hop length, IDPP images, clear errors."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from crystals import crystal, lattice_a

from hopflow.errors import InputError
from hopflow.tasks.images import HopImages, displacements, hop_images
from hopflow.tasks.pathways import PathwayRecord, find_pathways

SUPERCELL = {"min_length": 10.0, "min_atoms": 40, "max_atoms": 240}


@cache
def _caf2_paths() -> tuple[PathwayRecord, ...]:
    return tuple(find_pathways(crystal("CaF2", oxidation_states=True), ion="F", max_hop=4.0, max_paths=5))


@cache
def _shortest_idpp() -> HopImages:
    return hop_images(crystal("CaF2", oxidation_states=True), _caf2_paths()[0], nimages=3, **SUPERCELL)


def test_end_points_share_atom_order_and_only_the_ion_moves() -> None:
    result = _shortest_idpp()
    a = lattice_a("CaF2")
    start, end = result.images[0], result.images[-1]
    assert len(result.images) == 5 and result.nimages == 3
    # 2x2x2 conventional cells (10.93 Å >= 10 Å): 96 atoms less the vacancy
    assert result.supercell_matrix == ((2, 0, 0), (0, 2, 0), (0, 0, 2))
    assert result.supercell_size == 8
    assert {len(image) for image in result.images} == {95} and result.nsites == 95
    assert min(start.lattice.abc) >= 10.0
    for image in result.images:
        assert [site.species for site in image] == [site.species for site in start]
        assert image.lattice == start.lattice
    moved = displacements(start, end)
    assert moved[result.moving_index] == pytest.approx(a / 2, abs=1e-6)
    assert result.hop_length == pytest.approx(a / 2, abs=1e-6)
    assert np.delete(moved, result.moving_index).max() < 1e-8
    assert start[result.moving_index].specie.symbol == "F"
    assert start.composition.element_composition.as_dict() == {"Ca": 32, "F": 63}


def test_idpp_midpoint_is_the_middle_of_the_hop() -> None:
    result = _shortest_idpp()
    start, middle = result.images[0], result.images[2]
    # by symmetry the middle image of a <100> fluorite hop holds the ion halfway
    assert displacements(start, middle)[result.moving_index] == pytest.approx(result.hop_length / 2, abs=1e-3)
    # IDPP lets the neighbours relax a little around the moving ion (linear interpolation would not move them)
    others = np.delete(displacements(start, middle), result.moving_index)
    assert 0.01 < others.max() < 0.5


def test_linear_images_and_vacancy_charge() -> None:
    structure = crystal("CaF2")  # no oxidation states
    result = hop_images(structure, _caf2_paths()[1], nimages=4, idpp=False, **SUPERCELL)
    assert not result.idpp and len(result.images) == 6
    steps = [displacements(result.images[0], image)[result.moving_index] for image in result.images]
    assert steps == pytest.approx([i * lattice_a("CaF2") / np.sqrt(2) / 5 for i in range(6)], abs=1e-6)
    assert result.vacancy_charge is None
    assert _shortest_idpp().vacancy_charge == pytest.approx(1.0)  # an F- vacancy leaves a +1 cell


def test_a_migration_hop_works_as_well_as_a_record() -> None:
    structure = crystal("CaF2", oxidation_states=True)
    hop = _caf2_paths()[0].as_hop(structure)
    result = hop_images(structure, hop, nimages=1, idpp=False, **SUPERCELL)
    assert displacements(result.images[0], result.images[-1])[result.moving_index] == pytest.approx(hop.length)


def test_defaults_come_from_settings(monkeypatch) -> None:
    from hopflow.settings import get_settings

    monkeypatch.setenv("HOPFLOW_NIMAGES", "1")
    monkeypatch.setenv("HOPFLOW_SUPERCELL_MIN_LENGTH", "5.0")
    monkeypatch.setenv("HOPFLOW_SUPERCELL_MIN_ATOMS", "1")
    get_settings.cache_clear()
    result = hop_images(crystal("CaF2"), _caf2_paths()[0], idpp=False)
    assert len(result.images) == 3 and result.nsites == 11  # one conventional cell less the vacancy


def test_a_hop_as_long_as_the_cell_is_refused() -> None:
    primitive = crystal("CaF2").get_primitive_structure()
    longer = find_pathways(primitive, ion="F", max_hop=4.0, max_paths=5)[1]
    # a/sqrt2 is a lattice vector of the primitive cell: in that cell the ion would hop onto its own image
    with pytest.raises(InputError, match="0 atoms move between the hop's end points"):
        hop_images(primitive, longer, nimages=1, idpp=False, min_length=1.0, min_atoms=1, max_atoms=3)
    result = hop_images(primitive, longer, nimages=1, idpp=False, min_length=5.0, min_atoms=1, max_atoms=30)
    assert displacements(result.images[0], result.images[-1])[result.moving_index] == pytest.approx(longer.length)


def test_a_record_of_another_structure_is_refused() -> None:
    with pytest.raises(InputError, match="is not a hop of this structure"):
        hop_images(crystal("SrF2"), _caf2_paths()[0], nimages=1, idpp=False)
