"""hopflow's settings in one place: every field reads from a `HOPFLOW_*` variable (MP_API_KEY excepted)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    max_sites: int = Field(default=500, gt=0, le=INT64_MAX, description="Largest structure (sites in the reduced cell) accepted on import.")
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
    lease_seconds: float = Field(default=3600.0, gt=0, description="Default lease of a claimed run before sweep may requeue it.")
    retry_limit: int = Field(default=3, ge=1, le=INT64_MAX, description="Default number of attempts a run gets before it is failed for good.")

    # path finding
    max_paths: int = Field(default=5, ge=1, le=INT64_MAX, description="Most distinct hops kept per structure, shortest first.")
    max_hop: float | None = Field(
        default=None, gt=0, description="Largest hop length in Å; None lets pymatgen-analysis-diffusion choose it."
    )
    supercell_min_length: float = Field(default=10.0, gt=0, description="Smallest supercell lattice length in Å for vacancy hops.")
    supercell_min_atoms: int = Field(default=40, ge=1, le=INT64_MAX, description="Fewest atoms in a vacancy-hop supercell.")
    supercell_max_atoms: int = Field(default=240, ge=1, le=INT64_MAX, description="Most atoms in a vacancy-hop supercell.")
    nimages: int = Field(default=5, ge=1, le=INT64_MAX, description="Intermediate images along a hop (IDPP, NEB).")

    # compute
    dask_profile: str = Field(default="local", description="Dask cluster profile name from deployments/clusters.yaml.")
    max_chunks: int = Field(
        default=16, ge=1, le=INT64_MAX, description="Most Dask tasks one stage flow run splits its items into (fewer, larger tasks amortise "
        "Prefect's per-task cost; more balance uneven items).")
    dask_workers: int = Field(default=2, ge=1, le=INT64_MAX, description="Worker processes of the local Dask cluster.")
    cluster_profiles: Path | None = Field(
        default=None, description="Dask cluster profile file; None uses deployments/clusters.yaml shipped with hopflow."
    )

    # VASP (the vasp-neb engine)
    vasp_cmd: str = Field(default="vasp_std", description="VASP executable and its arguments (split like a shell).")
    vasp_mpi_launcher: str = Field(
        default="", description="MPI launcher put before vasp_cmd, e.g. 'srun' or 'mpirun -np 64'; empty runs VASP directly."
    )
    vasp_psp_dir: Path | None = Field(
        default=None,
        description="POTCAR root in pymatgen's PMG_VASP_PSP_DIR layout (POT_GGA_PAW_PBE/<symbol>/POTCAR); "
        "None uses pymatgen's own PMG_VASP_PSP_DIR setting.",
    )
    vasp_max_errors: int = Field(default=5, ge=0, le=INT64_MAX, description="Most custodian corrections per VASP calculation before it fails.")

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
    vacancy_steps: int = Field(default=300, gt=0, le=INT64_MAX, description="Optimizer step limit of a vacancy relaxation.")
    vacancy_optimizer: str = Field(default="BFGS", description="ASE optimizer of the relaxations (BFGS or FIRE).")
    vacancy_fill_distance: float = Field(
        default=1.0, gt=0, description="Å: an atom this close to the vacant site after relaxation fills the vacancy "
        "(flag vacancy-moved).")
    vacancy_max_displacement: float = Field(
        default=1.0, gt=0, description="Å: an atom moving farther than this in a vacancy relaxation flags "
        "vacancy-moved.")
    archive_batch_rows: int = Field(
        default=2000, gt=0, le=INT64_MAX, description="Rows per Parquet row group and per insert batch of `hopflow export` and "
        "`hopflow import-archive` (memory stays bounded by it).")
    screen_top: int = Field(default=10, ge=0, le=INT64_MAX, description="Pathways `hopflow screen` estimates, in the estimates stage's rank order.")

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

    @property
    def url(self) -> str:
        """The effective database URL."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'hopflow.sqlite'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; call `get_settings.cache_clear()` after changing the environment)."""
    return Settings()
