"""Crystals for the tests (a helper module, not a test module): the bundled, verified structures and fluorite CaF2.

hopflow/data/bundled_structures.json ships the verified crystal data of shared/data/fluoride-crystals.json (space
group, lattice, Wyckoff sites, oxidation states, reference) plus the project's own verified additions. Test modules
import from here (or take the fixtures of conftest.py that wrap it), never from one another.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from pymatgen.core import Lattice, Structure

import hopflow
from hopflow.tasks.images import HopImages, hop_images
from hopflow.tasks.pathways import find_pathways

BUNDLED = Path(hopflow.__file__).resolve().parent / "data" / "bundled_structures.json"


@cache
def _entries() -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in json.loads(BUNDLED.read_text())}


def bundled_entry(name: str) -> dict[str, Any]:
    """The bundled record of `name` (lattice, sites, oxidation states, reference, checks); a copy."""
    return json.loads(json.dumps(_entries()[name]))


def bundled_names() -> list[str]:
    return list(_entries())


def crystal(name: str, *, oxidation_states: bool = False, a: float | None = None) -> Structure:
    """A bundled crystal in its conventional cell, built from its space group and Wyckoff sites (optionally with
    oxidation states, or a cubic one with another lattice constant a)."""
    entry = _entries()[name]
    lat = dict(entry["lattice"])
    if a is not None:
        lat.update(a=a, b=a, c=a)
    lattice = Lattice.from_parameters(lat["a"], lat["b"], lat["c"], lat["alpha"], lat["beta"], lat["gamma"])
    structure = Structure.from_spacegroup(
        entry["spacegroup"], lattice, [s["species"] for s in entry["sites"]], [s["coords"] for s in entry["sites"]]
    )
    if oxidation_states:
        structure.add_oxidation_state_by_element(entry["oxidation_states"])
    return structure


def lattice_a(name: str) -> float:
    """The bundled lattice constant a of `name` in Å."""
    return float(_entries()[name]["lattice"]["a"])


CAF2_A = lattice_a("CaF2")
"""Fluorite's lattice constant, 5.4631 Å: the bundled value, from S. Speziale and T. S. Duffy, Phys. Chem. Miner. 29,
465-472 (2002), COD 9007060 (X-ray density 3.18 g/cm³ at a = 5.463 Å agrees, see the bundled record's checks)."""


def caf2(a: float = CAF2_A, *, oxidation_states: bool = False) -> Structure:
    """Conventional fluorite CaF2 (Fm-3m, Ca 4a, F 8c; 12 sites), the bundled crystal, at another a if given."""
    return crystal("CaF2", oxidation_states=oxidation_states, a=a)


SMALL_CELLS = {"HOPFLOW_SUPERCELL_MIN_LENGTH": "5", "HOPFLOW_SUPERCELL_MIN_ATOMS": "1",
               "HOPFLOW_SUPERCELL_MAX_ATOMS": "30", "HOPFLOW_NIMAGES": "3"}
"""Small vacancy supercells (CaF2 11 atoms, LiF 63) and 3 images keep CHGNet on 2 CPU cores quick."""


@cache
def caf2_hop() -> HopImages:
    """CaF2, shortest F-vacancy hop (a/2 along <100>), 3 IDPP images in the 2x2x2 cell (95 atoms)."""
    structure = caf2(oxidation_states=True)
    record = find_pathways(structure, ion="F", max_hop=3.0, max_paths=1)[0]
    return hop_images(structure, record, nimages=3, min_length=7.0, min_atoms=1, max_atoms=200)
