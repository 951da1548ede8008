"""Fuzzed import: 200 seeded mutations of valid CIF/POSCAR/JSON files in one `hopflow import DIR` batch; every file
is stored or refused with a reason naming it, nothing crashes, and the structures stored before are unchanged."""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter
from pymatgen.io.vasp import Poscar
from sqlalchemy import select
from typer.testing import CliRunner

from hopflow import queue
from hopflow.cli.main import app
from hopflow.db import session_scope
from hopflow.models import Run, RunState, Source
from hopflow.models import Structure as StructureRow
from hopflow.registry import get_stage
from hopflow.settings import get_settings
from hopflow.tasks.structures import bundled_inputs, file_inputs, parse_input

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SEED = 20261203
MUTATIONS = 200
BASES = ("CaF2", "LiF", "MgF2", "ScF3", "KMgF3")  # small bundled cells (4-12 sites): the batch stays quick
MAX_SITES = 64  # HOPFLOW_MAX_SITES for the batch: a mutated count cannot make a slow large cell
BATCH_LIMIT_S = 300.0  # the acceptance bound on the whole command
NUMBER = re.compile(r"-?\d+\.\d+|-?\d+")
runner = CliRunner()


@cache
def _base_texts() -> dict[str, tuple[str, str]]:
    """name -> (file suffix or prefix kind, text) for each base structure in each format."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structures: dict[str, Structure] = {r.location: parse_input(r) for r in bundled_inputs() if r.location in BASES}
    out = {}
    for name, s in structures.items():
        out[f"{name}.cif"] = ("cif", str(CifWriter(s)))
        out[f"POSCAR_{name}"] = ("poscar", Poscar(s).get_str())
        out[f"{name}.json"] = ("json", json.dumps(s.as_dict()))
    return out


def _flip_bytes(rng: random.Random, data: bytes, kind: str) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


def _cut_lines(rng: random.Random, data: bytes, kind: str) -> bytes:
    lines = _lines(data)
    start = rng.randrange(len(lines))
    del lines[start:start + rng.randint(1, 5)]
    return b"\n".join(lines)


def _truncate(rng: random.Random, data: bytes, kind: str) -> bytes:
    return data[: rng.randrange(len(data))]


def _duplicate_lines(rng: random.Random, data: bytes, kind: str) -> bytes:
    lines = _lines(data)
    start = rng.randrange(len(lines))
    block = lines[start:start + rng.randint(1, 4)]
    return b"\n".join(lines[:start] + block * rng.randint(2, 4) + lines[start:])


def _swap_lines(rng: random.Random, data: bytes, kind: str) -> bytes:
    lines = _lines(data)
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines)


def _odd_number(rng: random.Random, number: str) -> str:
    value = float(number)
    return rng.choice([f"{-value}", "0", "1000000000", "nan", "inf", f"{value * 1000}", f"{value + rng.randint(1, 9)}"])


def _change_numbers(rng: random.Random, data: bytes, kind: str) -> bytes:
    text = data.decode()
    matches = list(NUMBER.finditer(text))
    for m in sorted(rng.sample(matches, min(len(matches), rng.randint(1, 3))), key=lambda m: -m.start()):
        text = text[: m.start()] + _odd_number(rng, m.group()) + text[m.end():]
    return text.encode()


def _change_counts(rng: random.Random, data: bytes, kind: str) -> bytes:
    """The atom counts: the POSCAR count line, the JSON site list, the CIF atom rows."""
    if kind == "poscar":
        lines = data.decode().split("\n")
        counts = [int(c) for c in lines[6].split()]
        i = rng.randrange(len(counts))
        counts[i] = rng.choice([0, counts[i] - 1, counts[i] + 1, 2 * counts[i], 10**9, -counts[i]])
        lines[6] = " ".join(map(str, counts))
        return "\n".join(lines).encode()
    if kind == "json":
        doc = json.loads(data)
        sites = doc["sites"]
        doc["sites"] = rng.choice([sites[:-1], sites + sites[:1], sites[: rng.randrange(len(sites))], sites * 3])
        return json.dumps(doc).encode()
    lines = data.decode().split("\n")
    rows = [i for i, line in enumerate(lines) if len(line.split()) >= 6 and NUMBER.match(line.split()[-1])]
    i = rng.choice(rows)
    lines[i:i + 1] = rng.choice([[], [lines[i]] * 2, [lines[i]] * 5])
    return "\n".join(lines).encode()


OPERATORS: dict[str, Callable[[random.Random, bytes, str], bytes]] = {
    "flip": _flip_bytes, "cut": _cut_lines, "trunc": _truncate, "dup": _duplicate_lines, "swap": _swap_lines,
    "numbers": _change_numbers, "counts": _change_counts,
}


def write_mutations(folder: Path, seed: int = SEED, n: int = MUTATIONS) -> list[Path]:
    """`n` mutated files (deterministic for a seed), named by number, operator and base."""
    rng = random.Random(seed)
    bases = _base_texts()
    names = sorted(bases)
    paths = []
    for i in range(n):
        base = rng.choice(names)
        kind, text = bases[base]
        op = rng.choice(sorted(OPERATORS))
        data = OPERATORS[op](rng, text.encode(), kind)
        stem = base.removeprefix("POSCAR_").rsplit(".", 1)[0]
        name = f"POSCAR_{i:03d}_{op}_{stem}" if kind == "poscar" else f"{i:03d}_{op}_{base}"
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def _structure_row_hashes() -> list[str]:
    """One hash per stored structure row, every column, in id order."""
    with session_scope() as session:
        rows = session.scalars(select(StructureRow).order_by(StructureRow.id)).all()
        cols = [c.name for c in StructureRow.__table__.columns]
        return [hashlib.sha256(json.dumps([getattr(r, c) for c in cols], sort_keys=True, default=str).encode())
                .hexdigest() for r in rows]


def test_mutations_are_deterministic(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = [p.read_bytes() for p in write_mutations(tmp_path / "a", n=40)]
    assert first == [p.read_bytes() for p in write_mutations(tmp_path / "b", n=40)]
    assert len(set(first)) > 30  # mutations, not copies


@pytest.mark.slow
def test_two_hundred_mutated_files_in_one_batch_are_each_stored_or_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOPFLOW_MAX_SITES", str(MAX_SITES))
    get_settings.cache_clear()
    good = tmp_path / "good"
    good.mkdir()
    for name, (kind, text) in _base_texts().items():
        if kind == "cif":
            (good / name).write_text(text)
    first = runner.invoke(app, ["import", str(good)])
    assert first.exit_code == 0, first.output
    stored_before = _structure_row_hashes()
    assert len(stored_before) == len(BASES)

    fuzz = tmp_path / "fuzz"
    fuzz.mkdir()
    paths = write_mutations(fuzz)
    started = time.monotonic()
    result = runner.invoke(app, ["import", str(fuzz)])
    elapsed = time.monotonic() - started
    assert elapsed < BATCH_LIMIT_S
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert result.exit_code == 1  # some files failed, and the exit code says so

    errors = [line for line in result.output.splitlines() if line.startswith("error ")]
    phash = queue.param_hash(queue.stage_parameters(get_stage("import")))
    stored = refused = 0
    with session_scope() as session:
        for path in paths:
            (raw,) = file_inputs([path])
            source = session.scalar(select(Source).where(Source.kind == "file", Source.key == raw.key))
            assert source is not None, path
            run = session.scalar(select(Run).where(Run.stage == "import", Run.input_id == source.id,
                                                   Run.param_hash == phash))
            assert run is not None and run.state in (RunState.DONE, RunState.FAILED), (path, run)
            if run.state == RunState.DONE:
                assert source.structure_id is not None, path
                stored += 1
            else:
                # refused for good, with a one-line reason that names this file in the report
                assert run.error and "\n" not in run.error and run.attempts == run.max_attempts, (path, run.error)
                assert sum(line.startswith(f"error {path}: ") for line in errors) == 1, (path, errors[:5])
                refused += 1
    assert stored + refused == MUTATIONS
    assert stored >= 10 and refused >= 100, (stored, refused)  # the mutations exercise both ends
    assert len(errors) == refused
    assert f"{MUTATIONS} inputs:" in result.output and f"{refused} failed" in result.output
    assert _structure_row_hashes()[: len(stored_before)] == stored_before  # mutants that parse only add rows
