"""The stage registry: each stage is a small declarative object; the generic queue does the rest."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Self, get_type_hints

from sqlalchemy import ColumnElement, Select
from sqlalchemy.orm import Session

from hopflow.settings import Settings, get_settings

InputQuery = Callable[[], Select[Any]]
"""A SELECT over the stage's input rows with an `item_id` column and the columns rankers and cutoffs use."""

ScoreFunction = Callable[[Session, Sequence[int]], Mapping[int, float]]
"""A model-score ranker: item ids -> priority key (lower is claimed first)."""


@dataclass(frozen=True)
class StageParams:
    """A stage's parameter set, typed and frozen: what its tasks take. `as_dict()` is what a run stores and hashes
    (everything that changes a result: ion, engine and its version, hop limit ...)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """The parameter set the settings give."""
        raise NotImplementedError(f"{cls.__name__} defines no from_settings")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """Rebuild from a stored parameter set (nested parameter sets too); a key the stage does not have, or a
        missing one, is a ValueError that names it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        missing = sorted(known - set(values))
        if unknown or missing:
            raise ValueError(f"{cls.__name__}: unknown parameter(s) {unknown}, missing {missing}")
        hints = get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            kind = hints[name]
            if isinstance(kind, type) and issubclass(kind, StageParams) and isinstance(value, Mapping):
                value = kind.from_mapping(value)
            kwargs[name] = value
        return cls(**kwargs)

    def as_dict(self) -> dict[str, Any]:
        """The parameter set as stored in `runs.parameters` (JSON-ready)."""
        return asdict(self)


@dataclass(frozen=True)
class NoParams(StageParams):
    """A stage without parameters."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls()


def input_column(name: str) -> Callable[[Session, Any], dict[str, Any]]:
    """A result row's link to its input: the column `name` holds the run's input id."""
    return lambda session, run: {name: run.input_id}


@dataclass(frozen=True)
class Ranker:
    """A named priority function: a SQL expression over the input query's columns, or a Python score function."""

    name: str
    description: str
    expression: Callable[[Any], ColumnElement[float]] | None = None
    score: ScoreFunction | None = None

    def __post_init__(self) -> None:
        if (self.expression is None) == (self.score is None):
            raise ValueError(f"ranker {self.name!r} needs exactly one of expression or score")


@dataclass(frozen=True)
class Cutoff:
    """A typed eligibility criterion on the input query's columns, with an optional bounded broaden step."""

    name: str
    description: str
    default: float
    criterion: Callable[[Any, float], ColumnElement[bool]]
    broaden_step: float | None = None
    broaden_limit: float | None = None
    minimum: float | None = 0.0
    """Smallest value accepted (hopflow's cutoffs are distances and energies); None: any finite value."""


@dataclass(frozen=True)
class Stage:
    """Everything the queue, controller and command line need to know about one stage."""

    name: str
    description: str
    input_table: str
    inputs: InputQuery
    params: type[StageParams]
    """The stage's typed parameter set; its tasks take one."""
    load: Callable[[Session, Sequence[int]], dict[int, Any]]
    store: Callable[[Session, Any, Any], None]
    """Writes a fresh result's rows (the queue copies a reused result's rows itself)."""
    output_table: str | None = None
    output_model: type[Any] | None = None
    """The ORM model of the stage's result rows (each with `run_id`): the queue copies them when it reuses a result."""
    input_columns: Callable[[Session, Any], dict[str, Any]] | None = None
    """A copied row's columns that name the new run's input (`input_column("pathway_id")`)."""
    reuse: Callable[[Session, Any, Any], None] | None = None
    """Instead of copying rows: what reusing `old_run`'s result for `run` writes (import links its source)."""
    fingerprint: Callable[[Any], ColumnElement[str]] | None = None
    rankers: tuple[Ranker, ...] = ()
    default_ranker: str = "id"
    cutoffs: tuple[Cutoff, ...] = ()
    entrypoint: str = ""
    """The stage flow as Prefect names it in prefect.yaml (`flows/pathways.py:pathways`); the deployment follows."""
    resources: str = "local"
    batch_size: int = 10
    retry_limit: int | None = None
    """Attempts a run gets; None: `HOPFLOW_RETRY_LIMIT`."""
    lease_seconds: float | None = None
    """Lease of a claim before sweep may requeue it; None: `HOPFLOW_LEASE_SECONDS`."""
    time_limit_seconds: float | None = None
    """Longest one item may run (in a child process killed when it passes it); None: no limit, items run in the Dask
    worker itself. `HOPFLOW_TIME_LIMITS` wins."""
    warm_modules: tuple[str, ...] = ()
    """Libraries its items import lazily that a batch command's workers (or their item processes) import while it
    starts up: the ML potential's torch and model package (~1.5 core-s per process), so that no item pays for them."""
    default_target: int = 0
    min_chunk_items: int = 1
    """Fewest items one Dask task of a stage flow carries: each task costs about 0.12 core-s of Prefect and Dask work
    (its context serialised and rebuilt, its task run and states on the server), so a stage whose items take less
    than a few core-seconds packs several into one."""
    producer: Callable[[Session, int], Any] | None = None
    """The run that stored an input row (provenance walking: `hopflow trace`)."""
    engine_choice: Callable[..., dict[str, Any]] | None = None
    """A barrier stage's parameters for an engine (and ML model) named on the command line."""

    def __post_init__(self) -> None:
        if self.reuse is None and (self.output_model is None or self.input_columns is None):
            raise ValueError(f"stage {self.name!r} needs output_model and input_columns, or its own reuse")
        if self.min_chunk_items < 1:
            raise ValueError(f"stage {self.name!r}: min_chunk_items must be at least 1, got {self.min_chunk_items}")

    def parameters(self, settings: Settings) -> dict[str, Any]:
        """The stage's parameter set under the settings, as stored."""
        return self.params.from_settings(settings).as_dict()

    @property
    def flow_name(self) -> str:
        """The flow's Prefect name: its function's name with dashes (Prefect's own default)."""
        return self.entrypoint.rpartition(":")[2].replace("_", "-")

    @property
    def deployment(self) -> str:
        """The deployment the controller submits to: named after its flow (`pathways/pathways`)."""
        return f"{self.flow_name}/{self.flow_name}"

    @property
    def flow_module(self) -> str:
        """The installed module of the stage flow (`flows/pathways.py` -> `hopflow.flows.pathways`)."""
        path = self.entrypoint.partition(":")[0].removesuffix(".py")
        return "hopflow." + path.replace("/", ".")

    @property
    def attempts_allowed(self) -> int:
        """The stage's retry limit, else the setting's."""
        return self.retry_limit if self.retry_limit is not None else get_settings().retry_limit

    @property
    def lease(self) -> float:
        """The stage's lease in seconds: `HOPFLOW_LEASES`' for it, else its own, else `HOPFLOW_LEASE_SECONDS`."""
        settings = get_settings()
        if self.name in settings.leases:
            return settings.leases[self.name]
        return self.lease_seconds if self.lease_seconds is not None else settings.lease_seconds

    @property
    def time_limit(self) -> float | None:
        """The per-item time limit in seconds (`HOPFLOW_TIME_LIMITS`' for the stage, else its own); None: no limit."""
        limit = get_settings().time_limits.get(self.name, self.time_limit_seconds)
        return limit or None

    def ranker(self, name: str | None) -> Ranker:
        name = name or self.default_ranker
        for ranker in self.rankers:
            if ranker.name == name:
                return ranker
        raise KeyError(f"stage {self.name!r} has no ranker {name!r} (known: {', '.join(r.name for r in self.rankers)})")

    def cutoff(self, name: str) -> Cutoff:
        for cutoff in self.cutoffs:
            if cutoff.name == name:
                return cutoff
        known = ", ".join(c.name for c in self.cutoffs) or "none"
        raise KeyError(f"stage {self.name!r} has no cutoff {name!r} (known: {known})")


STAGES: dict[str, Stage] = {}


def register(stage: Stage, *, replace: bool = False) -> Stage:
    """Add a stage to the registry (a stage's name is its identity in the run table)."""
    if not replace and stage.name in STAGES and STAGES[stage.name] is not stage:
        raise ValueError(f"stage {stage.name!r} is already registered")
    STAGES[stage.name] = stage
    return stage


def get_stage(name: str) -> Stage:
    """The registered stage called `name`, or a KeyError that lists the known ones."""
    import hopflow.stages  # noqa: F401  (registers the built-in stages)

    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r} (known: {', '.join(STAGES)})") from None
