"""The universal ML potentials (CHGNet 0.3.0, SevenNet-0): names, devices, calculators, single points, relaxations.

Each process loads a model's weights once per device (`_weights`, cached); `calculator` wraps them in a fresh ASE
calculator on every call, so the images of an NEB each get their own calculator without reloading anything. Both
models ship their weights in their wheels: nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pymatgen.core import Structure

from hopflow.engines import MODEL_WEIGHTS, Device, Optimizer, canonical_model
from hopflow.errors import InputError
from hopflow.settings import get_settings

if TYPE_CHECKING:
    from ase import Atoms
    from ase.calculators.calculator import Calculator

def pick_device(requested: Device | None) -> Device:
    """The requested torch device, or CUDA when present, else CPU."""
    if requested is not None:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_QUIET_LOCK = threading.RLock()
"""redirect_stdout swaps the process-wide sys.stdout: two Dask worker threads overlapping in `_quiet` could restore
each other's StringIO and leave the command's own output going nowhere."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the banners both packages print or warn on every model load and calculator construction."""
    with _QUIET_LOCK, contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No tensor product accelerator")
        yield


@contextlib.contextmanager
def _calm() -> Iterator[None]:
    """Silence the warnings CHGNet repeats on every force call (harmless: a scalar volume; FixSymmetry, which its
    internal pymatgen conversion cannot carry and does not need)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
        warnings.filterwarnings("ignore", message="Only FixAtoms and FixCartesian is supported")
        yield


@lru_cache(maxsize=4)
def _weights(model: str, device: Device) -> Any:
    """The loaded network of a canonical model on a device, once per process (CHGNet, or SevenNet's module)."""
    with _quiet():
        if model == "chgnet-0.3.0":
            from chgnet.model import CHGNet

            return CHGNet.load(model_name=MODEL_WEIGHTS[model], use_device=device, verbose=False)
        from sevenn.calculator import SevenNetCalculator

        return SevenNetCalculator(model=MODEL_WEIGHTS[model], device=device).model


ChgnetTask = Literal["e", "ef", "em", "efs", "efsm"]
"""What one CHGNet call computes: energy, forces, stress, magnetic moments."""


@lru_cache(maxsize=1)
def _chgnet_calculator_class() -> type[Calculator]:
    from chgnet.model.dynamics import CHGNetCalculator

    class ChgnetCalculator(CHGNetCalculator):
        """CHGNet computing only what ASE asks for: its own calculator always runs task 'efsm', and the stress's
        second backward pass doubles a forces call (0.4 s against 0.2 s on a 95-atom cell, identical forces)."""

        def __init__(self, *args: Any, stress: bool, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.stress = stress

        def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                      system_changes: list[str] | None = None, task: ChgnetTask | None = None) -> None:
            wanted = set(properties or ("energy", "forces", "stress"))
            if task is None:
                task = ("e" if wanted <= {"energy", "free_energy"} else
                        "efsm" if self.stress or wanted & {"stress", "magmoms"} else "ef")
            super().calculate(atoms, properties, system_changes, task=task)

    return ChgnetCalculator


def calculator(model: str, device: Device, *, stress: bool = False) -> Calculator:
    """A fresh ASE calculator of the potential on `device`, sharing the process's one loaded network; `stress`:
    computed with every force call (cell relaxations), else only when asked for."""
    model = canonical_model(model)
    weights = _weights(model, device)
    with _quiet():
        if model == "chgnet-0.3.0":
            return _chgnet_calculator_class()(model=weights, use_device=device, stress=stress)
        from sevenn.calculator import SevenNetCalculator

        return SevenNetCalculator(model=weights, file_type="model_instance", device=device)


@dataclass(frozen=True)
class Relaxed:
    """A relaxation's outcome: the structure (input site order, species only), its energy (eV, whole cell), the
    largest remaining atomic force (eV/Å), whether the optimizer converged and its step count."""

    structure: Structure
    energy: float
    max_force: float
    converged: bool
    steps: int


def to_atoms(structure: Structure) -> Atoms:
    """ASE atoms of an ordered structure, species and positions only (no oxidation states, magmoms or constraints)."""
    from pymatgen.io.ase import AseAtomsAdaptor

    if not structure.is_ordered:
        raise InputError("an ML potential needs an ordered structure (one species per site)")
    bare = Structure(structure.lattice, [site.specie.symbol for site in structure], structure.frac_coords)
    atoms = AseAtomsAdaptor.get_atoms(bare)
    atoms.set_initial_charges(None)  # oxidation states do not belong in an ML-potential calculation
    return atoms


def to_structure(atoms: Atoms) -> Structure:
    """The atoms as a structure in their order, species only (the calculator's results do not ride along)."""
    return Structure(atoms.cell[:], atoms.get_chemical_symbols(), atoms.get_positions(), coords_are_cartesian=True)


def max_force(forces: np.ndarray) -> float:
    """The largest atomic force norm (eV/Å) of an (N, 3) array."""
    return float(np.linalg.norm(np.asarray(forces).reshape(-1, 3), axis=1).max())


GPU_BATCH_ATOMS = 2000
"""Atoms per energy-only CHGNet call on a GPU unless HOPFLOW_MLIP_BATCH_ATOMS says otherwise."""


def atom_batches(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group holds at most `limit` atoms (a larger structure goes alone)."""
    batches: list[list[int]] = []
    total = 0
    for index, size in enumerate(sizes):
        if batches and total + size <= limit:
            batches[-1].append(index)
            total += size
        else:
            batches.append([index])
            total = size
    return batches


def single_points(structures: Sequence[Structure], model: str, device: Device, *, forces: bool = False,
                  batch_atoms: int | None = None) -> list[tuple[float, float | None]]:
    """Total energy (eV) of each structure, with its largest force norm (eV/Å) when `forces` (a CHGNet energy alone
    skips the backward pass: half the time).

    Energies alone with CHGNet go in batches of at most `batch_atoms` atoms per call (default: the
    `mlip_batch_atoms` setting, else GPU_BATCH_ATOMS on a GPU); otherwise one structure per call (a batch of
    7 × 240-atom graphs with forces took 9 GiB)."""
    model = canonical_model(model)
    if batch_atoms is None:
        batch_atoms = get_settings().mlip_batch_atoms or (GPU_BATCH_ATOMS if device == "cuda" else None)
    if batch_atoms is not None and not forces and model == "chgnet-0.3.0":
        return _chgnet_energies(structures, device, batch_atoms)
    results: list[tuple[float, float | None]] = []
    for structure in structures:
        atoms = to_atoms(structure)
        atoms.calc = calculator(model, device)
        with _calm():
            largest = max_force(atoms.get_forces()) if forces else None  # the energy comes with the forces
            results.append((float(atoms.get_potential_energy()), largest))
    return results


def _chgnet_energies(structures: Sequence[Structure], device: Device,
                     batch_atoms: int) -> list[tuple[float, float | None]]:
    if not all(s.is_ordered for s in structures):
        raise InputError("an ML potential needs an ordered structure (one species per site)")
    network = _weights("chgnet-0.3.0", device)
    plain = [Structure(s.lattice, [site.specie.symbol for site in s], s.frac_coords) for s in structures]
    energies: list[tuple[float, float | None]] = []
    for batch in atom_batches([len(s) for s in plain], batch_atoms):
        predicted = network.predict_structure([plain[i] for i in batch], task="e", batch_size=len(batch))
        for i, prediction in zip(batch, predicted if isinstance(predicted, list) else [predicted], strict=True):
            per_cell = len(plain[i]) if network.is_intensive else 1  # as CHGNet's own calculator scales it
            energies.append((float(prediction["e"]) * per_cell, None))
    return energies


def _optimize(target: Any, optimizer: Optimizer, logfile: Path | None, fmax: float, steps: int) -> tuple[bool, int]:
    from ase.optimize import BFGS, FIRE

    cls = {"BFGS": BFGS, "FIRE": FIRE}[optimizer]
    opt = cls(target, logfile=None if logfile is None else str(logfile))
    with _calm():
        converged = bool(opt.run(fmax=fmax, steps=steps))
    return converged, int(opt.nsteps)


def relax_positions(structure: Structure, model: str, device: Device, *, fmax: float, steps: int,
                    optimizer: Optimizer = "BFGS", logfile: Path | None = None) -> Relaxed:
    """Relax the atomic positions in the fixed cell until every force is below `fmax` (eV/Å) or `steps` run out."""
    atoms = to_atoms(structure)
    atoms.calc = calculator(model, device)
    converged, taken = _optimize(atoms, optimizer, logfile, fmax, steps)
    return Relaxed(to_structure(atoms), float(atoms.get_potential_energy()), max_force(atoms.get_forces()),
                   converged, taken)


def relax_bulk(structure: Structure, model: str, device: Device, *, fmax: float, steps: int,
               optimizer: Optimizer = "BFGS", logfile: Path | None = None) -> Relaxed:
    """Relax lattice and positions keeping the space group (ASE `FixSymmetry`, `FrechetCellFilter`); `fmax` bounds
    the forces and the filter's scaled stress. The energy is the whole cell's; `max_force` the atoms' (symmetrised)."""
    from ase.constraints import FixSymmetry
    from ase.filters import FrechetCellFilter

    atoms = to_atoms(structure)
    atoms.calc = calculator(model, device, stress=True)
    atoms.set_constraint(FixSymmetry(atoms))
    converged, taken = _optimize(FrechetCellFilter(atoms), optimizer, logfile, fmax, steps)
    return Relaxed(to_structure(atoms), float(atoms.get_potential_energy()), max_force(atoms.get_forces()),
                   converged, taken)
