"""What identifies a barrier engine, without running one: names, result-affecting settings, versions and the
execution-only settings kept out of a run's parameter set. The engines themselves live in `hopflow.tasks.engines`."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hopflow.errors import InputError
from hopflow.settings import Optimizer, get_settings

VacancyMode = Literal["neutral", "charged"]


def versions_of(*packages: str) -> dict[str, str]:
    """Installed versions of the named distributions (missing ones left out)."""
    found: dict[str, str] = {}
    for name in packages:
        try:
            found[name] = package_version(name)
        except PackageNotFoundError:
            continue
    return found


POTENTIAL_MODULES = ("torch", "chgnet.model", "chgnet.model.dynamics", "ase.optimize", "pymatgen.io.ase")
"""What the default potential's first calculation imports (`Stage.warm_modules` of the stages that run it)."""

MODELS: tuple[str, ...] = ("chgnet-0.3.0", "7net-0")
"""The potentials hopflow knows, by canonical name (both trained on MPtrj; weights in their wheels)."""

Device = Literal["cpu", "cuda", "mps"]

_LEGACY_NAMES = {"0.3.0": "chgnet-0.3.0"}  # the CHGNet engines' model name before SevenNet was added
MODEL_PACKAGE = {"chgnet-0.3.0": "chgnet", "7net-0": "sevenn"}
MODEL_WEIGHTS = {"chgnet-0.3.0": "0.3.0", "7net-0": "7net-0"}  # the name each package loads its weights by


def canonical_model(name: str) -> str:
    """The canonical name of a potential (`0.3.0`, CHGNet's own name, is `chgnet-0.3.0`); InputError if unknown."""
    canonical = _LEGACY_NAMES.get(name, name)
    if canonical not in MODELS:
        raise InputError(f"unknown ML potential {name!r}; known: {', '.join(MODELS)}")
    return canonical


def model_versions(model: str) -> dict[str, str]:
    """Versions of the packages that compute with the potential, plus `"model"`: its canonical name."""
    model = canonical_model(model)
    extra = ("e3nn",) if MODEL_PACKAGE[model] == "sevenn" else ()
    return versions_of(MODEL_PACKAGE[model], "torch", *extra, "ase", "pymatgen") | {"model": model}


def model_version(model: str) -> str:
    """Package and weights in one string, e.g. `chgnet-0.4.2+0.3.0` or `sevenn-0.13.0+7net-0`."""
    model = canonical_model(model)
    package = MODEL_PACKAGE[model]
    return f"{package}-{versions_of(package).get(package, '?')}+{MODEL_WEIGHTS[model]}"


# ---------------------------------------------------------------- ML potentials: mlip-idpp, mlip-neb

MLIP_ENGINE_REVISION = "3"
"""2: any potential (CHGNet or SevenNet), barrier from the lower endpoint, profile flags; 3: mlip-idpp computes
energies alone (no max_forces) and takes an endpoint's energy from its relaxed vacancy."""
DEFAULT_NEB_FMAX = 0.1  # eV/Å
DEFAULT_NEB_STEPS = 500
DEFAULT_SPRING = 0.1  # eV/Å², ASE's default
DEFAULT_ENDPOINT_FMAX = 0.05  # eV/Å
DEFAULT_ENDPOINT_STEPS = 300

class MlipSettings(BaseModel):
    """What both MLIP engines share: the potential, the device, the optional endpoint relaxation, the profile check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(default_factory=lambda: get_settings().barrier_model, validate_default=True,
                       description="ML potential: chgnet-0.3.0 or 7net-0 (default HOPFLOW_BARRIER_MODEL).")
    device: Device | None = Field(default=None, description="Torch device; None picks CUDA when available.")
    relax_endpoints: bool = Field(
        default=False, description="Relax the endpoints' positions first (stand-alone use: the estimates stage hands "
        "in endpoints already relaxed in the shared vacancy relaxations) and re-run IDPP between them.")
    endpoint_fmax: float = Field(default=DEFAULT_ENDPOINT_FMAX, gt=0, description="Endpoint force threshold (eV/Å).")
    endpoint_steps: int = Field(default=DEFAULT_ENDPOINT_STEPS, gt=0, description="Endpoint optimizer step limit.")
    endpoint_optimizer: Optimizer = Field(default="BFGS", description="ASE optimizer of the endpoint relaxations.")
    intermediate_minimum_tol: float = Field(
        default_factory=lambda: get_settings().intermediate_minimum_tol, ge=0,
        description="eV: an interior image this far below the lower endpoint flags the path intermediate-minimum.")

    @field_validator("model")
    @classmethod
    def _known(cls, name: str) -> str:
        return canonical_model(name)


class MlipIdppSettings(MlipSettings):
    """Settings of `mlip-idpp`: single points (energy and forces) on the given IDPP images."""


class MlipNebSettings(MlipSettings):
    """Settings of `mlip-neb`: ASE climbing-image NEB with one calculator per image."""

    nimages: int | None = Field(
        default=None, gt=0, description="Intermediate images; None keeps the count given, else IDPP re-interpolates."
    )
    fmax: float = Field(default=DEFAULT_NEB_FMAX, gt=0, description="NEB force threshold (eV/Å).")
    steps: int = Field(default=DEFAULT_NEB_STEPS, gt=0, description="NEB optimizer step limit.")
    climb: bool = Field(default=True, description="Climbing image on (CI-NEB).")
    spring: float = Field(default=DEFAULT_SPRING, gt=0, description="Spring constant (eV/Å²).")
    optimizer: Optimizer = Field(default="BFGS", description="ASE optimizer of the band (FIRE is the cautious choice).")


def mlip_engine_version(model: str) -> str:
    """Engine revision, package and weights of the potential: any change of them may change a barrier."""
    return f"{MLIP_ENGINE_REVISION}+{model_version(model)}"



# ---------------------------------------------------------------- VASP: vasp-neb

VASP_ENGINE_REVISION = "2"  # 2: barriers from the lower endpoint, profiles classified

# Settings that change how VASP is run, not what it computes: a continuation may change them.
VASP_EXECUTION_FIELDS = frozenset({"vasp_cmd", "mpi_launcher", "max_errors", "compress", "polling_s", "monitor_freq"})
DEFAULT_FUNCTIONAL = "PBE"
DEFAULT_POLLING_S = 10.0  # custodian's own defaults
DEFAULT_MONITOR_FREQ = 30


def _default(name: str) -> Any:
    return lambda: getattr(get_settings(), name)


class VaspNebSettings(BaseModel):
    """Settings of `vasp-neb`. Command, launcher and POTCAR directory default to the hopflow settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vasp_cmd: str = Field(default_factory=_default("vasp_cmd"), description="VASP executable and arguments.")
    mpi_launcher: str = Field(default_factory=_default("vasp_mpi_launcher"), description="Launcher before vasp_cmd.")
    psp_dir: Path | None = Field(default_factory=_default("vasp_psp_dir"), description="POTCAR root directory.")
    functional: str = Field(default=DEFAULT_FUNCTIONAL, description="POTCAR functional (pymatgen's names).")
    max_errors: int = Field(default_factory=_default("vasp_max_errors"), gt=0, description="Custodian max_errors.")
    vacancy_mode: VacancyMode = Field(
        default="neutral",
        description="'neutral': the cell keeps the vacancy's electrons (an F-centre for F); 'charged': an ionic "
        "vacancy, NELECT lowered by the ion's charge (+1 cell for F⁻).",
    )
    climbing: bool = Field(default=True, description="CI-NEB (CINEBSet, LCLIMB) instead of plain NEB (NEBSet).")
    endpoint_calculations: bool = Field(
        default=True, description="Single points of the end images in start/ and end/, for their energies."
    )
    user_incar_settings: dict[str, Any] = Field(default_factory=dict, description="INCAR overrides.")
    reciprocal_density: int | None = Field(default=None, gt=0, description="k-points per Å⁻³; None keeps the set's.")
    compress: bool = Field(default=False, description="Gzip large outputs after parsing.")
    intermediate_minimum_tol: float = Field(
        default_factory=_default("intermediate_minimum_tol"), ge=0,
        description="An interior image this far (eV) below the lower endpoint flags the path intermediate-minimum.")
    polling_s: float = Field(default=DEFAULT_POLLING_S, gt=0, description="Custodian polling interval (s).")
    monitor_freq: int = Field(default=DEFAULT_MONITOR_FREQ, gt=0, description="Polls between monitor checks.")

    def command(self) -> list[str]:
        """The launcher and VASP command as one argument list."""
        return shlex.split(self.mpi_launcher) + shlex.split(self.vasp_cmd)


def vasp_engine_version() -> str:
    """Engine revision with pymatgen (input sets) and custodian versions."""
    v = versions_of("pymatgen", "custodian")
    return f"{VASP_ENGINE_REVISION}+pymatgen-{v.get('pymatgen', '?')}+custodian-{v.get('custodian', '?')}"


# ---------------------------------------------------------------- identity of every engine

MLIP_EXECUTION_FIELDS = frozenset({"device"})
"""mlip settings that change how a potential runs, not the numbers it gives (beyond round-off)."""


@dataclass(frozen=True)
class EngineIdentity:
    """An engine's name, settings model, version and the settings that do not change its numbers."""

    name: str
    settings_type: type[BaseModel]
    version: Callable[[Any], str]
    """The version of the engine under its settings (revision and the packages that compute)."""
    execution_fields: frozenset[str]

    def settings(self, given: BaseModel | dict[str, Any] | None = None) -> Any:
        """The engine's settings model from a model, a mapping or the defaults."""
        if given is None:
            return self.settings_type()
        if isinstance(given, self.settings_type):
            return given
        if isinstance(given, BaseModel):
            given = given.model_dump()
        return self.settings_type.model_validate(dict(given))


ENGINE_IDENTITIES: dict[str, EngineIdentity] = {
    "mlip-idpp": EngineIdentity("mlip-idpp", MlipIdppSettings, lambda s: mlip_engine_version(s.model),
                                MLIP_EXECUTION_FIELDS),
    "mlip-neb": EngineIdentity("mlip-neb", MlipNebSettings, lambda s: mlip_engine_version(s.model),
                               MLIP_EXECUTION_FIELDS),
    "vasp-neb": EngineIdentity("vasp-neb", VaspNebSettings, lambda s: vasp_engine_version(), VASP_EXECUTION_FIELDS),
}


def engine_identity(name: str) -> EngineIdentity:
    """An engine's identity by name; InputError if unknown."""
    try:
        return ENGINE_IDENTITIES[name]
    except KeyError:
        raise InputError(f"unknown barrier engine {name!r}; known: {', '.join(sorted(ENGINE_IDENTITIES))}") from None


def engine_parameters(name: str, model: str | None = None) -> dict[str, Any]:
    """The parameter-set part naming a barrier engine: name, version and its result-affecting default settings
    (`model` replaces an ML engine's potential).

    Execution-only settings (VASP command, launcher, polling, device ...) stay out, so changing them keeps the hash.
    """
    identity = engine_identity(name)
    settings = identity.settings({"model": model} if model is not None else None)
    values = {k: v for k, v in settings.model_dump(mode="json").items() if k not in identity.execution_fields}
    return {"engine": name, "engine_version": identity.version(settings), "engine_settings": values}
