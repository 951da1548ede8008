"""Structure import science: bundled set, file formats, bad inputs, sanitizing, dedupe, Materials Project clients."""

from __future__ import annotations

import json
from pathlib import Path

import crystals
import numpy as np
import pytest
from crystals import CAF2_A
from pydantic import SecretStr
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.io.cif import CifWriter
from pymatgen.io.vasp import Poscar

from hopflow.errors import InputError, MaterialsProjectError, MissingAPIKeyError
from hopflow.settings import get_settings
from hopflow.tasks.structures import (
    MaterialsProjectClient,
    MPApiClient,
    MPCriteria,
    RawInput,
    SanitizedStructure,
    bundled_inputs,
    file_inputs,
    find_duplicate,
    parse_input,
    sanitize,
)

from fake_mp import FakeMaterialsProject

MAX_SITES = 500
FAKE_KEY = "fake-mp-key-0123456789abcdef0123"


def _sanitize_file(raw: RawInput) -> SanitizedStructure:
    return sanitize(parse_input(raw), ion="F", max_sites=MAX_SITES, name=raw.location)


@pytest.fixture(scope="module")
def bundled() -> list[tuple[RawInput, dict, SanitizedStructure]]:
    """Every bundled entry with its JSON record and its sanitized structure (computed once)."""
    out = []
    for raw in bundled_inputs():
        entry = json.loads(raw.payload)
        out.append((raw, entry, sanitize(parse_input(raw), ion="F", max_sites=MAX_SITES, name=raw.location)))
    return out


@pytest.fixture(scope="module")
def caf2() -> Structure:
    """Conventional fluorite CaF2 (12 sites), a = 5.4631 Å (crystals.CAF2_A)."""
    return crystals.caf2()


def _rocksalt(cation: str, a: float) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [cation, "F"], [[0, 0, 0], [0.5, 0.5, 0.5]])


# ---------------------------------------------------------------- bundled set


def test_bundled_set_size_types_and_ternaries(bundled):
    names = [entry["name"] for _, entry, _ in bundled]
    assert len(names) >= 20 and len(set(names)) == len(names)
    families = {entry["structure_type"].split("(")[0].split(",")[0].strip().lower() for _, entry, _ in bundled}
    assert {"fluorite", "rocksalt", "rutile", "tysonite"} <= families
    assert any("perovskite" in f for f in families)
    assert len(families) >= 5
    multinary = [san.formula for _, _, san in bundled if len(san.structure.composition.elements) >= 3]
    assert len(multinary) >= 6, multinary
    for _, entry, _ in bundled:
        assert entry["reference"], entry["name"]


def test_bundled_inputs_have_distinct_content_keys():
    inputs = bundled_inputs()
    assert len({raw.key for raw in inputs}) == len(inputs)
    assert all(raw.kind == "bundled" and raw.format == "bundled" and len(raw.key) == 64 for raw in inputs)
    assert bundled_inputs()[0].key == inputs[0].key  # stable across reads


def test_every_bundled_structure_is_charge_balanced_and_sane(bundled):
    for raw, entry, san in bundled:
        assert san.formula == Composition(entry["name"]).reduced_formula, raw.location
        assert san.oxidation_method == "bond-valence", raw.location
        charge = sum(site.specie.oxi_state for site in san.structure)
        assert charge == pytest.approx(0.0, abs=1e-9), raw.location
        for element, state in entry["oxidation_states"].items():
            assert san.oxidation_states[element] == pytest.approx(state), raw.location
        distances = san.structure.distance_matrix + np.diag(np.full(san.nsites, np.inf))
        assert distances.min() > 1.5, (raw.location, distances.min())
        assert san.spacegroup_number == entry["spacegroup_number"], raw.location
        # the reduced cell holds a whole number of formula units of the conventional cell
        conventional = parse_input(raw)
        assert len(conventional) % san.nsites == 0, raw.location


def test_caf2_sanitized_is_the_three_site_fluorite_cell(bundled):
    san = next(san for raw, _, san in bundled if raw.location == "CaF2")
    assert (san.spacegroup_number, san.spacegroup_symbol, san.nsites) == (225, "Fm-3m", 3)
    assert san.oxidation_states == {"Ca": 2.0, "F": -1.0}
    assert san.chemsys == "Ca-F"
    assert san.volume == pytest.approx(CAF2_A**3 / 4, rel=1e-6)
    assert san.density == pytest.approx(3.181, abs=0.002)  # X-ray density of fluorite, 3.18 g/cm3
    assert san.fingerprint == f"CaF2|225|{CAF2_A**3 / 12:.1f}"


# ---------------------------------------------------------------- file formats


def test_caf2_round_trips_through_every_file_format(tmp_path, caf2):
    (tmp_path / "sub").mkdir()
    CifWriter(caf2).write_file(tmp_path / "CaF2.cif")
    Poscar(caf2).write_file(tmp_path / "sub" / "POSCAR")
    Poscar(caf2).write_file(tmp_path / "sub" / "CONTCAR_relaxed")
    Poscar(caf2).write_file(tmp_path / "CaF2.vasp")
    (tmp_path / "CaF2.json").write_text(json.dumps(caf2.as_dict()))
    doc = {"material_id": "mp-2741", "energy_above_hull": 0.0, "structure": caf2.as_dict()}
    (tmp_path / "mp-2741.json").write_text(json.dumps(doc))

    inputs = file_inputs([tmp_path])
    formats = sorted((Path(raw.location).name, raw.format) for raw in inputs)
    assert formats == [
        ("CONTCAR_relaxed", "poscar"),
        ("CaF2.cif", "cif"),
        ("CaF2.json", "json"),
        ("CaF2.vasp", "poscar"),
        ("POSCAR", "poscar"),
        ("mp-2741.json", "json"),
    ]
    for raw in inputs:
        structure = parse_input(raw)
        assert structure.composition.reduced_formula == "CaF2", raw.location
        assert find_duplicate(structure, [(7, caf2)]) == 7, raw.location
        assert _sanitize_file(raw).nsites == 3
    assert len({raw.key for raw in inputs}) == len(inputs) - 2  # the three POSCAR-format files hold the same bytes


def test_globs_single_files_and_missing_paths(tmp_path, caf2):
    CifWriter(caf2).write_file(tmp_path / "a.cif")
    CifWriter(_rocksalt("Li", 4.0173)).write_file(tmp_path / "b.cif")
    (tmp_path / "notes.txt").write_text("not a structure")
    inputs = file_inputs([str(tmp_path / "*.cif"), tmp_path / "a.cif", tmp_path / "nope.cif"])
    assert [Path(raw.location).name for raw in inputs] == ["a.cif", "b.cif", "nope.cif"]  # a.cif only once
    with pytest.raises(InputError, match=r"nope\.cif: no such file"):
        parse_input(inputs[2])


def _broken_and_valid_folder(folder: Path, caf2: Structure) -> tuple[list[str], list[str]]:
    valid = {
        "CaF2.cif": lambda p: CifWriter(caf2).write_file(p),
        "LiF/POSCAR": lambda p: Poscar(_rocksalt("Li", 4.0173)).write_file(p),
        "NaF.json": lambda p: p.write_text(json.dumps(_rocksalt("Na", 4.62).as_dict())),
        "KMgF3.vasp": lambda p: Poscar(
            Structure(Lattice.cubic(3.9924), ["K", "Mg", "F", "F", "F"],
                      [[0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]])
        ).write_file(p),
        "mp-682.json": lambda p: p.write_text(
            json.dumps({"material_id": "mp-682", "energy_above_hull": 0, "structure": _rocksalt("K", 5.347).as_dict()})
        ),
    }
    cif_text = str(CifWriter(caf2))
    lines = cif_text.splitlines(keepends=True)
    disordered = Structure(Lattice.cubic(5.6), [{"Ca": 0.5, "Sr": 0.5}, "F", "F"],
                           [[0, 0, 0], [0.25, 0.25, 0.25], [0.75, 0.75, 0.75]])
    broken = {
        "empty.cif": lambda p: p.write_bytes(b""),
        "garbage.cif": lambda p: p.write_bytes(bytes(range(256)) * 8),
        "truncated.cif": lambda p: p.write_text("".join(lines[:-4])),  # cut between atom rows
        "utf16.cif": lambda p: p.write_text(cif_text, encoding="utf-16"),
        "disordered.cif": lambda p: CifWriter(disordered).write_file(p),
    }
    for name, write in {**valid, **broken}.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    return sorted(valid), sorted(broken)


def test_five_valid_and_five_broken_files_give_five_structures_and_five_named_errors(tmp_path, caf2):
    valid, broken = _broken_and_valid_folder(tmp_path, caf2)
    stored, errors = [], []
    for raw in file_inputs([tmp_path]):
        try:
            stored.append((raw.location, _sanitize_file(raw)))
        except InputError as exc:
            errors.append((raw.location, str(exc)))
    assert sorted(Path(loc).relative_to(tmp_path).as_posix() for loc, _ in stored) == valid
    assert sorted(Path(loc).name for loc, _ in errors) == broken
    for location, message in errors:
        assert message.startswith(location), message
    reasons = {Path(loc).name: msg for loc, msg in errors}
    assert "empty file" in reasons["empty.cif"]
    assert "not UTF-8" in reasons["garbage.cif"] and "not UTF-8" in reasons["utf16.cif"]
    assert "truncated" in reasons["truncated.cif"]
    assert "disordered or partially occupied" in reasons["disordered.cif"]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("notes.txt", "hello, I am not a crystal", "unknown format"),
        ("bad.json", '{"lattice": ', "invalid JSON"),
        ("list.json", "[1, 2]", "must be one object"),
        ("thing.json", '{"a": 1}', "neither a pymatgen Structure"),
        ("POSCAR", "x\n1.0\n5 0 0\n0 5 0\n0 0 5\nLi F\n1 1\ndirect\n0 0 0\nnan 0.5 0.5\n", "NaN"),
        ("CONTCAR", "x\n1.0\n5 0 0\n", "unreadable POSCAR"),
        ("half.cif", "data_x\n_cell_length_a 5\n_cell_length_b 5\nloop_\n_atom_site_label\n", "unreadable CIF"),
    ],
)
def test_bad_files_raise_input_errors_naming_file_and_reason(tmp_path, name, content, reason):
    (tmp_path / name).write_text(content)
    (raw,) = file_inputs([tmp_path / name])
    with pytest.raises(InputError, match=reason) as info:
        parse_input(raw)
    assert str(tmp_path / name) in str(info.value)


# ---------------------------------------------------------------- sanitize


def test_sanitize_refuses_missing_ion_too_many_sites_and_overlaps(caf2):
    with pytest.raises(InputError, match="no F sites"):
        sanitize(Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.13), ["Li", "Cl"], [[0, 0, 0], [0.5] * 3]),
                 ion="F", max_sites=MAX_SITES)
    with pytest.raises(InputError, match="12 sites exceed the limit of 11"):
        sanitize(caf2, ion="F", max_sites=11)
    crowded = caf2.copy()
    crowded.append("F", [0.26, 0.25, 0.25])
    with pytest.raises(InputError, match="overlapping atoms"):
        sanitize(crowded, ion="F", max_sites=MAX_SITES)
    with pytest.raises(InputError, match="not an element"):
        sanitize(caf2, ion="Fluorine", max_sites=MAX_SITES)
    assert sanitize(_rocksalt("Li", 4.0173), ion="Li", max_sites=MAX_SITES).nsites == 2  # any migrating ion


def test_sanitize_reduces_supercells_and_keeps_oxidation_fallbacks(caf2):
    supercell = caf2 * (2, 1, 1)
    san = sanitize(supercell, ion="F", max_sites=MAX_SITES)
    assert (san.nsites, san.spacegroup_number) == (3, 225)
    a, b, c = san.structure.lattice.abc
    assert a == pytest.approx(CAF2_A / 2**0.5) and b == pytest.approx(a) and c == pytest.approx(a)  # LLL: fcc primitive

    xef2 = Structure.from_spacegroup(
        "I4/mmm", Lattice.tetragonal(4.315, 6.99), ["Xe", "F"], [[0, 0, 0], [0, 0, 0.2837]]
    )
    guessed = sanitize(xef2, ion="F", max_sites=MAX_SITES)  # no bond-valence parameters for Xe
    assert guessed.oxidation_method == "guess" and guessed.oxidation_states == {"F": -1.0, "Xe": 2.0}

    naf2 = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.0), ["Na", "F"], [[0, 0, 0], [0.25] * 3])
    flagged = sanitize(naf2, ion="F", max_sites=MAX_SITES)  # Na2+ exists in no table: nothing balances
    assert flagged.oxidation_method is None and flagged.oxidation_states is None
    assert all(getattr(site.specie, "oxi_state", None) is None for site in flagged.structure)


# ---------------------------------------------------------------- dedupe


def test_find_duplicate_matches_supercells_and_conventional_cells_only(caf2):
    primitive = sanitize(caf2, ion="F", max_sites=MAX_SITES).structure  # decorated with oxidation states
    lif = _rocksalt("Li", 4.0173)
    stored = [(1, lif), (2, primitive)]
    assert find_duplicate(caf2 * (2, 1, 1), stored) == 2
    assert find_duplicate(caf2, stored) == 2
    assert find_duplicate(lif, [(2, primitive)]) is None
    srf2 = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.7996), ["Sr", "F"], [[0, 0, 0], [0.25] * 3])
    assert find_duplicate(srf2, stored) is None
    assert find_duplicate(caf2, []) is None


# ---------------------------------------------------------------- Materials Project


def test_fake_materials_project_round_trip(caf2):
    lif, licl = _rocksalt("Li", 4.0173), Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.13), ["Li", "Cl"], [[0, 0, 0], [0.5] * 3]
    )
    fake = FakeMaterialsProject([("mp-2741", caf2, 0.0), ("mp-1138", lif, 0.02), ("mp-22905", licl, 0.0),
                                 ("mp-9999", caf2 * (2, 1, 1), 0.3)])
    client: MaterialsProjectClient = fake
    inputs = client.search(MPCriteria(elements=("F",), energy_above_hull_max=0.05))
    assert [raw.key for raw in inputs] == ["mp-2741", "mp-1138"]
    raw = inputs[1]
    assert (raw.kind, raw.location, raw.format) == ("mp", "mp-1138", "mp-json")
    assert raw.metadata.energy_above_hull == 0.02 and raw.metadata.material_id == "mp-1138"
    assert find_duplicate(parse_input(raw), [(1, lif)]) == 1
    assert _sanitize_file(raw).formula == "LiF"

    assert [r.key for r in client.search(MPCriteria(exclude_elements=("Li",), energy_above_hull_max=None))] == [
        "mp-2741", "mp-9999"]
    assert [r.key for r in client.search(MPCriteria(nsites_max=8, energy_above_hull_max=None))] == [
        "mp-1138"]  # the CaF2 documents have 12 and 24 sites
    assert client.search(MPCriteria(num_elements=(3, 4))) == []
    assert len(fake.queries) == 4


def test_mp_api_client_without_key_is_a_clear_error_that_leaks_no_key(monkeypatch):
    monkeypatch.delenv("MP_API_KEY", raising=False)
    monkeypatch.delenv("HOPFLOW_MP_API_KEY", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(MissingAPIKeyError, match="MP_API_KEY") as info:
            MPApiClient()
        assert isinstance(info.value, RuntimeError)

        monkeypatch.setenv("MP_API_KEY", FAKE_KEY)  # a key set elsewhere must not appear in errors or reprs
        get_settings.cache_clear()
        with pytest.raises(MissingAPIKeyError) as info:
            MPApiClient(api_key=SecretStr("   "))
        assert FAKE_KEY not in str(info.value)
        client = MPApiClient()
        assert FAKE_KEY not in repr(client) and FAKE_KEY not in str(client)
        assert FAKE_KEY not in repr(get_settings())
    finally:
        get_settings.cache_clear()


def test_mp_api_client_failure_is_a_clear_error_without_the_key():
    # No network here (and a fake key anywhere): the real mp-api client fails; the error names MP, not the key.
    client = MPApiClient(api_key=SecretStr(FAKE_KEY))
    with pytest.raises(MaterialsProjectError, match="Materials Project query failed") as info:
        client.search(MPCriteria(elements=("F",), energy_above_hull_max=0.0, nsites_max=4))
    assert FAKE_KEY not in str(info.value)
