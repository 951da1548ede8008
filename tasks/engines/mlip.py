"""ML-potential barrier engines (CHGNet 0.3.0 or SevenNet-0, `tasks.engines.potentials`): single points along the
IDPP path (`mlip-idpp`) and ASE climbing-image NEB (`mlip-neb`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict
from pymatgen.core import Structure

from hopflow.engines import (
    Device,
    MlipIdppSettings,
    MlipNebSettings,
    MlipSettings,
    Optimizer,
    canonical_model,
    model_versions,
    versions_of,
)
from hopflow.errors import EngineError
from hopflow.tasks.engines.base import (
    RUN_FILE,
    BarrierResult,
    EngineBase,
    Images,
    PreparedInputs,
    Stopwatch,
    Timings,
    find_moving_index,
    hop_images,
    reaction_coordinate,
    read_prepared,
    read_structures,
    register,
    result_fields,
    write_model,
    write_structures,
)
from hopflow.tasks.engines.potentials import (
    calculator,
    max_force,
    pick_device,
    relax_positions,
    single_points,
    to_atoms,
    to_structure,
)
from hopflow.tasks.images import VectorizedIDPPSolver

KNOWN_ENERGY = "energy"
KNOWN_ENERGY_MODEL = "energy_model"
"""Structure.properties keys of an image whose energy (eV, whole cell) the named potential computed already, e.g. a
relaxed vacancy mapped onto a hop's endpoint by a symmetry operation: mlip-idpp takes it instead of recomputing."""

INPUT_IMAGES_FILE = "input_images.json"
FINAL_IMAGES_FILE = "final_images.json"
OPTIMIZER_LOG = "optimizer.log"



class MlipRunRecord(BaseModel):
    """What an MLIP run leaves in `RUN_FILE`."""

    model_config = ConfigDict(frozen=True)

    energies: tuple[float, ...]
    max_forces: tuple[float | None, ...]
    converged: bool
    steps: int | None = None
    endpoints_converged: bool = True
    device: str
    run_s: float


def idpp_path(start: Structure, end: Structure, nimages: int) -> list[Structure]:
    """IDPP images between endpoints whose atoms already correspond one to one."""
    guess = start.interpolate(end, nimages + 1, pbc=True)
    return VectorizedIDPPSolver(guess).run()


def with_known_energy(structure: Structure, energy: float, model: str) -> Structure:
    """The structure marked with its energy under `model` (see KNOWN_ENERGY)."""
    marked = structure.copy()
    marked.properties = {**marked.properties, KNOWN_ENERGY: float(energy), KNOWN_ENERGY_MODEL: canonical_model(model)}
    return marked


def known_energy(structure: Structure, model: str) -> float | None:
    """The energy a structure carries for `model` (with_known_energy), else None."""
    properties = structure.properties or {}
    if properties.get(KNOWN_ENERGY_MODEL) != canonical_model(model) or properties.get(KNOWN_ENERGY) is None:
        return None
    return float(properties[KNOWN_ENERGY])


def _optimizer(name: Optimizer, target: Any, logfile: Path) -> Any:
    from ase.optimize import BFGS, FIRE

    cls = {"FIRE": FIRE, "BFGS": BFGS}[name]
    return cls(target, logfile=str(logfile))


class _MlipEngine(EngineBase):
    """What the MLIP engines share: prepare, parse and the optional endpoint relaxation."""

    name: ClassVar[str]
    settings_type: ClassVar[type[MlipSettings]]
    settings: MlipSettings

    def prepare(self, images: Images, workdir: Path) -> PreparedInputs:
        """Check the images (one moving ion) and store them in `workdir`."""
        workdir = Path(workdir)
        structures, moving = hop_images(images)
        workdir.mkdir(parents=True, exist_ok=True)
        write_structures(workdir / INPUT_IMAGES_FILE, structures)
        return self.record_prepared(
            workdir, structures, moving,
            versions=model_versions(self.settings.model) | versions_of("pymatgen-analysis-diffusion"),
        )

    def parse(self, workdir: Path) -> BarrierResult:
        """The stored energies and forces as a result, classified by `check_profile` (a barrier only when `ok`)."""
        workdir = Path(workdir)
        prepared = read_prepared(workdir)
        run_path = workdir / RUN_FILE
        if not run_path.is_file():
            raise EngineError(f"{workdir} holds no {RUN_FILE}: the run did not finish")
        record = MlipRunRecord.model_validate_json(run_path.read_text())
        settings = self.settings_type.model_validate(prepared.settings)
        structures = read_structures(workdir / FINAL_IMAGES_FILE)
        return BarrierResult(
            **result_fields(prepared, workdir, record.energies, record.converged, settings.intermediate_minimum_tol),
            reaction_coordinate=reaction_coordinate(structures),
            model=settings.model,
            max_forces=record.max_forces,
            n_images=len(structures) - 2,
            steps=record.steps,
            timings=Timings(run_s=record.run_s),
            versions=prepared.versions | {"device": record.device},
        )

    def _endpoints(self, device: Device, images: list[Structure], log: Path) -> tuple[Structure, Structure, bool]:
        """The band's two ends, relaxed (positions) when the settings say so, and whether both relaxations converged."""
        s = self.settings
        if not s.relax_endpoints:
            return images[0], images[-1], True
        start, end = (relax_positions(img, s.model, device, fmax=s.endpoint_fmax, steps=s.endpoint_steps,
                                      optimizer=s.endpoint_optimizer, logfile=log) for img in (images[0], images[-1]))
        return start.structure, end.structure, start.converged and end.converged

    def run(self, workdir: Path) -> None:
        """Compute the band on the settings' device from the stored images (`_compute`); the record to `RUN_FILE`."""
        workdir = Path(workdir)
        clock = Stopwatch.started()
        device = pick_device(self.settings.device)
        images = read_structures(workdir / INPUT_IMAGES_FILE)
        outcome = self._compute(workdir, device, images)
        write_model(workdir / RUN_FILE, MlipRunRecord(**outcome, device=device, run_s=clock.seconds()))

    def _compute(self, workdir: Path, device: Device, images: list[Structure]) -> dict[str, Any]:
        """The MlipRunRecord fields of this engine's calculation (energies, forces, convergence, steps)."""
        raise NotImplementedError


@register
@dataclass(frozen=True)
class MlipIdppEngine(_MlipEngine):
    """`mlip-idpp`: single points of the IDPP images."""

    name: ClassVar[str] = "mlip-idpp"
    settings_type: ClassVar[type[MlipSettings]] = MlipIdppSettings
    settings: MlipIdppSettings = field(default_factory=MlipIdppSettings)

    def _compute(self, workdir: Path, device: Device, images: list[Structure]) -> dict[str, Any]:
        """The energy of every image not carrying a known one (after the optional endpoint relaxation and
        re-interpolation, which drop known energies)."""
        s = self.settings
        start, end, endpoints_ok = self._endpoints(device, images, workdir / OPTIMIZER_LOG)
        if s.relax_endpoints:
            images = idpp_path(start, end, len(images) - 2)
            find_moving_index(images)  # the relaxed endpoints must still be one hop apart
        write_structures(workdir / FINAL_IMAGES_FILE, images)
        known = [known_energy(image, s.model) for image in images]
        todo = [i for i, energy in enumerate(known) if energy is None]
        computed = dict(zip(todo, (e for e, _ in single_points([images[i] for i in todo], s.model, device)),
                            strict=True))
        return {"energies": tuple(computed[i] if energy is None else energy for i, energy in enumerate(known)),
                "max_forces": (None,) * len(images), "converged": endpoints_ok, "endpoints_converged": endpoints_ok}


@register
@dataclass(frozen=True)
class MlipNebEngine(_MlipEngine):
    """`mlip-neb`: ASE CI-NEB; an unconverged band is stored without a barrier."""

    name: ClassVar[str] = "mlip-neb"
    settings_type: ClassVar[type[MlipSettings]] = MlipNebSettings
    settings: MlipNebSettings = field(default_factory=MlipNebSettings)

    def _compute(self, workdir: Path, device: Device, images: list[Structure]) -> dict[str, Any]:
        """Optionally relax the endpoints, (re-)interpolate with IDPP when needed, and optimise the band."""
        from ase.mep import NEB

        s = self.settings
        nimages = s.nimages or len(images) - 2
        log = workdir / OPTIMIZER_LOG
        start, end, endpoints_ok = self._endpoints(device, images, log)
        if s.relax_endpoints or nimages != len(images) - 2:
            images = idpp_path(start, end, nimages)
            find_moving_index(images)  # the re-interpolated band must still be one hop
        band = [to_atoms(img) for img in images]
        for atoms in band:
            atoms.calc = calculator(s.model, device)  # one calculator per image, all sharing the one network
        neb = NEB(band, k=s.spring, climb=s.climb, method="improvedtangent")
        opt = _optimizer(s.optimizer, neb, log)
        band_ok = bool(opt.run(fmax=s.fmax, steps=s.steps))
        energies = tuple(float(a.get_potential_energy()) for a in band)
        projected = np.asarray(neb.get_forces()).reshape(nimages, -1, 3)
        forces = (max_force(band[0].get_forces()), *(max_force(f) for f in projected), max_force(band[-1].get_forces()))
        write_structures(workdir / FINAL_IMAGES_FILE, [to_structure(a) for a in band])
        return {"energies": energies, "max_forces": forces, "converged": band_ok and endpoints_ok,
                "steps": int(opt.nsteps), "endpoints_converged": endpoints_ok}
