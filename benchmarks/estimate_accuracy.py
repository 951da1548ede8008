"""Accuracy of the default cheap estimate against a converged CI-NEB with the same potential, on bundled pathways.

Run from the repository root: `python -m benchmarks.estimate_accuracy` (resumable: finished pathways are read back
from `--results` and skipped; `--report` only prints). The cheap estimate takes the estimates stage's default path
(flows.estimates.relaxed_pathway_barrier), its functions called directly, without Prefect or a database: the
structure's relaxed, symmetry-distinct vacancies (tasks.vacancies.relax_vacancy, bulk relaxed first) mapped onto the
hop's two endpoints (hop_endpoints), IDPP images between them, `mlip-idpp` single points. The reference is
`mlip-neb` on the very same images: climbing image, fmax 0.05 eV/Å, the same potential, endpoints, supercell and
image count (BFGS, FIRE when BFGS does not converge). Both methods see the same moderate supercell (shortest vector
>= 8 Å, at most 140 atoms), so the comparison is fair; the absolute barriers may differ from those of the stage's
larger default cell.

Figures: a row per pathway, then MAE, max error and Spearman rank correlation over the pathways whose cheap estimate
is `ok` and whose CI-NEB converged, counts per flag, and the upper-bound check estimate >= CI-NEB - 0.02 eV for every
pathway with a converged CI-NEB (a flagged estimate is checked through its raw profile maximum); exit status 1 when
any pathway breaks it (all are printed first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STRUCTURES = ("CaF2", "SrF2", "LiF", "NaF", "MgF2", "KMgF3", "ScF3", "PbClF", "TlF", "KF", "CsF", "KAlF4", "BeF2",
              "Rb2NaAlF6")
"""Bundled entries (by name) of different structure types: fluorite, rocksalt, rutile, cubic and layered perovskite,
ReO3, matlockite, TlF-II, alpha-quartz, elpasolite (the automatic max_hop keeps one hop for most, two for some)."""
RESULTS = Path(__file__).parent / "results" / "estimate_accuracy.jsonl"
MODEL = "chgnet-0.3.0"
NIMAGES = 5
MIN_LENGTH, MIN_ATOMS, MAX_ATOMS = 8.0, 1, 140
"""Supercell bounds of both methods (KMgF3, a = 3.99 Å, needs its 135-atom 3x3x3 cell for 8 Å)."""
BOUNDS = ("min_length", "min_atoms", "max_atoms")
"""Settings a record is not tied to: it records the supercell they chose, and is reused while they choose it."""
NEB_FMAX = 0.05
UPPER_BOUND_TOL = 0.02
"""eV: the cheap estimate may undershoot the CI-NEB barrier by this much before it counts as an exception."""


@dataclass(frozen=True)
class Record:
    """One pathway's comparison, as a line of the results file."""

    structure: str
    formula: str
    hop: int
    length: float
    labels: str
    supercell: str
    atoms: int
    estimate: float | None
    """mlip-idpp barrier (eV), None unless flagged `ok`."""
    estimate_raw: float
    """max(E) - min(E_start, E_end) of the IDPP profile, whatever its flag (eV)."""
    flag: str
    flag_reason: str | None
    neb: float | None
    """CI-NEB barrier max(E) - min(E_start, E_end) of the converged band (eV); None when it did not converge."""
    neb_flag: str
    neb_converged: bool
    neb_steps: int | None
    neb_optimizer: str
    """The optimizer whose band is the reference: the first choice, or the other when the first did not converge."""
    estimate_s: float
    neb_s: float
    vacancy_s: float
    """Seconds of the vacancy relaxations this pathway triggered (0 when its structure's were cached)."""
    settings: dict[str, Any]


def settings(optimizer: str, steps: int) -> dict[str, Any]:
    """What a record was made with; apart from the supercell bounds, a record made otherwise is not reused."""
    return {"model": MODEL, "nimages": NIMAGES, "min_length": MIN_LENGTH, "min_atoms": MIN_ATOMS,
            "max_atoms": MAX_ATOMS, "neb_fmax": NEB_FMAX, "neb_optimizer": optimizer, "neb_steps": steps}


def raw_barrier(energies: tuple[float, ...]) -> float:
    return max(energies) - min(energies[0], energies[-1])


def _compared(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in BOUNDS}


def read_records(path: Path, wanted: dict[str, Any] | None) -> dict[tuple[str, int], Record]:
    """Finished pathways in the results file (those made under `wanted` settings but for the bounds, or all)."""
    records: dict[tuple[str, int], Record] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = Record(**json.loads(line))
                if wanted is None or _compared(record.settings) == _compared(wanted):
                    records[(record.structure, record.hop)] = record
    return records


class VacancyCache:
    """Per structure within one run: its supercell symmetry and the relaxed vacancy of each orbit asked for."""

    def __init__(self) -> None:
        self._symmetry: dict[str, Any] = {}
        self._relaxed: dict[tuple[str, int], Any] = {}

    def symmetry(self, name: str, structure: Any) -> Any:
        from hopflow.tasks.vacancies import VacancySymmetry

        if name not in self._symmetry:
            self._symmetry[name] = VacancySymmetry.of(structure, "F", min_length=MIN_LENGTH, min_atoms=MIN_ATOMS,
                                                      max_atoms=MAX_ATOMS)
        return self._symmetry[name]

    def relaxed(self, name: str, structure: Any, site_index: int) -> tuple[Any, float]:
        """The relaxed vacancy at an orbit's canonical site (the stage's relaxation settings) and the seconds spent."""
        from hopflow.settings import get_settings
        from hopflow.tasks.vacancies import relax_vacancy

        key = (name, site_index)
        if key in self._relaxed:
            return self._relaxed[key], 0.0
        s = get_settings()
        clock = time.perf_counter()
        vacancy = relax_vacancy(structure, self.symmetry(name, structure).supercell, site_index, model=MODEL,
                                device=None, bulk_fmax=s.bulk_fmax, bulk_steps=s.bulk_steps, fmax=s.vacancy_fmax,
                                steps=s.vacancy_steps, optimizer=s.vacancy_optimizer,
                                fill_distance=s.vacancy_fill_distance, max_displacement=s.vacancy_max_displacement)
        self._relaxed[key] = vacancy
        return vacancy, time.perf_counter() - clock


def compare(name: str, structure: Any, pathway: Any, cache: VacancyCache, workdir: Path, optimizer: str,
            steps: int) -> Record:
    """Cheap estimate and CI-NEB of one pathway between the same relaxed endpoints."""
    from pymatgen.core import Structure

    from hopflow.tasks.engines import compute_barrier
    from hopflow.tasks.engines.mlip import idpp_path
    from hopflow.tasks.vacancies import hop_endpoints

    symmetry = cache.symmetry(name, structure)
    a, b = symmetry.hop_sites(pathway.start_frac, pathway.end_frac)
    vacancy, vacancy_s = {}, 0.0
    for site in (a, b):
        vacancy[site], seconds = cache.relaxed(name, structure, symmetry.canonical(site)[0].site_index)
        vacancy_s += seconds
    bulk = Structure.from_dict(vacancy[b].bulk_structure)
    relaxed = {symmetry.canonical(s)[0].site_index: Structure.from_dict(vacancy[s].structure) for s in (a, b)}
    ends = hop_endpoints(symmetry, bulk, pathway.start_frac, pathway.end_frac, relaxed)
    images = idpp_path(ends.start, ends.end, NIMAGES)

    clock = time.perf_counter()
    cheap = compute_barrier("mlip-idpp", images, workdir / "idpp", {"model": MODEL})
    for end, v in (("start", vacancy[b]), ("end", vacancy[a])):  # as relaxed_pathway_barrier flags it
        if v.flag != "ok" and cheap.flag == "ok":
            cheap = cheap.flagged(v.flag, f"{end} vacancy: {v.flag_reason}")
    estimate_s = time.perf_counter() - clock

    clock = time.perf_counter()
    other = "FIRE" if optimizer == "BFGS" else "BFGS"
    for used in (optimizer, other):  # the other optimizer only when the first one stalls
        neb = compute_barrier("mlip-neb", images, workdir / f"neb-{used}",
                              {"model": MODEL, "fmax": NEB_FMAX, "steps": steps, "climb": True, "optimizer": used})
        if neb.converged:
            break
    neb_s = time.perf_counter() - clock
    return Record(
        structure=name, formula=structure.composition.reduced_formula, hop=pathway.rank, length=pathway.length,
        labels=f"{pathway.start_label}→{pathway.end_label}", supercell=symmetry.supercell.key, atoms=len(images[0]),
        estimate=cheap.barrier, estimate_raw=raw_barrier(cheap.energies), flag=cheap.flag,
        flag_reason=cheap.flag_reason, neb=raw_barrier(neb.energies) if neb.converged else None, neb_flag=neb.flag,
        neb_converged=neb.converged, neb_steps=neb.steps,
        neb_optimizer=used, estimate_s=estimate_s, neb_s=neb_s, vacancy_s=vacancy_s,
        settings=settings(optimizer, steps))


def selected_pathways(names: list[str], hops: int) -> list[tuple[str, Any, Any]]:
    """(name, sanitized structure, pathway) for the shortest `hops` hops of each structure, shortest hops first."""
    from hopflow.tasks.pathways import find_pathways
    from hopflow.tasks.structures import bundled_inputs, parse_input, sanitize

    inputs = {raw.location: raw for raw in bundled_inputs()}
    missing = [n for n in names if n not in inputs]
    if missing:
        raise SystemExit(f"not in the bundled set: {', '.join(missing)}")
    chosen = []
    for name in names:
        structure = sanitize(parse_input(inputs[name]), ion="F", max_sites=500).structure
        for pathway in find_pathways(structure, ion="F", max_hop=None, max_paths=5)[:hops]:
            chosen.append((name, structure, pathway))
    return sorted(chosen, key=lambda c: c[2].rank)  # every structure's first hop before any second hop


def report(records: list[Record]) -> int:
    """Print the table and the summary figures; the number of upper-bound exceptions."""
    print(f"\n{'structure':9} {'hop':>3} {'len Å':>6} {'sites':12} {'atoms':>5} {'estimate':>8} {'flag':20} "
          f"{'CI-NEB':>7} {'steps':>9} {'err':>7} {'idpp s':>6} {'neb s':>6}")
    for r in records:
        est = f"{r.estimate:8.3f}" if r.estimate is not None else f"({r.estimate_raw:6.3f})"
        ref = f"{r.neb:7.3f}" if r.neb is not None else "   n.c."
        err = f"{r.estimate - r.neb:+7.3f}" if r.estimate is not None and r.neb is not None else ""
        print(f"{r.structure:9} {r.hop:3d} {r.length:6.3f} {r.labels:12} {r.atoms:5d} {est} {r.flag:20} {ref} "
              f"{f'{r.neb_steps} {r.neb_optimizer}':>9} {err:>7} {r.estimate_s:6.1f} {r.neb_s:6.1f}")
    pairs = [(r.estimate, r.neb) for r in records if r.estimate is not None and r.neb is not None]
    flags: dict[str, int] = {}
    for r in records:
        flags[r.flag] = flags.get(r.flag, 0) + 1
    structures = len({r.structure for r in records})
    print(f"\n{len(records)} pathways from {structures} structures; cheap-estimate flags: "
          + ", ".join(f"{k} {v}" for k, v in sorted(flags.items())))
    if pairs:
        from scipy.stats import spearmanr

        errors = [e - n for e, n in pairs]
        rho = spearmanr([e for e, _ in pairs], [n for _, n in pairs]).statistic if len(pairs) > 2 else float("nan")
        mae, worst = statistics.fmean(abs(x) for x in errors), max(abs(x) for x in errors)
        print(f"ok estimates with a converged CI-NEB: {len(pairs)} · MAE {mae:.3f} eV · max |error| {worst:.3f} eV"
              f" · mean signed error {statistics.fmean(errors):+.3f} eV · Spearman {rho:.2f}")
    flagged = [r for r in records if r.flag != "ok"]
    for r in flagged:
        print(f"  flagged, left out of MAE: {r.structure} hop {r.hop}: {r.flag} ({r.flag_reason})")
    for r in records:
        if not r.neb_converged:
            print(f"  CI-NEB not converged in {r.neb_steps} steps, no reference: {r.structure} hop {r.hop}")
        elif r.neb_flag != "ok":
            print(f"  CI-NEB band flagged {r.neb_flag}: {r.structure} hop {r.hop} (its barrier from the lower end)")
    exceptions = [r for r in records if r.neb is not None and r.estimate_raw < r.neb - UPPER_BOUND_TOL]
    checked = sum(r.neb is not None for r in records)
    print(f"upper bound (estimate >= CI-NEB - {UPPER_BOUND_TOL} eV): {checked - len(exceptions)}/{checked} hold")
    for r in exceptions:
        print(f"  EXCEPTION {r.structure} hop {r.hop}: estimate {r.estimate_raw:.3f} eV ({r.flag}) < CI-NEB "
              f"{r.neb:.3f} eV by {r.neb - r.estimate_raw:.3f} eV")
    return len(exceptions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), help="Bundled entries by name.")
    parser.add_argument("--hops", type=int, default=2, help="Shortest hops per structure.")
    parser.add_argument("--optimizer", choices=("BFGS", "FIRE"), default="BFGS",
                        help="ASE optimizer of the band; the other one runs when it does not converge.")
    parser.add_argument("--steps", type=int, default=400, help="CI-NEB step limit of each optimizer.")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file of finished pathways.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads (on 2 shared cores, 2 threads ran "
                        "one CHGNet call 6x slower than 1: the second thread spins waiting for a busy core).")
    parser.add_argument("--report", action="store_true", help="Only print the figures of the results file.")
    args = parser.parse_args()
    wanted = settings(args.optimizer, args.steps)
    if args.report:
        sys.exit(1 if report(list(read_records(args.results, None).values())) else 0)

    import torch

    from hopflow.errors import InputError
    from hopflow.tasks.engines.potentials import pick_device

    torch.set_num_threads(args.threads)
    print(f"mlip-idpp vs CI-NEB ({MODEL}, {NIMAGES} images, CI-NEB fmax {NEB_FMAX} eV/Å, {args.optimizer}, "
          f"else the other optimizer, ≤ {args.steps} steps each) on device {pick_device(None)}, {args.threads} "
          f"torch thread(s); both in the same supercell: shortest vector ≥ {MIN_LENGTH} Å, "
          f"{MIN_ATOMS}–{MAX_ATOMS} atoms (the stage's default cell is larger)", flush=True)
    todo = selected_pathways(args.structures, args.hops)
    cache = VacancyCache()
    cells = {}
    for name, structure, _ in todo:
        try:
            cells[name] = cache.symmetry(name, structure).supercell.key
        except InputError:  # no supercell within the bounds: its pathways fail below, with this reason
            cells[name] = None
    done = {k: r for k, r in read_records(args.results, wanted).items() if r.supercell == cells.get(k[0])}
    print(f"{len(todo)} pathways, {sum((n, p.rank) in done for n, _, p in todo)} already in {args.results}", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hopflow-accuracy-") as tmp:
        for name, structure, pathway in todo:
            if (name, pathway.rank) in done:
                continue
            clock = time.perf_counter()
            try:
                record = compare(name, structure, pathway, cache, Path(tmp) / f"{name}-{pathway.rank}",
                                 args.optimizer, args.steps)
            except Exception as exc:  # noqa: BLE001  (a pathway that cannot be set up is reported, the rest go on)
                print(f"{name} hop {pathway.rank}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            with args.results.open("a") as fh:
                fh.write(json.dumps(asdict(record)) + "\n")
            done[(name, pathway.rank)] = record
            state = "converged" if record.neb_converged else "NOT converged"
            print(f"{name} hop {pathway.rank} ({record.atoms} atoms): estimate {record.estimate_raw:.3f} eV "
                  f"({record.flag}), CI-NEB {record.neb if record.neb is not None else float('nan'):.3f} eV "
                  f"({state}, {record.neb_steps} {record.neb_optimizer} steps), "
                  f"{time.perf_counter() - clock:.0f} s", flush=True)
    order = {(n, p.rank): i for i, (n, _, p) in enumerate(todo)}
    records = sorted((r for k, r in done.items() if k in order), key=lambda r: order[(r.structure, r.hop)])
    sys.exit(1 if report(records) else 0)


if __name__ == "__main__":
    main()
