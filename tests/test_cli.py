"""The command line end to end on the default SQLite file: init, import (bundled, files), structures, status."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import crystals
from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

from hopflow.cli.main import app

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_init_is_idempotent() -> None:
    assert invoke("init")[0] == 0
    code, out = invoke("init")
    assert code == 0 and "database ready" in out


def test_import_bundled_lists_every_structure_once(tmp_path) -> None:
    assert invoke("init")[0] == 0
    code, out = invoke("import", "bundled")
    assert code == 0, out
    code, out = invoke("structures", "--json")
    rows = json.loads(out)
    assert len(rows) >= 20
    for row in rows:
        assert row["formula"] and row["spacegroup"] and row["nsites"] > 0
        assert row["oxidation_states"], row  # every bundled crystal is charge balanced by bond valence
        assert row["sources"] and row["sources"][0].startswith("bundled:")
    caf2 = next(r for r in rows if r["formula"] == "CaF2")
    assert caf2["spacegroup_number"] == 225 and caf2["nsites"] == 3
    assert caf2["oxidation_states"] == {"Ca": 2.0, "F": -1.0}

    code, out = invoke("import", "bundled")  # the same set again adds nothing
    assert code == 0 and "0 new structures" in out
    assert len(json.loads(invoke("structures", "--json")[1])) == len(rows)

    code, out = invoke("status", "--json")
    status = json.loads(out)
    assert status["tables"]["structures"] == len(rows)
    assert status["runs"]["import"]["done"] == len(rows)


def test_folder_of_five_valid_and_five_broken_files(tmp_path) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    caf2 = crystals.caf2()
    lif = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.0173), ["Li", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    mgf2 = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.6213, 3.0519), ["Mg", "F"],
                                     [[0, 0, 0], [0.3028, 0.3028, 0]])
    caf2.to(filename=str(folder / "caf2.cif"))
    lif.to(filename=str(folder / "POSCAR_LiF"), fmt="poscar")
    mgf2.to(filename=str(folder / "mgf2.json"))
    caf2.copy().make_supercell([2, 1, 1]).to(filename=str(folder / "caf2_supercell.cif"))  # a duplicate of caf2
    shutil.copy(folder / "caf2.cif", folder / "caf2_copy.cif")
    (folder / "caf2_copy.cif").write_text((folder / "caf2.cif").read_text() + "\n# same crystal, other bytes\n")
    (folder / "empty.cif").write_text("")
    (folder / "garbage.cif").write_bytes(b"\x00\x01not a crystal at all\xff" * 10)
    (folder / "truncated.cif").write_text((folder / "caf2.cif").read_text()[:200])
    (folder / "nacl.cif").write_text(Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                                               [[0, 0, 0], [0.5, 0.5, 0.5]]).to(fmt="cif"))
    (folder / "notes.txt").write_text("hello, I am not a structure\n")
    broken = {"empty.cif", "garbage.cif", "truncated.cif", "nacl.cif", "notes.txt"}

    assert invoke("init")[0] == 0
    result = runner.invoke(app, ["import", str(folder)])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 5, result.output
    for name in broken:
        assert sum(name in e for e in errors) == 1, (name, errors)
    rows = json.loads(invoke("structures", "--json")[1])
    assert sorted(r["formula"] for r in rows) == ["CaF2", "LiF", "MgF2"]  # 5 valid files, 2 of them duplicates
    caf2_row = next(r for r in rows if r["formula"] == "CaF2")
    assert len(caf2_row["sources"]) == 3  # both duplicates are recorded as further sources of CaF2
    assert all(Path(s.split(":", 1)[1]).name.startswith("caf2") for s in caf2_row["sources"])
