"""CHGNet barrier engines: single points along the IDPP path (`mlip-idpp`) and ASE climbing-image NEB (`mlip-neb`)."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pymatgen.analysis.diffusion.neb.pathfinder import IDPPSolver
from pymatgen.core import Structure

from hopflow.errors import EngineError
from tasks.engines.base import (
    PREPARED_FILE,
    RUN_FILE,
    BarrierResult,
    Images,
    PreparedInputs,
    Stopwatch,
    Timings,
    find_moving_index,
    image_structures,
    read_prepared,
    read_structures,
    reaction_coordinate,
    register,
    relative,
    versions_of,
    write_model,
    write_structures,
)

if TYPE_CHECKING:
    from ase import Atoms
    from chgnet.model import CHGNet

ENGINE_REVISION = "1"
DEFAULT_MODEL = "0.3.0"  # CHGNet's pretrained weights shipped in its wheel
DEFAULT_NEB_FMAX = 0.1  # eV/Å
DEFAULT_NEB_STEPS = 500
DEFAULT_SPRING = 0.1  # eV/Å², ASE's default
DEFAULT_ENDPOINT_FMAX = 0.05  # eV/Å
DEFAULT_ENDPOINT_STEPS = 300
DEFAULT_BATCH_SIZE = 1  # images one at a time: a batch of 7 × 240-atom graphs took ~9 GiB per worker on CPU

INPUT_IMAGES_FILE = "input_images.json"
FINAL_IMAGES_FILE = "final_images.json"
OPTIMIZER_LOG = "optimizer.log"
PACKAGES = ("chgnet", "torch", "ase", "pymatgen", "pymatgen-analysis-diffusion")

Device = Literal["cpu", "cuda", "mps"]
Optimizer = Literal["FIRE", "BFGS"]


class MlipIdppSettings(BaseModel):
    """Settings of `mlip-idpp`: CHGNet single points on the given (IDPP) images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(default=DEFAULT_MODEL, description="CHGNet pretrained model name.")
    device: Device | None = Field(default=None, description="Torch device; None picks CUDA when available.")
    relax_endpoints: bool = Field(default=False, description="Relax the endpoints and re-run IDPP between them.")
    endpoint_fmax: float = Field(default=DEFAULT_ENDPOINT_FMAX, gt=0, description="Endpoint force threshold (eV/Å).")
    endpoint_steps: int = Field(default=DEFAULT_ENDPOINT_STEPS, gt=0, description="Endpoint optimizer step limit.")
    endpoint_optimizer: Optimizer = Field(default="BFGS", description="ASE optimizer of the endpoint relaxations.")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, gt=0, description="Images per CHGNet batch.")
    forces: bool = Field(default=True, description="Also compute forces (max per image); energies alone are ~3x faster.")


class MlipNebSettings(BaseModel):
    """Settings of `mlip-neb`: ASE climbing-image NEB with one CHGNet calculator per image."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(default=DEFAULT_MODEL, description="CHGNet pretrained model name.")
    device: Device | None = Field(default=None, description="Torch device; None picks CUDA when available.")
    nimages: int | None = Field(
        default=None, gt=0, description="Intermediate images; None keeps the count given, else IDPP re-interpolates."
    )
    fmax: float = Field(default=DEFAULT_NEB_FMAX, gt=0, description="NEB force threshold (eV/Å).")
    steps: int = Field(default=DEFAULT_NEB_STEPS, gt=0, description="NEB optimizer step limit.")
    climb: bool = Field(default=True, description="Climbing image on (CI-NEB).")
    spring: float = Field(default=DEFAULT_SPRING, gt=0, description="Spring constant (eV/Å²).")
    optimizer: Optimizer = Field(default="BFGS", description="ASE optimizer of the band (FIRE is the cautious choice).")
    endpoint_optimizer: Optimizer = Field(default="BFGS", description="ASE optimizer of the endpoint relaxations.")
    relax_endpoints: bool = Field(default=True, description="Relax the endpoints before the band.")
    endpoint_fmax: float = Field(default=DEFAULT_ENDPOINT_FMAX, gt=0, description="Endpoint force threshold (eV/Å).")
    endpoint_steps: int = Field(default=DEFAULT_ENDPOINT_STEPS, gt=0, description="Endpoint optimizer step limit.")


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


def pick_device(requested: Device | None) -> Device:
    """The requested torch device, or CUDA when present, else CPU."""
    if requested is not None:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=4)
def load_model(model: str = DEFAULT_MODEL, device: Device = "cpu") -> CHGNet:
    """The pretrained CHGNet, loaded once per process and device (weights ship in the wheel, no download)."""
    from chgnet.model import CHGNet

    return CHGNet.load(model_name=model, use_device=device, verbose=False)


def chgnet_versions(model: str) -> dict[str, str]:
    """Package versions plus the CHGNet model name."""
    return versions_of(*PACKAGES) | {"chgnet-model": model}


def engine_version(model: str) -> str:
    """Engine revision, CHGNet version and model: any change of them may change a barrier."""
    return f"{ENGINE_REVISION}+chgnet-{versions_of('chgnet').get('chgnet', '?')}+model-{model}"


def _calculator(model: CHGNet, device: Device) -> Any:
    from chgnet.model.dynamics import CHGNetCalculator

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its device on every construction
        return CHGNetCalculator(model=model, use_device=device)


def _optimizer(name: str, target: Any, logfile: Path) -> Any:
    from ase.optimize import BFGS, FIRE

    cls = {"FIRE": FIRE, "BFGS": BFGS}[name]
    return cls(target, logfile=str(logfile))


def _to_atoms(structure: Structure) -> Atoms:
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.set_initial_charges(None)  # oxidation states do not belong in a CHGNet calculation
    return atoms


def _to_structure(atoms: Atoms) -> Structure:
    # positions only: the calculator's results (magnetic moments ...) would ride along as site properties
    return Structure(atoms.cell[:], atoms.get_chemical_symbols(), atoms.get_positions(), coords_are_cartesian=True)


def relax_structure(
    structure: Structure, model: CHGNet, device: Device, fmax: float, steps: int, optimizer: str, log: Path
) -> tuple[Structure, bool]:
    """Relax atomic positions (fixed cell) with CHGNet; returns the structure and whether it converged."""
    atoms = _to_atoms(structure)
    atoms.calc = _calculator(model, device)
    opt = _optimizer(optimizer, atoms, log)
    converged = bool(opt.run(fmax=fmax, steps=steps))
    return _to_structure(atoms), converged


def idpp_path(start: Structure, end: Structure, nimages: int) -> list[Structure]:
    """IDPP images between endpoints whose atoms already correspond one to one."""
    guess = start.interpolate(end, nimages + 1, pbc=True)
    return IDPPSolver(guess).run()


def _prepare(name: str, version: str, settings: BaseModel, images: Images, workdir: Path, model: str) -> PreparedInputs:
    structures = image_structures(images)
    moving = find_moving_index(structures)
    workdir.mkdir(parents=True, exist_ok=True)
    write_structures(workdir / INPUT_IMAGES_FILE, structures)
    prepared = PreparedInputs(
        engine=name,
        engine_version=version,
        settings=settings.model_dump(mode="json"),
        n_images=len(structures) - 2,
        moving_index=moving,
        versions=chgnet_versions(model),
    )
    write_model(workdir / PREPARED_FILE, prepared)
    return prepared


def _parse(workdir: Path, images_file: str) -> BarrierResult:
    prepared = read_prepared(workdir)
    run_path = workdir / RUN_FILE
    if not run_path.is_file():
        raise EngineError(f"{workdir} holds no {RUN_FILE}: the run did not finish")
    record = MlipRunRecord.model_validate_json(run_path.read_text())
    structures = read_structures(workdir / images_file)
    rel = relative(record.energies)
    return BarrierResult(
        engine=prepared.engine,
        engine_version=prepared.engine_version,
        energies=record.energies,
        relative_energies=rel,
        reaction_coordinate=reaction_coordinate(structures),
        barrier=max(rel) if record.converged else None,
        converged=record.converged,
        max_forces=record.max_forces,
        n_images=len(structures) - 2,
        moving_index=prepared.moving_index,
        steps=record.steps,
        timings=Timings(run_s=record.run_s),
        settings=prepared.settings,
        workdir=str(workdir),
        versions=prepared.versions | {"device": record.device},
    )


def _max_force_norms(forces: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(forces).reshape(-1, 3), axis=1).max())


class _ChgnetEngine:
    """What the CHGNet engines share: version, prepare, parse and the start of a run (model, device, images)."""

    name: ClassVar[str]
    settings: MlipIdppSettings | MlipNebSettings

    @property
    def version(self) -> str:
        """Engine revision and CHGNet version/model."""
        return engine_version(self.settings.model)

    def prepare(self, images: Images, workdir: Path) -> PreparedInputs:
        """Check the images (one moving ion) and store them in `workdir`."""
        return _prepare(self.name, self.version, self.settings, images, Path(workdir), self.settings.model)

    def parse(self, workdir: Path) -> BarrierResult:
        """The stored energies and forces as a result; a barrier only when the run converged."""
        return _parse(Path(workdir), FINAL_IMAGES_FILE)

    def _start(self, workdir: Path) -> tuple[CHGNet, Device, list[Structure]]:
        """The worker's model on its device, and the prepared images."""
        device = pick_device(self.settings.device)
        return load_model(self.settings.model, device), device, read_structures(Path(workdir) / INPUT_IMAGES_FILE)

    def _endpoints(self, model: CHGNet, device: Device, images: list[Structure],
                   log: Path) -> tuple[Structure, Structure, bool]:
        """The band's two ends, relaxed when the settings say so, and whether both relaxations converged."""
        s = self.settings
        if not s.relax_endpoints:
            return images[0], images[-1], True
        relax = (model, device, s.endpoint_fmax, s.endpoint_steps, s.endpoint_optimizer, log)
        start, ok0 = relax_structure(images[0], *relax)
        end, ok1 = relax_structure(images[-1], *relax)
        return start, end, ok0 and ok1


@register
@dataclass(frozen=True)
class MlipIdppEngine(_ChgnetEngine):
    """`mlip-idpp`: CHGNet energies of the IDPP images; the barrier is the highest one above the start."""

    name: ClassVar[str] = "mlip-idpp"
    settings_type: ClassVar[type[BaseModel]] = MlipIdppSettings
    settings: MlipIdppSettings = field(default_factory=MlipIdppSettings)

    def run(self, workdir: Path) -> None:
        """CHGNet single points on every image (after optional endpoint relaxation and re-interpolation)."""
        workdir = Path(workdir)
        clock = Stopwatch.started()
        s = self.settings
        model, device, images = self._start(workdir)
        start, end, endpoints_ok = self._endpoints(model, device, images, workdir / OPTIMIZER_LOG)
        if s.relax_endpoints:
            images = idpp_path(start, end, len(images) - 2)
        write_structures(workdir / FINAL_IMAGES_FILE, images)
        predictions = model.predict_structure(images, task="ef" if s.forces else "e", batch_size=s.batch_size)
        energies = tuple(float(p["e"]) * len(img) for p, img in zip(predictions, images, strict=True))
        forces = tuple(_max_force_norms(p["f"]) if s.forces else None for p in predictions)
        record = MlipRunRecord(
            energies=energies,
            max_forces=forces,
            converged=endpoints_ok,
            endpoints_converged=endpoints_ok,
            device=device,
            run_s=clock.seconds(),
        )
        write_model(workdir / RUN_FILE, record)


@register
@dataclass(frozen=True)
class MlipNebEngine(_ChgnetEngine):
    """`mlip-neb`: ASE CI-NEB with CHGNet; an unconverged band is stored without a barrier."""

    name: ClassVar[str] = "mlip-neb"
    settings_type: ClassVar[type[BaseModel]] = MlipNebSettings
    settings: MlipNebSettings = field(default_factory=MlipNebSettings)

    def run(self, workdir: Path) -> None:
        """Relax the endpoints, (re-)interpolate with IDPP when needed, and optimise the band."""
        from ase.mep import NEB

        workdir = Path(workdir)
        clock = Stopwatch.started()
        s = self.settings
        model, device, images = self._start(workdir)
        nimages = s.nimages or len(images) - 2
        log = workdir / OPTIMIZER_LOG
        start, end, endpoints_ok = self._endpoints(model, device, images, log)
        if s.relax_endpoints or nimages != len(images) - 2:
            images = idpp_path(start, end, nimages)
            find_moving_index(images)  # the re-interpolated band must still be one hop
        band = [_to_atoms(img) for img in images]
        for atoms in band:
            atoms.calc = _calculator(model, device)  # one calculator per image, all sharing the one model
        neb = NEB(band, k=s.spring, climb=s.climb, method="improvedtangent")
        opt = _optimizer(s.optimizer, neb, log)
        band_ok = bool(opt.run(fmax=s.fmax, steps=s.steps))
        energies = tuple(float(a.get_potential_energy()) for a in band)
        projected = np.asarray(neb.get_forces()).reshape(nimages, -1, 3)
        forces = (
            _max_force_norms(band[0].get_forces()),
            *(_max_force_norms(f) for f in projected),
            _max_force_norms(band[-1].get_forces()),
        )
        write_structures(workdir / FINAL_IMAGES_FILE, [_to_structure(a) for a in band])
        record = MlipRunRecord(
            energies=energies,
            max_forces=forces,
            converged=band_ok and endpoints_ok,
            steps=int(opt.nsteps),
            endpoints_converged=endpoints_ok,
            device=device,
            run_s=clock.seconds(),
        )
        write_model(workdir / RUN_FILE, record)
