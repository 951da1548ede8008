"""Export and import of a provenance closure at scale: a synthetic closure graph (structures → pathways → features →
vacancies → estimates, synthetic values on the real schemas, inserted in bulk) in SQLite, exported by a `--formula`
selection (five of its six formulas: about 100,000 runs) and imported into a fresh PostgreSQL database.

Run from the repository root: `python -m benchmarks.archive [--structures 10080] [--postgres URL]` (the URL defaults to
HOPFLOW_TEST_POSTGRES_URL, which `scripts/services.sh env` prints). Each direction runs in a child process of its own;
its wall time and its peak resident memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which includes the
interpreter and the imported libraries: the child's baseline before the work is printed beside it) are reported.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

FORMULAS = (("CaF2", 225, "fluorite"), ("SrF2", 225, "fluorite"), ("BaF2", 225, "fluorite"),
            ("PbF2", 225, "fluorite"), ("LiF", 225, "rocksalt"), ("NaF", 225, "rocksalt"))
SELECTED = ("CaF2", "SrF2", "BaF2", "PbF2", "LiF")
"""The export's --formula selection: five of the six formulas."""
PATHWAYS_PER_STRUCTURE = 4
SITES_PER_STRUCTURE = 2
BATCH_STRUCTURES = 500
"""Structures whose rows are inserted together while the graph is built."""


def _cell(formula: str, kind: str, scale: float) -> dict[str, Any]:
    from pymatgen.core import Lattice, Structure

    cation = formula.rstrip("F2").rstrip("F")
    a = 5.46 * scale if kind == "fluorite" else 4.03 * scale
    if kind == "fluorite":
        s = Structure(Lattice.cubic(a), [cation, "F", "F"], [[0, 0, 0], [0.25, 0.25, 0.25], [0.75, 0.75, 0.75]])
    else:
        s = Structure(Lattice.cubic(a), [cation, "F"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return s.as_dict()


def _digest(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:40]


def build(url: str, n_structures: int) -> dict[str, int]:
    """Insert the synthetic closure graph with explicit ids, table by table in bulk; returns rows per table."""
    from sqlalchemy import insert

    from hopflow import queue
    from hopflow.db import init_db, make_engine, session_scope, utcnow
    from hopflow.models import Estimate, Features, Pathway, Run, Source, Structure, Vacancy, VacancySite
    from hopflow.provenance import versions
    from hopflow.registry import get_stage

    engine = init_db(make_engine(url))
    params = {name: queue.stage_parameters(get_stage(name))
              for name in ("import", "pathways", "features", "vacancies", "estimates")}
    phash = {name: queue.param_hash(p) for name, p in params.items()}
    now, vers = utcnow(), versions()
    counts: dict[str, int] = {}
    ids = {"run": 0, "pathway": 0, "site": 0, "vacancy": 0, "features": 0, "estimate": 0}

    def run(stage: str, input_id: int, fingerprint: str) -> dict[str, Any]:
        ids["run"] += 1
        return {"id": ids["run"], "stage": stage, "input_id": input_id, "param_hash": phash[stage],
                "parameters": params[stage], "state": "done", "attempts": 1, "max_attempts": 3,
                "cache_key": queue.cache_key(stage, fingerprint, phash[stage]), "versions": vers,
                "host": "node-7", "flow_run_id": str(uuid.uuid4()), "claimed_at": now, "started_at": now,
                "finished_at": now, "history": [], "ranker": "id", "claimant": "node-7:1234"}

    tables: dict[str, list[dict[str, Any]]] = {}

    def flush() -> None:
        with session_scope(engine, write=True) as session:  # parents before children (foreign keys)
            for model in (Run, Source, Structure, Pathway, Features, VacancySite, Vacancy, Estimate):
                rows = tables.get(model.__tablename__, [])
                if rows:
                    session.execute(insert(model.__table__), rows)
                    counts[model.__tablename__] = counts.get(model.__tablename__, 0) + len(rows)
                    tables[model.__tablename__] = []

    def add(name: str, row: dict[str, Any]) -> None:
        tables.setdefault(name, []).append(row)

    cells = {}
    for sid in range(1, n_structures + 1):
        formula, number, kind = FORMULAS[sid % len(FORMULAS)]
        serial = sid // len(FORMULAS)
        key = (formula, serial % 50)
        if key not in cells:
            cells[key] = _cell(formula, kind, 1.0 + 0.001 * (serial % 50))
        cell = cells[key]
        fp = f"{formula}|{number}|{10.0 + 0.1 * serial:.1f}"
        source_key = _digest("source", sid)
        imp = run("import", sid, source_key)
        add("runs", imp)
        add("sources", {"id": sid, "kind": "file", "key": source_key, "location": f"/data/cif/{formula}-{sid}.cif",
                        "format": "cif", "payload": f"data_{formula}_{sid}", "meta": {"sha256": source_key},
                        "structure_id": None})
        add("structures", {"id": sid, "formula": formula, "chemsys": "-".join(sorted({formula[:2].rstrip('F'), "F"})),
                           "spacegroup": "Fm-3m", "spacegroup_number": number, "nsites": len(cell["sites"]),
                           "density": 3.18, "volume": 40.0 + 0.01 * serial, "oxidation_states": {"F": -1.0},
                           "oxidation_method": "bond-valence", "fingerprint": fp, "structure": cell,
                           "run_id": imp["id"], "energy_above_hull": 0.0})
        path_run = run("pathways", sid, fp)
        add("runs", path_run)
        site_ids = []
        for k in range(SITES_PER_STRUCTURE):
            ids["site"] += 1
            site_fp = _digest("site", fp, k)
            add("vacancy_sites", {"id": ids["site"], "structure_id": sid, "supercell": "[[2,0,0],[0,2,0],[0,0,2]]",
                                  "site_index": k, "site_label": "F 8c", "orbit_size": 32, "nsites": 96,
                                  "fingerprint": site_fp})
            vac_run = run("vacancies", ids["site"], site_fp)
            add("runs", vac_run)
            ids["vacancy"] += 1
            site_ids.append(ids["vacancy"])
            add("vacancies", {"id": ids["vacancy"], "run_id": vac_run["id"], "site_id": ids["site"],
                              "structure_id": sid, "model": "chgnet-0.3.0", "energy": -400.0 - 0.01 * sid,
                              "max_force": 0.04, "converged": True, "steps": 40, "structure": cell,
                              "bulk_structure": cell, "bulk_energy": -404.0, "bulk_converged": True,
                              "max_displacement": 0.3, "fill_distance": 2.2, "flag": "ok", "flag_reason": None,
                              "settings": {"fmax": 0.05, "steps": 300}, "versions": {"chgnet": "0.4.2"},
                              "relax_s": 12.5})
        for rank in range(PATHWAYS_PER_STRUCTURE):
            ids["pathway"] += 1
            pid, pfp = ids["pathway"], _digest("pathway", fp, rank)
            start, end = [0.25, 0.25, 0.25], [0.75, 0.25, 0.25 + 0.1 * rank]
            add("pathways", {"id": pid, "run_id": path_run["id"], "structure_id": sid, "ion": "F", "rank": rank,
                             "length": 2.7 + 0.4 * rank, "start_index": 1, "end_index": 2, "end_image": [0, 0, 0],
                             "start_frac": start, "end_frac": end, "start_cart": start, "end_cart": end,
                             "start_label": "F 8c", "end_label": "F 8c", "multiplicity": 6.0, "dimensionality": 3,
                             "dimensionality_cumlengths": 3, "max_hop": 4.0, "max_hop_automatic": True,
                             "hops_found": PATHWAYS_PER_STRUCTURE, "fingerprint": pfp})
            feat_run = run("features", pid, pfp)
            add("runs", feat_run)
            ids["features"] += 1
            add("features", {"id": ids["features"], "run_id": feat_run["id"], "pathway_id": pid, "ion": "F",
                             "ion_oxidation_state": -1.0, "oxidation_states": {"F": -1.0, "Ca": 2.0},
                             "radii": {"F": 1.19, "Ca": 1.14}, "radii_description": "Shannon crystal radii, CN VI",
                             "ion_fraction": 0.667, "nsites": 3, "nsites_supercell": 96, "length": 2.7 + 0.4 * rank,
                             "min_cation_anion_distance": 2.36, "length_vs_dmin": 1.16, "dimensionality": 3,
                             "dimensionality_cumlengths": 3, "nimages": 5,
                             **{f"overlap_{kind}_{part}": 0.1 * rank for kind in ("cation", "anion", "neutral")
                                for part in ("start", "midpoint", "max")},
                             "overlap_cation_max_change": 0.05 * rank, "overlap_anion_max_change": 0.02,
                             "overlap_neutral_max_change": 0.01, "ewald_energy_start": -30.0,
                             "ewald_energy_midpoint": -29.5, "ewald_energy_max": -29.4, "ewald_energy_change": 0.6})
            est_run = run("estimates", pid, pfp)
            add("runs", est_run)
            ids["estimate"] += 1
            energies = [-400.0, -399.8, -399.6 + 0.01 * rank, -399.8, -400.0]
            add("estimates", {"id": ids["estimate"], "run_id": est_run["id"], "pathway_id": pid, "engine": "mlip-idpp",
                              "engine_version": "chgnet-0.3.0", "barrier": 0.4 + 0.01 * rank,
                              "forward_barrier": 0.4 + 0.01 * rank, "reverse_barrier": 0.4 + 0.01 * rank,
                              "flag": "ok", "flag_reason": None, "model": "chgnet-0.3.0",
                              "start_vacancy_id": site_ids[0], "end_vacancy_id": site_ids[-1], "converged": True,
                              "energies": energies, "relative_energies": [e + 400.0 for e in energies],
                              "reaction_coordinate": [0.0, 0.7, 1.4, 2.1, 2.8], "max_forces": [0.01] * 5,
                              "n_images": 3, "moving_index": 1, "steps": None, "vacancy_mode": "neutral",
                              "charge": 0, "timings": {"total_s": 4.2}, "settings": {"nimages": 3},
                              "corrections": [], "continued": False, "versions": {"chgnet": "0.4.2"},
                              "workdir": None})
        if sid % BATCH_STRUCTURES == 0:
            flush()
    flush()
    from sqlalchemy import text

    with session_scope(engine, write=True) as session:  # every source points at its structure, as import leaves it
        session.execute(text("UPDATE sources SET structure_id = id"))
    engine.dispose()
    return counts


def _measure(direction: str, url: str, archive: str, out: Any) -> None:
    """One direction in this (child) process: wall time, peak RSS, and the child's RSS before the work."""
    os.environ["HOPFLOW_DATABASE_URL"] = url
    import pymatgen.analysis.structure_matcher  # noqa: F401  (what an import loads, counted in the baseline)

    from hopflow.archive import Selection, export_closure, import_archive
    from hopflow.db import make_engine

    engine = make_engine(url)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if direction == "export":
        report = export_closure(Selection(formulas=SELECTED), archive, engine=engine)
        detail = {"rows": report.rows, "bytes": report.bytes}
    else:
        report = import_archive(archive, engine=engine)
        detail = {"added": report.added}
    wall = time.perf_counter() - start
    out.put({"wall_s": wall, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "baseline_mb": baseline, **detail})
    engine.dispose()


def measure(direction: str, url: str, archive: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_measure, args=(direction, url, archive, out))
    child.start()
    result = out.get()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--structures", type=int, default=10080, help="Structures of the synthetic graph (12 runs "
                        "each; 5/6 of them selected).")
    parser.add_argument("--postgres", default=os.environ.get("HOPFLOW_TEST_POSTGRES_URL"),
                        help="PostgreSQL server URL (a fresh database is created on it and dropped after).")
    args = parser.parse_args()
    if not args.postgres:
        raise SystemExit("no PostgreSQL: pass --postgres URL or set HOPFLOW_TEST_POSTGRES_URL")
    from sqlalchemy import func, select, table, text

    from hopflow.db import init_db, make_engine

    work = Path(tempfile.mkdtemp(prefix="hopflow-bench-archive-"))
    source = f"sqlite:///{work / 'source.sqlite'}"
    t0 = time.perf_counter()
    counts = build(source, args.structures)
    print(f"built in {time.perf_counter() - t0:.1f} s: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    archive = str(work / "closure.hopflow.zip")
    exported = measure("export", source, archive)
    runs = sum(v for k, v in exported["rows"].items() if k.startswith("runs."))
    print(f"export --formula {' --formula '.join(SELECTED)}: {runs:,} runs, {sum(exported['rows'].values()):,} rows, "
          f"{exported['bytes'] / 1e6:.1f} MB in {exported['wall_s']:.1f} s, peak RSS {exported['peak_mb']:.0f} MB "
          f"(baseline {exported['baseline_mb']:.0f} MB)")
    name = f"bench_archive_{uuid.uuid4().hex[:8]}"
    admin = make_engine(args.postgres).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = args.postgres.rsplit("/", 1)[0] + "/" + name
    try:
        init_db(make_engine(url)).dispose()
        imported = measure("import", url, archive)
        print(f"import-archive into a fresh PostgreSQL: {imported['added']:,} rows in {imported['wall_s']:.1f} s, "
              f"peak RSS {imported['peak_mb']:.0f} MB (baseline {imported['baseline_mb']:.0f} MB)")
        engine = make_engine(url)
        with engine.connect() as conn:
            stored = conn.scalar(select(func.count()).select_from(table("runs")))
        engine.dispose()
        assert stored == runs, (stored, runs)
        again = measure("import", url, archive)
        print(f"the same archive again: {again['added']} rows added in {again['wall_s']:.1f} s, "
              f"peak RSS {again['peak_mb']:.0f} MB")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    shutil.rmtree(work, ignore_errors=True)
    for goal, value in (("export", exported), ("import", imported)):
        met = value["wall_s"] <= 60 and value["peak_mb"] <= 500
        print(f"{goal}: {value['wall_s']:.1f} s, {value['peak_mb']:.0f} MB -> goal (≤ 60 s, ≤ 500 MB) "
              f"{'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
