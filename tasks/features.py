"""Empirical predictors of a hop's barrier: composition, geometry, ionic-radii overlap and Ewald energy on the path."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
from matminer.featurizers.site import EwaldSiteEnergy
from pymatgen.core import Element, Species, Structure

from hopflow.errors import InputError
from hopflow.tasks.images import HopImages, hop_images, oxidation_state
from hopflow.tasks.pathways import PathwayRecord

NEIGHBOUR_CUTOFF = 6.0
"""Å: neighbours of the moving ion considered for the radii overlap (beyond it every overlap is strongly negative)."""
EWALD_ACCURACY = 4
"""Decimal places of the Ewald sums (matminer's default None crashes; 4 is ample for differences of 0.01 eV)."""
RADIUS_TYPE = "ionic"
"""Shannon radius type: 'ionic' (Shannon 1976 IR, F⁻ 1.33 Å in CN VI), not 'crystal' (CR = IR ± 0.14 Å)."""
REFERENCE_CN = 6
"""Coordination number at which Shannon radii are read; the nearest tabulated one when CN VI is missing."""
CHARGE_TOL = 1e-2
"""Largest |sum of oxidation states| accepted as a neutral cell."""
RADII_DESCRIPTION = (
    "Shannon (1976) ionic radii (not crystal radii) at coordination VI, else the nearest tabulated coordination, "
    "high spin where both spins are tabulated, oxidation state rounded to an integer for the lookup; "
    "atomic radii for species with oxidation state 0"
)
"""How `radii` were chosen, recorded with every feature row."""

_ROMAN = dict(zip("I II III IV V VI VII VIII IX X XI XII XIII XIV".split(), range(1, 15), strict=True))


@dataclass(frozen=True)
class PathwayFeatures:
    """Predictors of one hop's migration barrier. Lengths in Å, energies in eV.

    Overlap of the moving ion with a neighbour j: r_ion + r_j - d_j (Å, Shannon ionic radii, see `radii_description`);
    positive when the spheres interpenetrate. Per image, the largest overlap over the neighbours of one class within
    NEIGHBOUR_CUTOFF (cations: oxidation state > 0, anions: < 0, neutral: 0); None when the class has no such neighbour.
    Images: the IDPP path of `nimages` images in the vacancy supercell (tasks.images.hop_images).
    """

    ion: str
    """Element symbol of the migrating ion."""
    ion_oxidation_state: float
    """Oxidation state of the migrating ion (e)."""
    oxidation_states: dict[str, float]
    """Oxidation state of every species in the structure, keyed by species string (e.g. 'Ca2+'), in e."""
    radii: dict[str, float]
    """Radius used for every species (Å), keyed as oxidation_states."""
    radii_description: str
    """Which radii were used (RADII_DESCRIPTION): Shannon ionic radii at CN VI."""
    ion_fraction: float
    """Atomic fraction of the migrating ion in the composition (F in CaF2: 2/3), dimensionless."""
    nsites: int
    """Sites in the structure's cell as given."""
    nsites_supercell: int
    """Atoms in each image of the vacancy supercell (the supercell less one ion)."""
    length: float
    """Hop length (Å)."""
    min_cation_anion_distance: float | None
    """Shortest cation–anion distance in the structure (Å); None without both cations and anions."""
    length_vs_dmin: float | None
    """Hop length divided by min_cation_anion_distance, dimensionless."""
    dimensionality: int
    """Dimensions (0–3) in which the network of this hop type alone percolates."""
    dimensionality_cumlengths: int
    """Dimensions (0–3) in which the network of this hop and all shorter hops percolates."""
    nimages: int
    """Intermediate images of the IDPP path the profiles were taken on."""
    overlap_cation_start: float | None
    """Largest overlap with a cation in the start image (Å)."""
    overlap_cation_midpoint: float | None
    """Largest overlap with a cation in the middle image (Å; the exact midpoint for odd nimages)."""
    overlap_cation_max: float | None
    """Largest overlap with a cation over all images (Å)."""
    overlap_cation_max_change: float | None
    """Largest increase of the cation overlap over its start value along the path (Å)."""
    overlap_anion_start: float | None
    """Largest overlap with an anion in the start image (Å)."""
    overlap_anion_midpoint: float | None
    """Largest overlap with an anion in the middle image (Å)."""
    overlap_anion_max: float | None
    """Largest overlap with an anion over all images (Å)."""
    overlap_anion_max_change: float | None
    """Largest increase of the anion overlap over its start value along the path (Å)."""
    overlap_neutral_start: float | None
    """Largest overlap with a neutral neighbour (oxidation state 0) in the start image (Å)."""
    overlap_neutral_midpoint: float | None
    """Largest overlap with a neutral neighbour in the middle image (Å)."""
    overlap_neutral_max: float | None
    """Largest overlap with a neutral neighbour over all images (Å)."""
    overlap_neutral_max_change: float | None
    """Largest increase of the neutral-neighbour overlap over its start value along the path (Å)."""
    ewald_energy_start: float
    """Ewald site energy of the moving ion in the start image (eV; matminer EwaldSiteEnergy, accuracy 4). The
    vacancy cell is charged and pymatgen leaves the uniform-background term out of site energies: that term is the
    same in every image, so differences along the path are exact and absolute values carry a constant offset."""
    ewald_energy_midpoint: float
    """Ewald site energy of the moving ion in the middle image (eV)."""
    ewald_energy_max: float
    """Largest Ewald site energy of the moving ion over all images (eV)."""
    ewald_energy_change: float
    """ewald_energy_max - ewald_energy_start (eV): the electrostatic rise along the path, 0 if it only falls."""


def featurize(
    structure: Structure,
    pathway: PathwayRecord,
    *,
    nimages: int | None = None,
    images: HopImages | None = None,
    min_length: float | None = None,
    min_atoms: int | None = None,
    max_atoms: int | None = None,
) -> PathwayFeatures:
    """Predictors of `pathway` (found in `structure`, which must carry oxidation states).

    The IDPP images are built with tasks.images.hop_images (settings defaults for nimages and the supercell) unless
    `images` from an earlier call are given.
    """
    formula = structure.composition.reduced_formula
    if pathway.ion not in {el.symbol for el in structure.composition.elements}:
        raise InputError(f"no {pathway.ion} sites in {formula}")
    oxidation_states = _oxidation_states(structure)
    if images is None:
        images = hop_images(
            structure, pathway, nimages=nimages, min_length=min_length, min_atoms=min_atoms, max_atoms=max_atoms
        )
    elif nimages is not None and images.nimages != nimages:
        raise ValueError(f"images have {images.nimages} intermediate images, nimages={nimages} was asked for")
    if images.vacancy_charge is None:
        raise InputError(f"{formula}: the hop images carry no oxidation states; build them from a decorated structure")

    radii = {str(species): shannon_radius(species) for species in sorted({site.specie for site in structure}, key=str)}
    moving = images.images[0][images.moving_index].specie
    middle = len(images.images) // 2
    per_image = [_max_overlaps(image, images.moving_index, radii) for image in images.images]
    overlaps = {kind: [image[kind] for image in per_image] for kind in _KINDS}
    ewald = _ewald_profile(images)
    d_min = min_cation_anion_distance(structure)

    return PathwayFeatures(
        ion=pathway.ion,
        ion_oxidation_state=oxidation_state(moving),
        oxidation_states=oxidation_states,
        radii=radii,
        radii_description=RADII_DESCRIPTION,
        ion_fraction=float(structure.composition.get_atomic_fraction(Element(pathway.ion))),
        nsites=len(structure),
        nsites_supercell=images.nsites,
        length=pathway.length,
        min_cation_anion_distance=d_min,
        length_vs_dmin=None if d_min is None else pathway.length / d_min,
        dimensionality=pathway.dimensionality,
        dimensionality_cumlengths=pathway.dimensionality_cumlengths,
        nimages=images.nimages,
        **{
            f"overlap_{kind}_{name}": value
            for kind, profile in overlaps.items()
            for name, value in _profile_summary(profile, middle).items()
        },
        ewald_energy_start=ewald[0],
        ewald_energy_midpoint=ewald[middle],
        ewald_energy_max=max(ewald),
        ewald_energy_change=max(ewald) - ewald[0],
    )


def shannon_radius(species: Species | Element) -> float:
    """Radius of a species in Å as RADII_DESCRIPTION says (Shannon ionic radius at CN VI or the nearest CN)."""
    if not isinstance(species, Species) or species.oxi_state is None:
        raise InputError(f"{species} has no oxidation state, so no ionic radius")
    oxidation = species.oxi_state
    element = species.element
    if oxidation == 0:
        if element.atomic_radius is None:
            raise InputError(f"no atomic radius for neutral {element.symbol}")
        return float(element.atomic_radius)
    table = element.data.get("Shannon radii", {}).get(str(round(oxidation)))
    if not table:
        raise InputError(f"no Shannon radius for {species} (oxidation state {oxidation:+g})")
    cn = min(table, key=lambda key: (abs(_cn_number(key) - REFERENCE_CN), _cn_number(key), key))
    spins = table[cn]
    spin = "High Spin" if "High Spin" in spins else ("" if "" in spins else sorted(spins)[0])
    return float(spins[spin][f"{RADIUS_TYPE}_radius"])


def min_cation_anion_distance(structure: Structure) -> float | None:
    """Shortest distance (Å) between a site with positive and one with negative oxidation state."""
    charges = np.array([site.specie.oxi_state for site in structure], dtype=float)
    cations, anions = np.flatnonzero(charges > 0), np.flatnonzero(charges < 0)
    if len(cations) == 0 or len(anions) == 0:
        return None
    frac = np.array(structure.frac_coords)
    return float(structure.lattice.get_all_distances(frac[cations], frac[anions]).min())


def _oxidation_states(structure: Structure) -> dict[str, float]:
    """Species string -> oxidation state; InputError when they are missing, all zero, or not charge-balanced."""
    formula = structure.composition.reduced_formula
    states: dict[str, float] = {}
    for site in structure:
        oxidation = getattr(site.specie, "oxi_state", None)
        if oxidation is None:
            raise InputError(f"{formula} has no oxidation states: assign them (e.g. bond valence) before featurizing")
        states[str(site.specie)] = float(oxidation)
    if all(value == 0 for value in states.values()):
        raise InputError(f"{formula}: every oxidation state is 0 (a failed guess?); features need real ones")
    total = sum(states[str(site.specie)] for site in structure)
    if abs(total) > CHARGE_TOL:
        raise InputError(f"{formula}: oxidation states sum to {total:+.3f} per cell, not 0")
    return dict(sorted(states.items()))


def _cn_number(key: str) -> int:
    """Coordination number of a Shannon table key such as 'VI', 'IVSQ' or 'IIIPY'."""
    match = re.match(r"^[IVX]+", key)
    return _ROMAN.get(match.group(0), 0) if match else 0


_KINDS = {"cation": lambda q: q > 0, "anion": lambda q: q < 0, "neutral": lambda q: q == 0}
"""Neighbour classes by the sign of their oxidation state."""


def _max_overlaps(image: Structure, index: int, radii: dict[str, float]) -> dict[str, float | None]:
    """Per neighbour class ('cation', 'anion', 'neutral'), the largest r_ion + r_j - d_j over the neighbours j of
    site `index` in that class (None where the class has none): one neighbour search for all three."""
    site = image[index]
    r_ion = radii[str(site.specie)]
    best = dict.fromkeys(_KINDS, -math.inf)
    for neighbour in image.get_neighbors(site, NEIGHBOUR_CUTOFF):
        oxidation = neighbour.specie.oxi_state
        for kind, member in _KINDS.items():
            if member(oxidation):
                best[kind] = max(best[kind], r_ion + radii[str(neighbour.specie)] - neighbour.nn_distance)
    return {kind: None if value == -math.inf else float(value) for kind, value in best.items()}


def _profile_summary(profile: list[float | None], middle: int) -> dict[str, float | None]:
    """start, midpoint, max and largest rise over start of one overlap profile (None where no neighbour was found)."""
    values = [value for value in profile if value is not None]
    start = profile[0]
    return {
        "start": start,
        "midpoint": profile[middle],
        "max": max(values) if values else None,
        "max_change": None if start is None or not values else max(values) - start,
    }


def _ewald_profile(images: HopImages) -> list[float]:
    """Ewald site energy (eV) of the moving ion in every image."""
    featurizer = EwaldSiteEnergy(accuracy=EWALD_ACCURACY)
    energies = []
    with warnings.catch_warnings():
        # the vacancy cell is charged: pymatgen warns that site energies omit the background term (constant here)
        warnings.filterwarnings("ignore", message="Per atom energies for charged structures")
        for image in images.images:
            energies.append(float(featurizer.featurize(image, images.moving_index)[0]))
    return energies
