"""One interface for every barrier engine: prepare -> run -> parse into the same `BarrierResult`."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pymatgen.core import Structure

from hopflow.engines import ENGINE_IDENTITIES, VacancyMode
from hopflow.errors import InputError

PathFlag = Literal["ok", "intermediate-minimum", "vacancy-moved", "unconverged"]
"""What a barrier result is (docs/estimates.md): only `ok` carries a barrier."""

PREPARED_FILE = "hopflow_prepared.json"
RUN_FILE = "hopflow_run.json"

# An ion counts as "moving" when it travels more than this between the end images (Å); host atoms of relaxed
# endpoints shift far less (tenths of an Å), so a second site beyond it means more than one ion hops.
MIN_HOP_DISTANCE = 0.5
# Endpoint lattices must agree to this tolerance (Å) for the images to share one supercell.
LATTICE_TOLERANCE = 1e-3


class HasImages(Protocol):
    """Anything carrying its images, e.g. `tasks.images.HopImages`."""

    @property
    def images(self) -> Sequence[Structure]: ...


Images = Sequence[Structure] | HasImages
"""Engine input: start, intermediate and end structures (same supercell and atom order, one moving ion)."""


class Timings(BaseModel):
    """Wall-clock seconds of the three engine steps (None where not measured)."""

    model_config = ConfigDict(frozen=True)

    prepare_s: float | None = None
    run_s: float | None = None
    parse_s: float | None = None

    def total(self) -> float:
        """Sum of the measured steps."""
        return sum(t for t in (self.prepare_s, self.run_s, self.parse_s) if t is not None)


class Correction(BaseModel):
    """One correction an error handler made (custodian's own record, flattened)."""

    model_config = ConfigDict(frozen=True)

    job: str = Field(description="Which calculation: 'neb', 'start' or 'end'.")
    handler: str = Field(description="Handler class name, e.g. VaspErrorHandler.")
    errors: tuple[str, ...] = Field(description="Error keys the handler detected.")
    actions: tuple[dict[str, Any], ...] = Field(description="Custodian's modder actions, as it logged them.")


class PathCheck(BaseModel):
    """A profile's classification and, only for a well-defined single-hop path (`ok`), its barriers."""

    model_config = ConfigDict(frozen=True)

    flag: PathFlag
    reason: str | None = None
    barrier: float | None = Field(default=None, description="E_max - min(E_start, E_end) (eV).")
    forward_barrier: float | None = Field(default=None, description="E_max - E_start (eV).")
    reverse_barrier: float | None = Field(default=None, description="E_max - E_end (eV).")


def check_profile(energies: Sequence[float], converged: bool, tolerance: float) -> PathCheck:
    """Classify an energy profile (start, images, end): `unconverged`, `intermediate-minimum` (an interior image more
    than `tolerance` eV below the lower endpoint) or `ok` with its barriers."""
    if not converged:
        return PathCheck(flag="unconverged", reason="the endpoint relaxations or the band did not converge")
    e = np.asarray(energies, dtype=float)
    lower = float(min(e[0], e[-1]))
    interior = e[1:-1]
    deepest = int(np.argmin(interior)) + 1 if len(interior) else 0
    if len(interior) and lower - float(e[deepest]) > tolerance:
        return PathCheck(flag="intermediate-minimum",
                         reason=f"image {deepest} lies {lower - float(e[deepest]):.3f} eV below the lower endpoint "
                         f"(tolerance {tolerance:.3f} eV): the path passes a lower configuration")
    top = float(e.max())
    return PathCheck(flag="ok", barrier=top - lower, forward_barrier=top - float(e[0]),
                     reverse_barrier=top - float(e[-1]))


class BarrierResult(BaseModel):
    """A barrier calculation's outcome, the same schema for every engine."""

    model_config = ConfigDict(frozen=True)

    engine: str
    engine_version: str
    energies: tuple[float, ...] = Field(description="Total energy of each image, start to end (eV).")
    relative_energies: tuple[float, ...] = Field(description="Energies relative to the start image (eV).")
    reaction_coordinate: tuple[float, ...] = Field(
        description="Cumulative root-mean-square distance between images (Å), as pymatgen's NEBAnalysis defines it."
    )
    barrier: float | None = Field(description="E_max - min(E_start, E_end) (eV); None unless the flag is `ok`.")
    forward_barrier: float | None = Field(default=None, description="E_max - E_start (eV); None unless `ok`.")
    reverse_barrier: float | None = Field(default=None, description="E_max - E_end (eV); None unless `ok`.")
    flag: PathFlag = Field(description="ok | intermediate-minimum | vacancy-moved | unconverged.")
    flag_reason: str | None = None
    model: str | None = Field(default=None, description="The ML potential (None for DFT).")
    converged: bool
    max_forces: tuple[float | None, ...] = Field(
        description="Largest atomic force per image (eV/Å): NEB-projected for moving images of an NEB, else true "
        "forces."
    )
    n_images: int = Field(description="Intermediate images (endpoints excluded).")
    moving_index: int = Field(description="Site index of the migrating ion in every image.")
    steps: int | None = Field(default=None, description="Optimizer or ionic steps taken (None for single points).")
    timings: Timings = Field(default_factory=Timings)
    settings: dict[str, Any] = Field(default_factory=dict, description="The engine settings the result was made with.")
    corrections: tuple[Correction, ...] = ()
    continued: bool = Field(default=False, description="True when the run resumed an interrupted one (CONTCARs).")
    vacancy_mode: VacancyMode = "neutral"
    charge: int = Field(default=0, description="Net charge of the simulation cell (+1 for a charged F⁻ vacancy).")
    workdir: str | None = None
    versions: dict[str, str] = Field(default_factory=dict, description="Versions of the packages the engine used.")

    @model_validator(mode="after")
    def _consistent(self) -> BarrierResult:
        n = self.n_images + 2
        for name in ("energies", "relative_energies", "reaction_coordinate", "max_forces"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected {n} (images + endpoints)")
        if not self.converged and self.barrier is not None:
            raise ValueError("an unconverged result carries no barrier")
        if self.flag != "ok" and self.barrier is not None:
            raise ValueError(f"a result flagged {self.flag!r} carries no barrier")
        return self

    def flagged(self, flag: PathFlag, reason: str) -> BarrierResult:
        """The same energies under another flag, without barriers (e.g. `vacancy-moved` from its endpoints)."""
        return self.model_copy(update={"flag": flag, "flag_reason": reason, "barrier": None,
                                       "forward_barrier": None, "reverse_barrier": None})


class PreparedInputs(BaseModel):
    """What `prepare` wrote into a work directory; `parse` reads it back from `PREPARED_FILE`."""

    model_config = ConfigDict(frozen=True)

    engine: str
    engine_version: str
    settings: dict[str, Any]
    n_images: int
    moving_index: int
    vacancy_mode: VacancyMode = "neutral"
    charge: int = 0
    continued: bool = Field(default=False, description="True when prepare resumed an earlier run's outputs.")
    versions: dict[str, str] = Field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """A barrier engine: inputs into a work directory, run there, parse the directory into a `BarrierResult`."""

    name: str
    settings: BaseModel

    @property
    def version(self) -> str:
        """Engine revision plus the versions of the codes that change its numbers."""
        ...

    def prepare(self, images: Images, workdir: Path) -> PreparedInputs:
        """Check the images and write every input the run needs into `workdir`."""
        ...

    def run(self, workdir: Path) -> None:
        """Compute in `workdir` (raises `hopflow.errors.EngineError` when the calculation fails)."""
        ...

    def parse(self, workdir: Path) -> BarrierResult:
        """Read `workdir` into a result."""
        ...


ENGINES: dict[str, Any] = {}
"""Engine classes by registry name (each class has `name` and `settings_type`)."""

_E = TypeVar("_E", bound=type)


def register(cls: _E) -> _E:
    """Class decorator: add an engine class to `ENGINES` under its `name`."""
    ENGINES[cls.name] = cls  # type: ignore[attr-defined]  # every engine class names itself
    return cls


def get_engine(name: str, settings: BaseModel | Mapping[str, Any] | None = None) -> Engine:
    """An engine by registry name, with settings given as the engine's settings model or a plain mapping."""
    try:
        cls = ENGINES[name]
    except KeyError:
        raise InputError(f"unknown barrier engine {name!r}; known: {', '.join(sorted(ENGINES))}") from None
    settings_type: type[BaseModel] = cls.settings_type
    if settings is None:
        return cls()
    if isinstance(settings, settings_type):
        return cls(settings=settings)
    if isinstance(settings, BaseModel):
        settings = settings.model_dump()
    return cls(settings=settings_type.model_validate(dict(settings)))


def checked_fields(energies: Sequence[float], converged: bool, tolerance: float) -> dict[str, Any]:
    """The BarrierResult fields `check_profile` decides (barriers, flag, reason)."""
    check = check_profile(energies, converged, tolerance)
    return {"barrier": check.barrier, "forward_barrier": check.forward_barrier,
            "reverse_barrier": check.reverse_barrier, "flag": check.flag, "flag_reason": check.reason}


def result_fields(prepared: PreparedInputs, workdir: Path, energies: tuple[float, ...], converged: bool,
                  tolerance: float) -> dict[str, Any]:
    """The BarrierResult fields every engine's parse fills alike: what `prepare` recorded, the energies and what
    `check_profile` decides about them."""
    return {
        "engine": prepared.engine,
        "engine_version": prepared.engine_version,
        "energies": energies,
        "relative_energies": relative(energies),
        **checked_fields(energies, converged, tolerance),
        "converged": converged,
        "moving_index": prepared.moving_index,
        "settings": prepared.settings,
        "workdir": str(workdir),
    }


def compute_barrier(
    engine_name: str,
    images: Images,
    workdir: Path | str,
    settings: BaseModel | Mapping[str, Any] | None = None,
) -> BarrierResult:
    """Prepare, run and parse one pathway with the named engine; the result carries the measured timings."""
    engine = get_engine(engine_name, settings)
    workdir = Path(workdir)
    t0 = time.perf_counter()
    engine.prepare(images, workdir)
    t1 = time.perf_counter()
    engine.run(workdir)
    t2 = time.perf_counter()
    result = engine.parse(workdir)
    t3 = time.perf_counter()
    timings = Timings(prepare_s=t1 - t0, run_s=t2 - t1, parse_s=t3 - t2)
    return result.model_copy(update={"timings": timings})


# --- helpers shared by the engines ---------------------------------------------------------------------------------


class EngineBase:
    """What every engine class shares: its version from `hopflow.engines` and the record `prepare` leaves."""

    name: ClassVar[str]
    settings: BaseModel

    @property
    def version(self) -> str:
        """Engine revision plus the versions of the codes that change its numbers (hopflow.engines)."""
        return ENGINE_IDENTITIES[self.name].version(self.settings)

    def record_prepared(self, workdir: Path, structures: Sequence[Structure], moving: int,
                        **fields: Any) -> PreparedInputs:
        """Write `PREPARED_FILE` for these images under the engine's settings (`fields`: what the engine adds)."""
        prepared = PreparedInputs(
            engine=self.name,
            engine_version=self.version,
            settings=self.settings.model_dump(mode="json"),
            n_images=len(structures) - 2,
            moving_index=moving,
            **fields,
        )
        write_model(workdir / PREPARED_FILE, prepared)
        return prepared


def hop_images(images: Images) -> tuple[list[Structure], int]:
    """The image structures and the index of their one moving ion (InputError unless they form one hop)."""
    structures = image_structures(images)
    return structures, find_moving_index(structures)


def image_structures(images: Images) -> list[Structure]:
    """The image structures, from a plain sequence or from an object with an `images` attribute (HopImages)."""
    seq = images if isinstance(images, Sequence) else images.images
    structures = [s.copy() for s in seq]
    if not all(isinstance(s, Structure) for s in structures):
        raise InputError("images must be pymatgen Structures")
    return structures


def find_moving_index(images: Sequence[Structure]) -> int:
    """Index of the one ion that hops between the end images; raises InputError unless the images form one hop."""
    if len(images) < 3:
        raise InputError(f"a path needs at least 3 images (start, one intermediate, end), got {len(images)}")
    first = images[0]
    for i, s in enumerate(images[1:], start=1):
        if len(s) != len(first):
            raise InputError(f"image {i} has {len(s)} sites, image 0 has {len(first)}")
        if [site.specie.symbol for site in s] != [site.specie.symbol for site in first]:
            raise InputError(f"image {i} lists its species in a different order than image 0")
        if not np.allclose(s.lattice.matrix, first.lattice.matrix, atol=LATTICE_TOLERANCE):
            raise InputError(f"image {i} has a different lattice than image 0 (images must share one supercell)")
    start, end = images[0], images[-1]
    disp = np.array([start[j].distance(end[j]) for j in range(len(start))])
    order = np.argsort(disp)[::-1]
    moving = int(order[0])
    if disp[moving] < MIN_HOP_DISTANCE:
        raise InputError(f"no ion moves between the end images (largest displacement {disp[moving]:.3f} Å)")
    if len(disp) > 1 and disp[order[1]] > MIN_HOP_DISTANCE:
        raise InputError(
            f"more than one ion moves: sites {moving} ({disp[moving]:.2f} Å) and {int(order[1])} "
            f"({disp[order[1]]:.2f} Å); are the endpoint atoms in matching order?"
        )
    return moving


def reaction_coordinate(images: Sequence[Structure]) -> tuple[float, ...]:
    """Cumulative RMS distance along the images (Å), the reaction coordinate of pymatgen's NEBAnalysis."""
    r = [0.0]
    for prev, cur in zip(images[:-1], images[1:], strict=True):
        d = np.array([a.distance(b) for a, b in zip(prev, cur, strict=True)])
        r.append(r[-1] + float(np.sqrt(np.sum(d**2))))
    return tuple(r)


def relative(energies: Sequence[float]) -> tuple[float, ...]:
    """Energies relative to the first one."""
    return tuple(float(e - energies[0]) for e in energies)


def write_model(path: Path, model: BaseModel) -> None:
    """Write a pydantic model as JSON."""
    path.write_text(model.model_dump_json(indent=2))


def read_prepared(workdir: Path) -> PreparedInputs:
    """The `PreparedInputs` that `prepare` left in `workdir`."""
    path = workdir / PREPARED_FILE
    if not path.is_file():
        raise InputError(f"{workdir} holds no {PREPARED_FILE}: run prepare first")
    return PreparedInputs.model_validate_json(path.read_text())


def write_structures(path: Path, structures: Sequence[Structure]) -> None:
    """Save structures as a JSON list of pymatgen dicts."""
    path.write_text(json.dumps([s.as_dict() for s in structures]))


def read_structures(path: Path) -> list[Structure]:
    """Load structures saved by `write_structures`."""
    return [Structure.from_dict(d) for d in json.loads(path.read_text())]


@dataclass(frozen=True)
class Stopwatch:
    """Monotonic start time; `seconds()` is the time since."""

    start: float

    @classmethod
    def started(cls) -> Stopwatch:
        """A stopwatch started now."""
        return cls(time.perf_counter())

    def seconds(self) -> float:
        """Seconds since start."""
        return time.perf_counter() - self.start
