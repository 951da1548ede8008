"""Dask cluster profiles (deployments/clusters.yaml): LocalCluster or dask-jobqueue SLURMCluster arguments for
prefect_dask's DaskTaskRunner, chosen by name (`HOPFLOW_DASK_PROFILE`, per deployment through its job variables)."""

from __future__ import annotations

import inspect
import os
import signal
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, cast

import dask
import yaml
from distributed import LocalCluster
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.cluster import Cluster

from hopflow.errors import ProfileError
from hopflow.settings import Settings, get_settings

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner



def _import_dask_jobqueue() -> Any:
    """dask-jobqueue's SLURM module (importing the package registers its configuration defaults in dask.config),
    imported keeping the SIGINT handler: the package imports its `runner` module, which replaces the handler with
    `sys.exit()`, so that a Ctrl-C would raise SystemExit(None), bypass every KeyboardInterrupt handler and end the
    command with exit code 0."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    import dask_jobqueue.slurm

    if before is not None and signal.getsignal(signal.SIGINT) is not before:
        signal.signal(signal.SIGINT, before)
    return dask_jobqueue.slurm


SLURMJob = _import_dask_jobqueue().SLURMJob
DEFAULT_PROFILES_PATH = Path(__file__).with_name("clusters.yaml")
ClusterKind = Literal["local", "slurm"]
CLUSTER_CLASSES: Mapping[str, str] = MappingProxyType(
    {"local": "hopflow.deployments.clusters.NannyLocalCluster", "slurm": "dask_jobqueue.SLURMCluster"}
)
PROFILE_KEYS = frozenset({"description", "cluster", "local", "jobqueue", "adapt"})
OPTIONS_SECTION: Mapping[str, str] = MappingProxyType({"local": "local", "slurm": "jobqueue"})

# dask-jobqueue configuration keys whose keyword argument has another name, and deprecated ones with their successor.
JOBQUEUE_KEY_TO_KWARG: Mapping[str, str] = MappingProxyType({"name": "job_name"})
DEPRECATED_JOBQUEUE_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "extra": "worker-extra-args",
        "env-extra": "job-script-prologue",
        "job-extra": "job-extra-directives",
        "header-skip": "job-directives-skip",
        "project": "account",
    }
)
# SLURMCluster arguments that belong to the cluster (scheduler side), not to each job.
CLUSTER_ONLY_KWARGS = frozenset({"scheduler_options", "shared_temp_directory"})
DEFAULT_LOG_SUBDIR = Path("logs") / "dask"

UNSET_WORKER_ENVIRON = ("MALLOC_TRIM_THRESHOLD_",)
"""Taken out of what a Dask nanny sets before it starts its worker process (Dask's one thread per worker for torch
and BLAS stays): Dask's default MALLOC_TRIM_THRESHOLD_=65536. A fixed trim threshold switches off glibc's
dynamic one, so every large tensor freed is given back to the kernel and faulted in again: a CHGNet vacancy
relaxation spent 7.1 s of system time beside 14.4 s of user time with it, 1.0 s beside 15.3 s without (8x the page
faults). Workers started by this process's nannies (local profiles) get it; SLURM jobs read their own Dask config."""
dask.config.set({"distributed.nanny.pre-spawn-environ": {
    key: value for key, value in (dask.config.get("distributed.nanny.pre-spawn-environ") or {}).items()
    if key not in UNSET_WORKER_ENVIRON}})

QUIET_DASK_CONFIG: Mapping[str, Any] = MappingProxyType({
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
})
"""Dask's housekeeping slowed down for long tasks: its statistical profiler (a stack sample of every busy worker
thread each 10 ms, for the dashboard's profile page) off, the event-loop tick check at 1 s instead of 20 ms, the
system monitor at 2 s instead of 0.5 s and the memory monitor at 0.5 s instead of 0.1 s. A 2-worker local cluster
whose workers wait on their item processes used 0.93 core-s per 20 s with Dask's defaults and 0.20 with these, CPU
that the items' processes lose on a node whose cores they fill. Local clusters get it from this process's config
(nannies pass it to their workers); SLURM jobs as DASK_* variables in their job script (`_environment_overrides`)."""
dask.config.set(dict(QUIET_DASK_CONFIG))


class NannyLocalCluster(LocalCluster):
    """A LocalCluster whose worker processes are left to their nannies when they die.

    A nanny restarts its worker process when it dies; distributed's SpecCluster also closes the nanny for good when
    its worker is still missing `distributed.deploy.lost-worker-timeout` (15 s) after a loss, which a worker caught
    mid-restart in a crash loop (an item that kills its worker: Dask retries the chunk, hopflow bisects it) is. With
    both nannies closed the cluster had no workers left and the flow run waited on its chunk for ever. Worker
    threads (`processes: false`) have no nanny and keep Dask's behaviour."""

    def _update_worker_status(self, op: str, msg: Any) -> None:
        if op == "remove" and self.processes:
            Cluster._update_worker_status(self, op, msg)  # the bookkeeping without SpecCluster's delayed close
            return
        super()._update_worker_status(op, msg)


@dataclass(frozen=True)
class ClusterProfile:
    """One named profile: the cluster class and its keyword arguments, plus optional adaptive scaling."""

    name: str
    cluster: ClusterKind
    description: str
    cluster_kwargs: Mapping[str, Any]
    adapt_kwargs: Mapping[str, Any] | None

    @property
    def cluster_class(self) -> str:
        """Dotted name of the Dask cluster class."""
        return CLUSTER_CLASSES[self.cluster]


@dataclass(frozen=True)
class WorkerProbe:
    """Where a task ran: host, process, SLURM job and thread settings of the worker."""

    hostname: str
    pid: int
    slurm_job_id: str | None
    omp_num_threads: str | None
    dask_profiler: bool
    """Whether Dask's statistical profiler samples this worker (QUIET_DASK_CONFIG turns it off)."""


def probe_worker() -> WorkerProbe:
    """Describe the process this runs in; submit it to a cluster to see where its workers live."""
    return WorkerProbe(
        hostname=socket.gethostname(),
        pid=os.getpid(),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        dask_profiler=bool(dask.config.get("distributed.worker.profile.enabled")),
    )


@lru_cache(maxsize=1)
def _jobqueue_kwargs() -> frozenset[str]:
    config_keys = dask.config.get("jobqueue.slurm").keys()
    return frozenset(JOBQUEUE_KEY_TO_KWARG.get(key, key.replace("-", "_")) for key in config_keys)


@lru_cache(maxsize=1)
def _local_kwargs() -> frozenset[str]:
    params = inspect.signature(LocalCluster.__init__).parameters.values()
    return frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD) - {"self"}


@lru_cache(maxsize=2)
def _adapt_kwargs(kind: ClusterKind) -> frozenset[str]:
    params = set(inspect.signature(Adaptive.__init__).parameters) - {"self", "cluster", "kwargs", "worker_key"}
    if kind == "slurm":
        params |= {"minimum_jobs", "maximum_jobs"}
    return frozenset(params)


def _to_kwargs(
    where: str, options: Mapping[str, Any], allowed: frozenset[str], jobqueue: bool
) -> dict[str, Any]:
    """Map configuration keys (hyphenated, as dask-jobqueue writes them, or underscored) to checked kwargs."""
    if not isinstance(options, Mapping):
        raise ProfileError(f"{where}: expected a mapping, got {type(options).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        key = str(key)
        if jobqueue and key.replace("_", "-") in DEPRECATED_JOBQUEUE_KEYS:
            new = DEPRECATED_JOBQUEUE_KEYS[key.replace("_", "-")]
            raise ProfileError(f"{where}: {key!r} is deprecated in dask-jobqueue, use {new!r}")
        name = JOBQUEUE_KEY_TO_KWARG.get(key, key.replace("-", "_")) if jobqueue else key.replace("-", "_")
        if name not in allowed:
            raise ProfileError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
        kwargs[name] = value
    return kwargs


def _parse_profile(name: str, raw: Any) -> ClusterProfile:
    where = f"profile {name!r}"
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{where}: expected a mapping")
    unknown = set(raw) - PROFILE_KEYS
    if unknown:
        raise ProfileError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(PROFILE_KEYS)})")
    kind = raw.get("cluster")
    if kind not in CLUSTER_CLASSES:
        raise ProfileError(f"{where}: cluster must be one of {sorted(CLUSTER_CLASSES)}, got {kind!r}")
    kind = cast(ClusterKind, kind)
    section = OPTIONS_SECTION[kind]
    other = next(s for s in OPTIONS_SECTION.values() if s != section)
    if other in raw:
        raise ProfileError(f"{where}: a {kind} profile takes `{section}:` options, not `{other}:`")
    allowed = _jobqueue_kwargs() if kind == "slurm" else _local_kwargs()
    cluster_kwargs = _to_kwargs(f"{where} {section}", raw.get(section) or {}, allowed, jobqueue=kind == "slurm")
    adapt = raw.get("adapt")
    adapt_kwargs = None if adapt is None else _to_kwargs(f"{where} adapt", adapt, _adapt_kwargs(kind), jobqueue=False)
    return ClusterProfile(
        name=name,
        cluster=kind,
        description=str(raw.get("description", "")),
        cluster_kwargs=MappingProxyType(cluster_kwargs),
        adapt_kwargs=None if adapt_kwargs is None else MappingProxyType(adapt_kwargs),
    )


def profiles_path(settings: Settings | None = None) -> Path:
    """The profile file in use: `HOPFLOW_CLUSTER_PROFILES`, else the one shipped beside this module."""
    settings = settings or get_settings()
    return settings.cluster_profiles or DEFAULT_PROFILES_PATH


def load_profiles(path: Path | str | None = None) -> dict[str, ClusterProfile]:
    """Read and check every profile of a profile file (default: `profiles_path()`)."""
    path = Path(path) if path is not None else profiles_path()
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ProfileError(f"cannot read cluster profiles {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ProfileError(f"cluster profiles {path} are not valid YAML: {exc}") from exc
    if not isinstance(document, Mapping) or not isinstance(document.get("profiles"), Mapping):
        raise ProfileError(f"cluster profiles {path}: expected a top-level `profiles:` mapping")
    return {str(name): _parse_profile(str(name), raw) for name, raw in document["profiles"].items()}


def get_profile(name: str | None = None, path: Path | str | None = None) -> ClusterProfile:
    """One profile by name (default: the `dask_profile` setting)."""
    name = name or get_settings().dask_profile
    profiles = load_profiles(path)
    if name not in profiles:
        raise ProfileError(f"no cluster profile {name!r} in {path or profiles_path()} (have: {', '.join(profiles)})")
    return profiles[name]


def _environment_overrides(profile: ClusterProfile, settings: Settings) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if profile.cluster == "local":
        if "dask_workers" in settings.model_fields_set:
            overrides["n_workers"] = settings.dask_workers
        return overrides
    # site specifics applied to every SLURM profile (settings, not edited into the YAML)
    if settings.slurm_queue:
        overrides["queue"] = settings.slurm_queue
    if settings.slurm_account:
        overrides["account"] = settings.slurm_account
    interface = settings.dask_interface
    if interface:
        overrides["interface"] = interface
        options = dict(profile.cluster_kwargs.get("scheduler_options") or {})
        options["interface"] = interface
        options.pop("host", None)
        overrides["scheduler_options"] = options
    if not profile.cluster_kwargs.get("log_directory"):
        overrides["log_directory"] = str(settings.home / DEFAULT_LOG_SUBDIR)
    overrides["job_script_prologue"] = [*(profile.cluster_kwargs.get("job_script_prologue") or []),
                                        *quiet_dask_exports()]
    return overrides


def quiet_dask_exports() -> list[str]:
    """QUIET_DASK_CONFIG as the `export DASK_…=…` lines of a job script (Dask reads its config from them)."""
    return [f"export DASK_{key.upper().replace('.', '__').replace('-', '_')}={value}"
            for key, value in QUIET_DASK_CONFIG.items()]


def task_runner_kwargs(
    profile_name: str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    adapt_overrides: Mapping[str, Any] | None = None,
    path: Path | str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `prefect_dask.DaskTaskRunner` (cluster_class, cluster_kwargs, adapt_kwargs).

    Precedence: the profile file < environment (queue, account, interface, local workers) < `overrides`, which use
    the profile's own keys (dask-jobqueue's for SLURM, LocalCluster's for local) and are checked the same way.
    """
    settings = get_settings()
    profile = get_profile(profile_name, path)
    allowed = _jobqueue_kwargs() if profile.cluster == "slurm" else _local_kwargs()
    cluster_kwargs = dict(profile.cluster_kwargs)
    cluster_kwargs.update(_environment_overrides(profile, settings))
    if overrides:
        where = f"overrides of profile {profile.name!r}"
        cluster_kwargs.update(_to_kwargs(where, overrides, allowed, jobqueue=profile.cluster == "slurm"))
    adapt_kwargs = dict(profile.adapt_kwargs) if profile.adapt_kwargs is not None else None
    if adapt_overrides:
        where = f"adapt overrides of profile {profile.name!r}"
        adapt_kwargs = (adapt_kwargs or {}) | _to_kwargs(where, adapt_overrides, _adapt_kwargs(profile.cluster), False)
    return {"cluster_class": profile.cluster_class, "cluster_kwargs": cluster_kwargs, "adapt_kwargs": adapt_kwargs}


def task_runner(
    profile_name: str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    adapt_overrides: Mapping[str, Any] | None = None,
    path: Path | str | None = None,
) -> DaskTaskRunner:
    """A `DaskTaskRunner` that starts the profile's cluster for each flow run (see `task_runner_kwargs`)."""
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(
        **task_runner_kwargs(profile_name, overrides=overrides, adapt_overrides=adapt_overrides, path=path)
    )


def job_script(profile_name: str, *, overrides: Mapping[str, Any] | None = None, path: Path | str | None = None) -> str:
    """The sbatch script a SLURM profile submits per job (scheduler address left as a placeholder)."""
    kwargs = task_runner_kwargs(profile_name, overrides=overrides, path=path)
    if kwargs["cluster_class"] != CLUSTER_CLASSES["slurm"]:
        raise ProfileError(f"profile {profile_name!r} is not a SLURM profile: it submits no job script")
    job_kwargs = {k: v for k, v in kwargs["cluster_kwargs"].items() if k not in CLUSTER_ONLY_KWARGS}
    return SLURMJob(scheduler="tcp://<scheduler-address>:8786", name="<worker-name>", **job_kwargs).job_script()
