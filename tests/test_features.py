"""featurize on fluorite CaF2 against its geometry (a, √3a/4, Shannon radii) and its refusals of bad input."""

from __future__ import annotations

import math
from dataclasses import fields
from functools import cache
from typing import get_type_hints

import numpy as np
import pytest
from crystals import crystal, lattice_a
from matminer.featurizers.site import EwaldSiteEnergy
from pymatgen.core import Element, Species

from hopflow.errors import InputError
from hopflow.tasks.features import (
    EWALD_ACCURACY,
    NEIGHBOUR_CUTOFF,
    PathwayFeatures,
    _max_overlaps,
    featurize,
    shannon_radius,
)
from hopflow.tasks.images import HopImages, hop_images
from hopflow.tasks.pathways import PathwayRecord, find_pathways

SUPERCELL = {"min_length": 10.0, "min_atoms": 40, "max_atoms": 240}


@cache
def _paths() -> tuple[PathwayRecord, ...]:
    return tuple(find_pathways(crystal("CaF2", oxidation_states=True), ion="F", max_hop=4.0, max_paths=5))


@cache
def _features(rank: int) -> PathwayFeatures:
    return featurize(crystal("CaF2", oxidation_states=True), _paths()[rank], nimages=3, **SUPERCELL)


def test_every_feature_is_finite_and_the_composition_ones_are_exact() -> None:
    f = _features(0)
    a = lattice_a("CaF2")
    hints = get_type_hints(PathwayFeatures)
    numbers = {field.name for field in fields(PathwayFeatures) if hints[field.name] in (float, int, float | None)}
    assert {"length", "overlap_cation_max", "overlap_neutral_max", "nsites"} <= numbers
    # no neutral neighbours in CaF2: those overlaps are absent, not a sentinel; every other number is finite
    absent = {"overlap_neutral_start", "overlap_neutral_midpoint", "overlap_neutral_max", "overlap_neutral_max_change"}
    assert {name for name in numbers if getattr(f, name) is None} == absent
    assert [name for name in sorted(numbers - absent) if not math.isfinite(getattr(f, name))] == []
    assert f.ion == "F" and f.ion_oxidation_state == -1
    assert f.oxidation_states == {"Ca2+": 2.0, "F-": -1.0}
    assert f.radii == {"Ca2+": 1.00, "F-": 1.33}  # Shannon ionic radii, CN VI
    assert "ionic radii (not crystal radii)" in f.radii_description
    assert f.ion_fraction == pytest.approx(2 / 3)
    assert (f.nsites, f.nsites_supercell, f.nimages) == (12, 95, 3)
    assert f.min_cation_anion_distance == pytest.approx(a * math.sqrt(3) / 4, abs=1e-6)
    assert f.length_vs_dmin == pytest.approx(2 / math.sqrt(3), abs=1e-6)  # (a/2) / (√3a/4)
    assert (f.dimensionality, f.dimensionality_cumlengths) == (3, 3)


def test_overlap_grows_from_start_to_midpoint_on_the_shortest_hop() -> None:
    f = _features(0)
    a = lattice_a("CaF2")
    # start: F- in its Ca4 tetrahedron, r(F-) + r(Ca2+) - √3a/4
    assert f.overlap_cation_start == pytest.approx(1.33 + 1.00 - a * math.sqrt(3) / 4, abs=1e-6)
    # midpoint: between two Ca2+ at √2a/4 = 1.93 Å before IDPP, which pushes them apart a little
    assert f.overlap_cation_start + 0.2 < f.overlap_cation_midpoint < 2.33 - a * math.sqrt(2) / 4
    assert f.overlap_cation_max >= f.overlap_cation_midpoint
    assert f.overlap_cation_max_change == pytest.approx(f.overlap_cation_max - f.overlap_cation_start)
    # the nearest anion at the start is a/2 away; both hop sites are empty at the midpoint
    assert f.overlap_anion_start == pytest.approx(2 * 1.33 - a / 2, abs=1e-6)
    assert f.overlap_anion_midpoint < f.overlap_anion_start


def test_ewald_energy_rises_on_the_long_hop_and_falls_on_the_short_one() -> None:
    short, long = _features(0), _features(1)
    # <110> hop (a/√2): the ion passes close to other F- ions, its Coulomb site energy rises by ~0.8 eV
    assert long.ewald_energy_change > 0.3
    assert long.ewald_energy_max == pytest.approx(long.ewald_energy_midpoint)
    assert long.overlap_anion_max_change > short.overlap_anion_max_change
    # <100> hop (a/2): at the midpoint F- sits between two Ca2+ and has left both F sites, so its Coulomb energy
    # falls; the path's highest electrostatic energy is at its (equivalent) end points: the change is zero
    assert short.ewald_energy_midpoint < short.ewald_energy_start - 0.1
    assert short.ewald_energy_change == pytest.approx(0.0, abs=1e-6)


def test_images_can_be_reused() -> None:
    structure = crystal("CaF2", oxidation_states=True)
    images = hop_images(structure, _paths()[0], nimages=3, **SUPERCELL)
    assert featurize(structure, _paths()[0], images=images) == _features(0)
    with pytest.raises(ValueError, match="nimages=5"):
        featurize(structure, _paths()[0], images=images, nimages=5)


def test_oxidation_states_are_required() -> None:
    with pytest.raises(InputError, match="CaF2 has no oxidation states"):
        featurize(crystal("CaF2"), _paths()[0], nimages=1, **SUPERCELL)
    zero = crystal("CaF2")
    zero.add_oxidation_state_by_element({"Ca": 0, "F": 0})
    with pytest.raises(InputError, match="every oxidation state is 0"):
        featurize(zero, _paths()[0], nimages=1, **SUPERCELL)
    unbalanced = crystal("CaF2")
    unbalanced.add_oxidation_state_by_element({"Ca": 3, "F": -1})
    with pytest.raises(InputError, match="sum to"):
        featurize(unbalanced, _paths()[0], nimages=1, **SUPERCELL)


def test_the_migrating_ion_is_required() -> None:
    licl = crystal("LiF", oxidation_states=True)
    licl.replace_species({Species("F", -1): Species("Cl", -1)})
    with pytest.raises(InputError, match="no F sites in LiCl"):
        featurize(licl, _paths()[0], nimages=1, **SUPERCELL)


def test_shannon_radii_are_ionic_at_cn6_or_the_nearest_cn() -> None:
    assert shannon_radius(Species("F", -1)) == 1.33  # crystal radius would be 1.19
    assert shannon_radius(Species("Fe", 2)) == 0.78  # high spin
    assert shannon_radius(Species("N", -3)) == 1.46  # only CN IV tabulated
    sm = Element("Sm").data["Shannon radii"]["2"]
    assert shannon_radius(Species("Sm", 2)) == sm["VII"][""]["ionic_radius"]  # VII is nearest to VI
    assert shannon_radius(Species("Fe", 0)) == Element("Fe").atomic_radius
    with pytest.raises(InputError, match="no Shannon radius for Ca5\\+"):
        shannon_radius(Species("Ca", 5))


@cache
def _short_hop() -> HopImages:
    return hop_images(crystal("CaF2", oxidation_states=True), _paths()[0], nimages=1, **SUPERCELL)


def test_neighbour_cutoff_loses_no_overlap() -> None:
    """Every neighbour beyond NEIGHBOUR_CUTOFF overlaps less than the ones inside it: a search to twice the cutoff
    finds the same largest overlap of each class."""
    image, index = _short_hop().images[1], _short_hop().moving_index
    radii = {str(s): shannon_radius(s) for s in image.composition.elements}
    r_ion = radii[str(image[index].specie)]
    for kind in ("cation", "anion"):
        near = _max_overlaps(image, index, radii)[kind]
        far = max(r_ion + radii[str(n.specie)] - n.nn_distance
                  for n in image.get_neighbors(image[index], 2 * NEIGHBOUR_CUTOFF)
                  if (n.specie.oxi_state > 0) == (kind == "cation"))
        assert near == pytest.approx(far, abs=1e-12), kind


def test_ewald_accuracy_resolves_the_profile_to_a_millielectronvolt() -> None:
    """The Ewald profile of the moving ion at EWALD_ACCURACY decimal places matches one summed to 8 places: the
    energy change along the hop (what the features use) agrees within 1 meV."""
    hop = _short_hop()
    profiles = {}
    for accuracy in (EWALD_ACCURACY, 8):
        featurizer = EwaldSiteEnergy(accuracy=accuracy)
        energies = [featurizer.featurize(image, hop.moving_index)[0] for image in hop.images]
        profiles[accuracy] = np.array(energies) - energies[0]
    assert np.abs(profiles[EWALD_ACCURACY] - profiles[8]).max() < 1e-3
    assert abs(profiles[8][1]) > 0.1  # the energy really changes along the hop: the comparison is not of zeros
