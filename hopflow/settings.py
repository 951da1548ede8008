"""hopflow's settings in one place: every `HOPFLOW_*` variable the program reads is a field of `Settings` (MP_API_KEY
is read too; `HOPFLOW_PROFILE_<STAGE>` fills the `stage_profiles` mapping). `get_settings()` is the cached process-wide
instance, `override(...)` replaces fields for tests, `check_environment()` warns about `HOPFLOW_*` variables that no
setting reads."""

from __future__ import annotations

import difflib
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, NonNegativeFloat, PositiveFloat, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

Optimizer = Literal["BFGS", "FIRE"]
"""The ASE optimizers a relaxation may use."""

INT64_MAX = 2**63 - 1
"""Integer settings stay within the 64-bit integers the database stores (hopflow.validation uses the same bound)."""


class Settings(BaseSettings):
    """Run-time configuration; override any field with `HOPFLOW_<NAME>` or by constructing `Settings(...)`."""

    model_config = SettingsConfigDict(env_prefix="HOPFLOW_", extra="ignore", allow_inf_nan=False)  # no nan/inf floats

    home: Path = Field(
        default=Path.home() / ".hopflow",
        description="Data home: the default SQLite database, work directories, plots and checkpoints live here.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the hopflow database; default: a SQLite file `hopflow.sqlite` under `home`. "
        "Use `postgresql+psycopg://user:pass@host/db` for many concurrent workers, `sqlite://` for in-memory.",
    )
    migrating_ion: str = Field(default="F", description="Element symbol of the migrating ion (F, Li, Na, O, Cl ...).")
    max_sites: int = Field(
        default=500, gt=0, le=INT64_MAX,
        description="Largest structure (sites in the reduced cell) accepted on import.")
    mp_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("MP_API_KEY", "HOPFLOW_MP_API_KEY"),
        description="Materials Project API key (a secret: never printed, logged or stored).",
    )

    # queue
    isolate_crashed_batches: bool = Field(
        default=False, description="Poison isolation across flow runs: runs lost with others of a crashed flow run get "
        "their attempt back and are claimed in half-size batches until the crashing run is lost alone. Off by default: "
        "each halving costs a crashed flow run, and the chaos run (30 always-crashing-on-first-try items in 300) did "
        "not finish in 420 s with it on.")
    lease_seconds: float = Field(
        default=3600.0, gt=0, description="Default lease of a claimed run before sweep may requeue it (a stage's own "
        "lease wins over it; `leases` over both). A running flow run renews its runs' leases while they run.")
    leases: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="Lease in seconds by stage name (JSON, HOPFLOW_LEASES='{\"synthetic\": "
        "15}'): wins over the stage's own and `lease_seconds`.")
    time_limits: dict[str, NonNegativeFloat] = Field(
        default_factory=dict, description="Per-item time limit in seconds by stage name (JSON, HOPFLOW_TIME_LIMITS="
        "'{\"pathways\": 120}'); wins over the stage's own. With a limit, each item runs in a child process that is "
        "killed when the item passes it (and restarted when an item kills it); 0 runs the stage's items in the Dask "
        "worker itself, with no limit, and its flow runs do not renew their leases.")
    item_glibc_tunables: str = Field(
        default="glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736", description="GLIBC_TUNABLES of "
        "the item processes (unless the environment sets its own; empty: glibc's defaults). The default keeps the "
        "memory a process freed for its next allocations instead of giving it back to the kernel: glibc maps every "
        "block above 32 MiB afresh and unmaps it when freed, and a CHGNet force call on a 127-atom LiF vacancy "
        "supercell (2.2 GB of tensors) spent as long in page faults as in arithmetic (1.63 s per call, 0.78 s "
        "with it). A process's resident memory then stays at its largest item's peak.")
    claim_start_seconds: float = Field(
        default=600.0, gt=0, description="How long the controller keeps renewing the leases of claimed runs whose "
        "flow run Prefect has not started yet (scheduled, pending, or running but not yet at the runs); after that "
        "only the lease holds them.")
    retry_limit: int = Field(
        default=3, ge=1, le=INT64_MAX,
        description="Default number of attempts a run gets before it is failed for good.")

    # path finding
    max_paths: int = Field(
        default=5, ge=1, le=INT64_MAX, description="Most distinct hops kept per structure, shortest first.")
    max_hop: float | None = Field(
        default=None, gt=0, description="Largest hop length in Å; None lets pymatgen-analysis-diffusion choose it."
    )
    supercell_min_length: float = Field(
        default=10.0, gt=0, description="Smallest supercell lattice length in Å for vacancy hops.")
    supercell_min_atoms: int = Field(
        default=40, ge=1, le=INT64_MAX, description="Fewest atoms in a vacancy-hop supercell.")
    supercell_max_atoms: int = Field(
        default=240, ge=1, le=INT64_MAX, description="Most atoms in a vacancy-hop supercell.")
    nimages: int = Field(default=5, ge=1, le=INT64_MAX, description="Intermediate images along a hop (IDPP, NEB).")

    # compute
    dask_profile: str = Field(
        default="local", description="Dask cluster profile name from deployments/clusters.yaml; when set, every "
        "stage runs on it unless `stage_profiles` names another (unset, each stage uses its own `resources`).")
    stage_profiles: dict[str, str] = Field(
        default_factory=dict, description="Dask cluster profile by stage name, from `HOPFLOW_PROFILE_<STAGE>` "
        "variables (stage name upper-cased, `-` as `_`: HOPFLOW_PROFILE_VASP_NEB=slurm-cpu); wins over `dask_profile`.")
    max_chunks: int = Field(
        default=16, ge=1, le=INT64_MAX, description="Most Dask tasks one stage flow run splits its items into "
        "(fewer, larger tasks amortise Prefect's per-task cost; more balance uneven items).")
    chunk_bisect_depth: int = Field(
        default=16, ge=0, le=64, description="Poison isolation inside a flow run: how many times a chunk of items "
        "that failed as a whole (its Dask worker died, e.g. killed by one of its items) is split in two and its halves "
        "run again, so that only the item that crashes records the failure. 16 reaches single items in any chunk of "
        "up to 65,536; 0 fails the whole chunk at once. Each split costs two task submissions (~0.1 s each).")
    dask_workers: int = Field(default=2, ge=1, le=INT64_MAX, description="Worker processes of the local Dask cluster.")
    dask_addresses: dict[str, str] = Field(
        default_factory=dict, description="Scheduler address of a standing Dask cluster by profile name (JSON, "
        "HOPFLOW_DASK_ADDRESSES='{\"local\": \"tcp://127.0.0.1:8786\"}'; `hopflow cluster` starts one and prints "
        "it): stage flows on that profile connect to it instead of starting a cluster per flow run, so its workers "
        "and their item processes, libraries and ML potential loaded, serve one flow run after another.")
    cluster_profiles: Path | None = Field(
        default=None, description="Dask cluster profile file; None uses deployments/clusters.yaml shipped with hopflow."
    )
    slurm_queue: str | None = Field(
        default=None,
        description="SLURM partition of every SLURM profile's jobs (a site specific kept out of the YAML).")
    slurm_account: str | None = Field(
        default=None, description="SLURM account charged for every SLURM profile's jobs.")
    dask_interface: str | None = Field(
        default=None, description="Network interface (e.g. ib0, eth0) of the scheduler and workers of SLURM profiles.")

    # VASP (the vasp-neb engine)
    vasp_cmd: str = Field(default="vasp_std", description="VASP executable and its arguments (split like a shell).")
    vasp_mpi_launcher: str = Field(
        default="",
        description="MPI launcher put before vasp_cmd, e.g. 'srun' or 'mpirun -np 64'; empty runs VASP directly.")
    vasp_psp_dir: Path | None = Field(
        default=None,
        description="POTCAR root in pymatgen's PMG_VASP_PSP_DIR layout (POT_GGA_PAW_PBE/<symbol>/POTCAR); "
        "None uses pymatgen's own PMG_VASP_PSP_DIR setting.",
    )
    vasp_max_errors: int = Field(
        default=5, ge=0, le=INT64_MAX, description="Most custodian corrections per VASP calculation before it fails.")

    estimate_engine: str = Field(
        default="mlip-idpp", description="Barrier engine of the estimates stage (mlip-idpp or mlip-neb)."
    )
    barrier_model: str = Field(
        default="chgnet-0.3.0", description="ML potential of the MLIP engines and the vacancy relaxations "
        "(chgnet-0.3.0 or 7net-0; `--model`).")
    intermediate_minimum_tol: float = Field(
        default=0.02, ge=0, description="eV: an interior image this far below the lower endpoint flags a path "
        "`intermediate-minimum` (no barrier is ranked).")
    mlip_batch_atoms: int | None = Field(
        default=None, ge=1, le=INT64_MAX, description="Atoms per ML-potential call when CHGNet computes energies "
        "alone (mlip-idpp's images) in batches; None: 2,000 on a GPU, one structure per call on a CPU (batches "
        "measured no faster there). Bounds the memory of a call: 7 forces of 240-atom cells took 9 GiB at once.")
    bulk_fmax: float = Field(default=0.02, gt=0, description="eV/Å: force (and scaled stress) threshold of the bulk "
                             "relaxation (lattice and positions, symmetry kept) before vacancies are made.")
    bulk_steps: int = Field(default=300, gt=0, le=INT64_MAX, description="Optimizer step limit of the bulk relaxation.")
    vacancy_fmax: float = Field(default=0.05, gt=0, description="eV/Å: force threshold of the vacancy relaxations "
                                "(positions, fixed cell).")
    vacancy_steps: int = Field(
        default=300, gt=0, le=INT64_MAX, description="Optimizer step limit of a vacancy relaxation.")
    vacancy_optimizer: Optimizer = Field(default="BFGS", description="ASE optimizer of the relaxations (BFGS or FIRE).")
    vacancy_fill_distance: float = Field(
        default=1.0, gt=0, description="Å: an atom this close to the vacant site after relaxation fills the vacancy "
        "(flag vacancy-moved).")
    vacancy_max_displacement: float = Field(
        default=1.0, gt=0, description="Å: an atom moving farther than this in a vacancy relaxation flags "
        "vacancy-moved.")
    archive_batch_rows: int = Field(
        default=2000, gt=0, le=INT64_MAX, description="Rows per Parquet row group and per insert batch of "
        "`hopflow export` and `hopflow import-archive` (memory stays bounded by it).")
    screen_top: int = Field(
        default=10, ge=0, le=INT64_MAX,
        description="Pathways `hopflow screen` estimates, in the estimates stage's rank order.")

    screen_stages: list[str] = Field(
        default=["pathways", "features", "estimates"],
        description="Stages `hopflow screen` runs in batch mode after importing the bundled set, in order.",
    )

    # reading input files (import): every read is bounded, whatever the file claims
    max_input_bytes: int = Field(
        default=8 * 1024 * 1024, gt=0, description="Largest input file import reads, in bytes (a 500-site CIF is "
        "~50 KB); larger files are refused unread.")
    input_read_seconds: float = Field(
        default=30.0, gt=0, description="Longest import spends reading one input file before it is refused.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """pydantic-settings' sources, with the `HOPFLOW_PROFILE_<STAGE>` variables after the environment's own."""
        return init_settings, env_settings, StageProfilesSource(settings_cls), dotenv_settings, file_secret_settings

    @property
    def url(self) -> str:
        """The effective database URL."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'hopflow.sqlite'}"


PROFILE_PREFIX = "HOPFLOW_PROFILE_"
"""`HOPFLOW_PROFILE_<STAGE>` names the Dask cluster profile of one stage (the `stage_profiles` field)."""


def stage_profile_key(variable_suffix: str) -> str:
    """The stage name of a `HOPFLOW_PROFILE_<STAGE>` suffix: lower-cased, `_` as `-` (VASP_NEB -> vasp-neb)."""
    return variable_suffix.lower().replace("_", "-")


def stage_profiles_from(environ: Mapping[str, str]) -> dict[str, str]:
    """Stage name -> cluster profile from the `HOPFLOW_PROFILE_<STAGE>` variables of `environ` (empty ones skipped)."""
    profiles: dict[str, str] = {}
    for name, value in environ.items():
        if name.upper().startswith(PROFILE_PREFIX) and len(name) > len(PROFILE_PREFIX) and value:
            profiles[stage_profile_key(name[len(PROFILE_PREFIX):])] = value
    return profiles


class StageProfilesSource(PydanticBaseSettingsSource):
    """Fills `stage_profiles` from the `HOPFLOW_PROFILE_<STAGE>` variables (one variable per stage, not one JSON)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: `__call__` reads the one field it fills."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        profiles = stage_profiles_from(os.environ)
        return {"stage_profiles": profiles} if profiles else {}


# ---------------------------------------------------------------- variables that are not settings

NON_SETTING_VARIABLES = frozenset({
    # scripts/test.sh
    "HOPFLOW_VENV", "HOPFLOW_BOOTSTRAP_PYTHON", "HOPFLOW_STATIC_CHECKS",
    # scripts/services.sh
    "HOPFLOW_SERVICES_DIR", "HOPFLOW_PYTHON", "HOPFLOW_PG_BIN", "HOPFLOW_SLURM_CPUS", "HOPFLOW_SLURM_MEMORY_MB",
    "HOPFLOW_SERVICES_TIMEOUT", "HOPFLOW_PREFECT_DATABASE",
})
"""`HOPFLOW_*` variables read by the shell scripts (scripts/*.sh), not by the program: no warning about them."""

NON_SETTING_PREFIXES = ("HOPFLOW_TEST_", "HOPFLOW_FAKE_VASP_")
"""Prefixes of test-only variables (HOPFLOW_TEST_POSTGRES_URL, HOPFLOW_TEST_TIMEOUT; the fake VASP of
tests/fake_vasp reads HOPFLOW_FAKE_VASP_*): the tests' business, no warning about them."""


class UnknownSettingWarning(UserWarning):
    """A `HOPFLOW_*` variable is set that no setting reads (a typo, or a setting that was removed)."""


def setting_variables() -> dict[str, str]:
    """Every `HOPFLOW_*` variable (upper case) a field reads, aliases included -> the field's name."""
    prefix = str(Settings.model_config.get("env_prefix", "")).upper()
    names: dict[str, str] = {}
    for field_name, field in Settings.model_fields.items():
        names[f"{prefix}{field_name.upper()}"] = field_name
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
        for choice in choices:
            if isinstance(choice, str) and choice.upper().startswith(prefix):
                names[choice.upper()] = field_name
    return names


def check_environment(environ: Mapping[str, str] | None = None, *, warn: bool = True) -> list[str]:
    """The `HOPFLOW_*` variables of `environ` (default: os.environ) that nothing reads, each with a message naming it
    and the closest setting; with `warn`, each message is also issued as an `UnknownSettingWarning`.

    pydantic-settings ignores such variables (its `extra="forbid"` applies to constructor arguments, not to the
    environment), so a typo like HOPFLOW_MAX_HOPP=3 would otherwise leave the default in force unnoticed. Known:
    the settings' variables (aliases included), `HOPFLOW_PROFILE_<STAGE>`, the scripts' knobs
    (NON_SETTING_VARIABLES) and the tests' (NON_SETTING_PREFIXES). Values are never part of a message.
    """
    environ = os.environ if environ is None else environ
    known = setting_variables()
    messages: list[str] = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("HOPFLOW_") or upper in known or upper in NON_SETTING_VARIABLES:
            continue
        if upper.startswith(NON_SETTING_PREFIXES) or (upper.startswith(PROFILE_PREFIX) and upper != PROFILE_PREFIX):
            continue
        suffixes = {variable.removeprefix("HOPFLOW_"): variable for variable in known}  # the prefix is no likeness
        close = difflib.get_close_matches(upper.removeprefix("HOPFLOW_"), list(suffixes), n=1, cutoff=0.6)
        hint = f"; did you mean {suffixes[close[0]]} (setting `{known[suffixes[close[0]]]}`)?" if close else ""
        messages.append(f"{name} is set but is not a hopflow setting and is ignored{hint}")
    if warn:
        for message in messages:
            warnings.warn(message, UnknownSettingWarning, stacklevel=2)
    return messages


# ---------------------------------------------------------------- the process-wide settings


class _SettingsAccess:
    """`get_settings()`: the process-wide settings, read from the environment once and cached; inside
    `override(...)`, the overridden ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cached: Settings | None = None
        self._overrides: list[Settings] = []

    def __call__(self) -> Settings:
        if self._overrides:
            return self._overrides[-1]
        with self._lock:
            if self._cached is None:
                check_environment()
                self._cached = Settings()
            return self._cached

    def cache_clear(self) -> None:
        """Forget the cached settings: the next call reads the environment again (overrides stay)."""
        with self._lock:
            self._cached = None


get_settings = _SettingsAccess()
"""The process-wide settings (cached; call `get_settings.cache_clear()` after changing the environment)."""


@contextmanager
def override(**fields: Any) -> Iterator[Settings]:
    """For tests: `get_settings()` returns the current settings with `fields` replaced (validated) inside the block,
    and the previous ones after it. Applies to this process's threads; worker processes read their environment."""
    unknown = set(fields) - set(Settings.model_fields)
    if unknown:
        raise TypeError(f"override: no such setting {', '.join(sorted(unknown))}")
    base = get_settings()
    explicit = {name: getattr(base, name) for name in base.model_fields_set}
    settings = Settings(**(explicit | fields))
    stack = get_settings._overrides
    stack.append(settings)
    try:
        yield settings
    finally:
        for index in range(len(stack) - 1, -1, -1):  # by identity: equal settings compare equal
            if stack[index] is settings:
                del stack[index]
                break
