"""The universal potentials on real CaF2 cells: offline loading, shared weights, single points, relaxations."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
from crystals import CAF2_A, caf2
from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from hopflow.engines import MODELS, canonical_model, model_version, model_versions
from hopflow.errors import InputError
from hopflow.tasks.engines.potentials import (
    calculator,
    pick_device,
    relax_bulk,
    relax_positions,
    single_points,
)


def fluorite(a: float = CAF2_A) -> Structure:
    """The CaF2 conventional cell (12 atoms) with oxidation states, which the potentials must not see."""
    return caf2(a, oxidation_states=True)


@cache
def vacancy_cell() -> Structure:
    """A 2x2x2 supercell of the primitive cell (24 sites) without its last F: 23 atoms."""
    s = fluorite().get_primitive_structure() * (2, 2, 2)
    s.remove_sites([len(s) - 1])
    return s


def test_model_names() -> None:
    assert canonical_model("0.3.0") == "chgnet-0.3.0"  # CHGNet's own name, what the CHGNet-only engines stored
    assert [canonical_model(m) for m in MODELS] == list(MODELS)
    with pytest.raises(InputError, match="chgnet-0.3.0, 7net-0"):
        canonical_model("mace-mp-0")
    assert model_version("7net-0").startswith("sevenn-") and model_version("7net-0").endswith("+7net-0")
    assert model_version("0.3.0").startswith("chgnet-") and model_version("0.3.0").endswith("+0.3.0")
    assert {"sevenn", "torch", "ase", "pymatgen"} <= set(model_versions("7net-0"))
    assert model_versions("0.3.0")["model"] == "chgnet-0.3.0" and "chgnet" in model_versions("0.3.0")
    assert pick_device("cpu") == "cpu"


@pytest.mark.parametrize("model", MODELS)
def test_both_models_load_offline_and_give_finite_energies_and_forces(model: str) -> None:
    device = pick_device(None)
    first, second = calculator(model, device), calculator(model, device)
    assert first is not second and first.model is second.model  # fresh calculators, one network per process
    (energy, force), = single_points([vacancy_cell()], model, device, forces=True)
    (energy_alone, no_force), = single_points([vacancy_cell()], model, device)
    assert no_force is None and energy_alone == pytest.approx(energy, abs=1e-5)  # no backward pass, same energy
    assert math.isfinite(energy) and math.isfinite(force)
    assert -6.5 < energy / 23 < -5.0  # eV/atom of CaF2 (MPtrj scale), not a unit mix-up
    assert 0.0 < force < 2.0  # the vacancy's neighbours are pulled, but gently


@pytest.mark.parametrize("model", MODELS)
def test_bulk_relaxation_keeps_fluorite(model: str) -> None:
    strained = fluorite(CAF2_A * 1.02).get_primitive_structure()
    r = relax_bulk(strained, model, "cpu", fmax=0.01, steps=100)
    assert r.converged and r.max_force < 0.01 and r.steps < 100
    assert SpacegroupAnalyzer(r.structure, symprec=1e-3).get_space_group_symbol() == "Fm-3m"
    a = r.structure.lattice.a * math.sqrt(2)  # the primitive fcc vector is a/√2
    assert a == pytest.approx(CAF2_A, rel=0.03)
    assert [s.specie.symbol for s in r.structure] == [s.specie.symbol for s in strained]  # site order kept
    assert np.allclose(r.structure.frac_coords, strained.frac_coords, atol=1e-6)  # every atom on its Wyckoff site
    assert r.energy == pytest.approx(single_points([r.structure], model, "cpu")[0][0], abs=1e-4)  # whole cell


def test_position_relaxation_converges_a_vacancy_cell() -> None:
    start = vacancy_cell()
    (before, force_before), = single_points([start], "7net-0", "cpu", forces=True)
    r = relax_positions(start, "7net-0", "cpu", fmax=0.05, steps=200)
    assert r.converged and r.max_force < 0.05 < force_before and r.energy < before
    assert r.structure.lattice == start.lattice  # fixed cell
    assert [s.species_string for s in r.structure] == [s.specie.symbol for s in start]  # same order, no charges
    assert not r.structure.site_properties
    moved = np.array([a.distance(b) for a, b in zip(start, r.structure, strict=True)])
    assert 0.01 < moved.max() < 0.5  # the vacancy's neighbours relax, nothing hops
