"""Commands about stages and their queues: run (batch mode), queue head, rank, cutoff, trace."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from hopflow import queue
from hopflow.cli.render import console, emit_json, err_console, table
from hopflow.db import init_db, session_scope
from hopflow.errors import InvalidValueError
from hopflow.provenance import trace_chain
from hopflow.registry import STAGES, get_stage
from hopflow.validation import bounded_int, check_parameters, finite_float, row_id

StageArg = Annotated[str, typer.Argument(help="Stage name (hopflow status lists them).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", help="Show Prefect's logs on the terminal too.")]


def _stage(name: str) -> Any:
    try:
        return get_stage(name)
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0])) from None


def _ranker(stage: Any, name: str | None) -> Any:
    try:
        return stage.ranker(name)
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0]), param_hint="'--ranker'") from None


def parameter_overrides(stage: Any, given: dict[str, Any], engine: str | None = None,
                        model: str | None = None) -> dict[str, Any]:
    """Command-line values as the stage's parameter overrides; a parameter the stage does not have is refused.

    `engine` and `model` (the ML potential; alone it keeps the stage's engine) go through the stage's
    `engine_parameters`, which puts the model into the engine settings."""
    overrides: dict[str, Any] = {}
    known = queue.stage_parameters(stage)
    if engine is not None or model is not None:
        if "engine" not in known:
            raise typer.BadParameter(f"stage {stage.name!r} runs no barrier engine (--engine, --model)")
        engine_parameters = stage.engine_choice
        if engine_parameters is None and model is not None:
            raise typer.BadParameter(f"stage {stage.name!r} takes no --model")
        try:
            if engine_parameters is None:
                overrides["engine"] = engine
            elif model is None:
                overrides.update(engine_parameters(engine))
            else:
                overrides.update(engine_parameters(engine or known["engine"], model))
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    overrides.update({k: v for k, v in given.items() if v is not None})
    try:
        check_parameters(overrides)
    except InvalidValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise typer.BadParameter(f"stage {stage.name!r} has no parameter {', '.join(unknown)} (it has: "
                                 f"{', '.join(sorted(known))})")
    return overrides


def run(
    stage: StageArg,
    engine: Annotated[str | None, typer.Option(help="Barrier engine (barrier stages), e.g. mlip-neb.")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="ML potential of the barrier engine (chgnet-0.3.0 or 7net-0; default HOPFLOW_BARRIER_MODEL)."
        ),
    ] = None,
    top: Annotated[
        int | None, typer.Option("--top", callback=bounded_int(ge=0), help="Claim at most N items, in rank order.")
    ] = None,
    ion: Annotated[str | None, typer.Option(help="Migrating ion (stages with an ion parameter).")] = None,
    max_hop: Annotated[
        float | None, typer.Option(callback=finite_float(gt=0), help="Largest hop length in Å (pathways).")
    ] = None,
    max_paths: Annotated[
        int | None, typer.Option(callback=bounded_int(ge=1), help="Most hops kept per structure (pathways).")
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Run a stage now on every eligible item (or its top N), on the stage's Dask cluster profile (no server needed)."""
    from hopflow.cli.progress import batch_progress, prefect_logs_to_file
    from hopflow.flows.batch import run_batch
    from hopflow.flows.common import batch_clusters

    st = _stage(stage)
    overrides = parameter_overrides(st, {"ion": ion, "max_hop": max_hop, "max_paths": max_paths}, engine, model)
    init_db()
    with prefect_logs_to_file(f"run-{stage}", verbose) as log:
        console.print(f"Prefect logs: {escape(str(log))}", soft_wrap=True)
        with batch_progress(console), batch_clusters([stage]):
            report = run_batch(stage, overrides or None, limit=top)
    console.print(report.summary)
    if report.failed:
        for run_id, error in sorted(report.failed.items()):
            console.print(f"[red]run {run_id}[/red]: {escape(error)}", soft_wrap=True)
        err_console.print(f"[red]error[/red] {stage}: {len(report.failed)} items failed", soft_wrap=True)
        raise typer.Exit(1)


def queue_(
    stage: StageArg,
    n: Annotated[int, typer.Option("-n", callback=bounded_int(ge=0), help="How many.")] = 20,
    ranker: Annotated[str | None, typer.Option(help="Ranker (default: the active one).")] = None,
    as_json: JsonOption = False,
) -> None:
    """The head of a stage's queue: what would be claimed next, with scores."""
    st = _stage(stage)
    if ranker is not None:
        _ranker(st, ranker)
    init_db()
    with session_scope(write=True) as session:
        queue.enqueue(session, st)
        name = ranker or queue.active_ranker(session, st)
        rows = [{"run_id": r, "input_id": i, "score": s} for r, i, s in queue.queue_head(session, st, n, ranker=name)]
        cutoffs = queue.cutoff_values(session, st)
    if as_json:
        emit_json({"stage": stage, "ranker": name, "cutoffs": cutoffs, "head": rows})
    else:
        table(f"{stage} queue (ranker {name}, cutoffs {cutoffs or 'none'})", rows)


def rank(
    stage: StageArg,
    ranker: Annotated[str, typer.Option(help="Ranker to (re)compute.")],
    activate: Annotated[bool, typer.Option(help="Also make it the ranker claims use.")] = False,
) -> None:
    """Recompute a ranker's scores for every input item of a stage (and optionally switch claims to it)."""
    st = _stage(stage)
    _ranker(st, ranker)
    init_db()
    with session_scope(write=True) as session:
        queue.enqueue(session, st)
        count = queue.rank(session, st, ranker)
        if activate:
            queue.set_active_ranker(session, st, ranker, reason="hopflow rank --activate")
    console.print(f"{stage}: {count} items scored by {ranker}" + (" (now active)" if activate else ""))


def cutoff(
    stage: StageArg,
    name: Annotated[str, typer.Argument(help="Cutoff name.")],
    value: Annotated[
        float, typer.Argument(callback=finite_float(), help="New value (put `--` before a negative one).")
    ],
    reason: Annotated[str, typer.Option(help="Why: recorded with the change.")] = "set with hopflow cutoff",
) -> None:
    """Change a stage's cutoff (eligibility criterion); the history is kept."""
    st = _stage(stage)
    try:
        st.cutoff(name)
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0])) from None
    init_db()
    with session_scope(write=True) as session:
        queue.set_cutoff(session, st, name, value, reason)
    console.print(f"{stage}: cutoff {name} = {value}")


def trace(
    run_id: Annotated[int, typer.Argument(callback=row_id(), help="A run id (every result row names its run).")],
    as_json: JsonOption = False,
) -> None:
    """Walk a result back through its runs and inputs to its source (file, bundled entry or MP id)."""
    init_db()
    with session_scope() as session:
        try:
            chain = trace_chain(session, run_id)
        except LookupError as exc:
            raise typer.BadParameter(str(exc.args[0])) from None
    if as_json:
        emit_json(chain)
    else:
        for depth, link in enumerate(chain):
            console.print(
                "  " * depth + " ".join(f"[bold]{k}[/bold]={escape(str(v))}" for k, v in link.items() if v is not None)
            )


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command(name="queue")(queue_)
    app.command()(rank)
    app.command()(cutoff)
    app.command()(trace)


__all__ = ["STAGES", "register"]
