"""Structure import as pure functions: read sources (bundled set, files, Materials Project), parse, sanitize, dedupe.

No database work here: the import stage stores what these functions return.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import math
import os
import stat
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pymatgen.analysis.bond_valence import BVAnalyzer
from pymatgen.analysis.structure_matcher import ElementComparator, StructureMatcher
from pymatgen.core import DummySpecies, Element, Lattice, Structure
from pymatgen.io.cif import CifParser, str2float
from pymatgen.io.vasp import Poscar
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from hopflow.errors import InputError, MaterialsProjectError, MissingAPIKeyError
from hopflow.settings import get_settings
from hopflow.sources import file_key

InputKind = Literal["bundled", "file", "mp"]
InputFormat = Literal["bundled", "cif", "poscar", "json", "mp-json"]
OxidationMethod = Literal["bond-valence", "guess"]

BUNDLED_PACKAGE = "hopflow"
BUNDLED_RESOURCE = "data/bundled_structures.json"

SYMPREC = 0.1  # Å, spglib tolerance for the recorded space group (loose: experimental and relaxed cells alike)
MIN_SITE_DISTANCE = 0.5  # Å; closer sites are overlapping atoms, not a crystal
MAX_LATTICE_LENGTH = 1000.0  # Å; longer cell vectors are a unit or scale mistake, not a crystal
MAX_VOLUME_PER_ATOM = 1000.0  # Å^3; solids have 5-100, a slab with vacuum a few hundred
PRIMITIVE_TOLERANCE = 0.25  # Å, pymatgen's default for get_primitive_structure
FINGERPRINT_VOLUME_DECIMALS = 1  # Å^3 per atom, rounding in the fingerprint
CHARGE_TOLERANCE = 1e-6  # |sum of oxidation states| accepted as neutral

CIF_SUFFIXES = (".cif", ".mcif")
CIF_CELL_LENGTHS = ("_cell_length_a", "_cell_length_b", "_cell_length_c")
CIF_CELL_ANGLES = ("_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma")
POSCAR_SUFFIXES = (".vasp", ".poscar")
POSCAR_PREFIXES = ("POSCAR", "CONTCAR")
JSON_SUFFIXES = (".json",)
READ_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class SourceMetadata:
    """What a source says about its structure besides the structure itself."""

    reference: str | None = None
    database: str | None = None
    structure_type: str | None = None
    material_id: str | None = None
    energy_above_hull: float | None = None


@dataclass(frozen=True)
class RawInput:
    """One unparsed input: its identity (`key`), where it came from and its text.

    `key` is, for files, "<sha256 of the content>:<format>" (`file_key`; for a path that is not read, the hash of
    its path and the reason), the sha256 of the content for bundled entries, the MP id for Materials Project
    documents.
    `read_error` is set when the file could not be read or decoded; `parse_input` turns it into an `InputError`.
    """

    kind: InputKind
    key: str
    location: str
    payload: str
    format: InputFormat | None = None
    metadata: SourceMetadata = field(default_factory=SourceMetadata)
    read_error: str | None = None


@dataclass(frozen=True)
class SanitizedStructure:
    """A structure ready to store: reduced (primitive, LLL) cell, oxidation states when known, symmetry and sizes.

    `fingerprint` = "<reduced formula>|<space group number>|<volume per atom, 0.1 Å^3>": a cheap cache and pre-filter
    key only. Equal fingerprints do not prove two structures equivalent (use `find_duplicate`), and two equivalent
    structures can differ in it when the volume rounds across a boundary or the symmetry tolerance is met differently.
    """

    structure: Structure
    formula: str
    chemsys: str
    spacegroup_symbol: str
    spacegroup_number: int
    nsites: int
    oxidation_states: Mapping[str, float] | None
    oxidation_method: OxidationMethod | None
    density: float
    volume: float
    fingerprint: str


# ---------------------------------------------------------------- sources


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bundled_entries() -> list[dict[str, Any]]:
    text = resources.files(BUNDLED_PACKAGE).joinpath(BUNDLED_RESOURCE).read_text(encoding="utf-8")
    return json.loads(text)


def bundled_inputs() -> list[RawInput]:
    """The bundled fluoride set shipped inside the package, one input per entry."""
    inputs = []
    for entry in _bundled_entries():
        payload = json.dumps(entry, sort_keys=True)
        metadata = SourceMetadata(
            reference=entry.get("reference"),
            database=entry.get("database"),
            structure_type=entry.get("structure_type"),
        )
        inputs.append(
            RawInput(
                kind="bundled",
                key=_sha256(payload.encode()),
                location=entry["name"],
                payload=payload,
                format="bundled",
                metadata=metadata,
            )
        )
    return inputs


def _refused(path: Path, reason: str) -> RawInput:
    """An input for a path that is not read: its key names the path and the reason, so a fixed file is a new input."""
    marker = f"refused:{os.path.abspath(path)}:{reason}"
    return RawInput("file", file_key(_sha256(marker.encode()), None), str(path), "", read_error=reason)


def _walk(folder: Path) -> Iterator[tuple[Path, str | None]]:
    """Every entry under `folder` (hidden ones excepted), each with the reason it cannot be an input, if one is
    known before reading; linked folders are not followed (a link loop would never end)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        yield folder, f"cannot list directory ({exc.strerror or type(exc).__name__})"
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(path)
        elif entry.is_symlink() and path.is_dir():
            yield path, "symbolic link to a directory (not followed inside a folder)"
        else:
            yield path, None


def _expand_paths(paths: Iterable[str | Path]) -> Iterator[tuple[Path, str | None]]:
    """Files named by `paths` (files, directories recursively, glob patterns), each with an error if it has none."""
    for item in paths:
        path = Path(item)
        if os.path.lexists(path):  # dangling links and link loops too: they are refused with their reason
            yield from _walk(path) if path.is_dir() else [(path, None)]
            continue
        matches = sorted(glob.glob(str(item), recursive=True))
        if not matches:
            yield path, "no such file, directory or matching glob pattern"
        for match in matches:
            yield from _walk(Path(match)) if Path(match).is_dir() else [(Path(match), None)]


_FILE_TYPES = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def _not_regular(mode: int) -> str:
    return f"not a regular file ({_FILE_TYPES.get(stat.S_IFMT(mode), 'special file')})"


def _stat_error(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return f"dangling symbolic link (to {os.readlink(path)})"
    return f"cannot read file ({exc.strerror or type(exc).__name__})"


def _read_bounded(path: Path, max_bytes: int, seconds: float) -> bytes:
    """The bytes of a regular file, read in chunks; InputError when it is not regular, too big or too slow.

    Opened non-blocking, so a file swapped for a FIFO after the stat cannot hang the read; the time limit is
    checked between chunks.
    """
    deadline = time.monotonic() + seconds
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
            raise InputError(f"{path}: {_not_regular(mode)}")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, READ_CHUNK_BYTES):
            size += len(chunk)
            if size > max_bytes:
                raise InputError(f"{path}: file is over the limit of {max_bytes} bytes (HOPFLOW_MAX_INPUT_BYTES)")
            if time.monotonic() > deadline:
                raise InputError(f"{path}: reading took over {seconds:g} s (HOPFLOW_INPUT_READ_SECONDS)")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_file(path: Path, max_bytes: int, seconds: float) -> RawInput:
    """One file as an input; a path that is not a readable regular file within the limits gives a refused input."""
    location = str(path)
    try:
        info = os.stat(path)  # follows links: a loop or a dangling link fails here, with its reason
    except OSError as exc:
        return _refused(path, _stat_error(path, exc))
    if not stat.S_ISREG(info.st_mode):
        return _refused(path, _not_regular(info.st_mode))
    if info.st_size > max_bytes:
        return _refused(path, f"file is {info.st_size} bytes, over the limit of {max_bytes} (HOPFLOW_MAX_INPUT_BYTES)")
    try:
        data = _read_bounded(path, max_bytes, seconds)
    except InputError as exc:
        return _refused(path, str(exc).removeprefix(f"{location}: "))
    except OSError as exc:
        return _refused(path, f"cannot read file ({exc.strerror or type(exc).__name__})")
    digest = _sha256(data)
    try:
        text = data.decode("utf-8-sig")  # tolerates a byte-order mark
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 text (undecodable byte at offset {exc.start})"
        return RawInput("file", file_key(digest, None), location, "", read_error=reason)
    fmt = detect_format(path.name, text)
    return RawInput("file", file_key(digest, fmt), location, text, format=fmt)


def file_inputs(paths: Iterable[str | Path], *, max_bytes: int | None = None,
                read_seconds: float | None = None) -> list[RawInput]:
    """Inputs for single files, directories (recursively) and glob patterns; a bad file gives an input that fails.

    Only regular files are read, each within `max_bytes` and `read_seconds` (default: the settings).
    """
    settings = get_settings()
    max_bytes = max_bytes or settings.max_input_bytes
    read_seconds = read_seconds or settings.input_read_seconds
    inputs: list[RawInput] = []
    seen: set[str] = set()
    for path, error in _expand_paths(paths):
        real = os.path.realpath(path)  # never raises, unlike Path.resolve on a link loop
        if real in seen:
            continue
        seen.add(real)
        inputs.append(_refused(path, error) if error is not None else _read_file(path, max_bytes, read_seconds))
    return inputs


def detect_format(name: str, text: str) -> InputFormat | None:
    """The format of a file from its name, else from its content; None when neither tells."""
    lower = name.lower()
    if lower.endswith(CIF_SUFFIXES):
        return "cif"
    if lower.endswith(POSCAR_SUFFIXES) or name.startswith(POSCAR_PREFIXES):
        return "poscar"
    if lower.endswith(JSON_SUFFIXES):
        return "json"
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        return "json"
    if "_cell_length_a" in text and "data_" in text:
        return "cif"
    return None


# ---------------------------------------------------------------- parsing


def _check_elements(structure: Structure, location: str) -> None:
    """pymatgen reads an unknown symbol as a dummy species; refuse it here, naming it."""
    unknown = sorted({el.symbol for el in structure.composition.elements if isinstance(el, DummySpecies)})
    if unknown:
        raise InputError(f"{location}: unknown element {', '.join(unknown)}")


def _check_structure(structure: Structure, location: str) -> Structure:
    if len(structure) == 0:
        raise InputError(f"{location}: structure has no sites")
    _check_elements(structure, location)
    matrix = structure.lattice.matrix
    if not np.all(np.isfinite(matrix)):
        raise InputError(f"{location}: lattice has NaN or infinite entries")
    if not np.all(np.isfinite(structure.frac_coords)):
        raise InputError(f"{location}: site coordinates contain NaN or infinite values")
    volume = structure.volume
    if not math.isfinite(volume) or volume <= 0:
        raise InputError(f"{location}: lattice has zero or undefined volume")
    # neighbour searches grow with the cell: a wrong POSCAR scale factor (1e9) must not reach them
    if (longest := max(structure.lattice.abc)) > MAX_LATTICE_LENGTH:
        raise InputError(f"{location}: lattice length {longest:.4g} Å is over {MAX_LATTICE_LENGTH:g} Å, not a crystal")
    if (per_atom := volume / len(structure)) > MAX_VOLUME_PER_ATOM:
        raise InputError(f"{location}: {per_atom:.4g} Å^3 per atom is over {MAX_VOLUME_PER_ATOM:g} Å^3, not a crystal")
    return structure


def _cif_number(value: Any) -> float:
    """A CIF number without its uncertainty ("5.463(2)"); NaN when the value is not one number."""
    try:
        return float(str2float(value)) if isinstance(value, str) else math.nan
    except ValueError:
        return math.nan


def _check_cif_block(block: Mapping[str, Any], location: str, max_sites: int) -> None:
    """Refuse, before any structure is built, a CIF with impossible cell parameters or more atom rows than sites
    allowed (each row gives at least one site)."""
    for name in CIF_CELL_LENGTHS + CIF_CELL_ANGLES:
        if name not in block:
            continue  # pymatgen reports a missing cell itself
        value = block[name]
        number = _cif_number(value)
        if not math.isfinite(number):
            raise InputError(f"{location}: {name} is {value!r}, not a number")
        if name in CIF_CELL_LENGTHS and number <= 0:
            raise InputError(f"{location}: {name} is {value}, a lattice length must be positive")
        if name in CIF_CELL_ANGLES and not 0 < number < 180:
            raise InputError(f"{location}: {name} is {value}, a cell angle must lie between 0 and 180 degrees")
    rows: Any = next((block[k] for k in ("_atom_site_label", "_atom_site_type_symbol") if k in block), [])
    nrows = len(rows) if isinstance(rows, list) else 1
    if nrows > max_sites:
        raise InputError(f"{location}: {nrows} atom rows exceed the limit of {max_sites} sites (HOPFLOW_MAX_SITES)")


def _parse_cif(text: str, location: str, max_sites: int) -> Structure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            parser = CifParser.from_str(text)
            blocks = parser.as_dict()
        except Exception as exc:  # pymatgen raises many types on broken CIFs
            raise InputError(f"{location}: unreadable CIF ({_short(exc)})") from exc
        for block in blocks.values():
            _check_cif_block(block, location, max_sites)
        try:
            structures = parser.parse_structures(primitive=False, on_error="ignore")
        except Exception as exc:  # pymatgen raises many types on broken CIFs
            raise InputError(f"{location}: unreadable CIF ({_short(exc)})") from exc
        if len(structures) > 1:
            raise InputError(f"{location}: CIF holds {len(structures)} structures; give one per file")
        if structures:
            _check_elements(structures[0], location)
        # a CIF cut off between atom rows still parses: its formula no longer matches the atoms read
        if (problem := parser.check(structures[0])) is not None:
            raise InputError(f"{location}: atoms do not match the CIF's formula, truncated file? ({_short(problem)})")
    return structures[0]


def _is_coordinate_line(line: str) -> bool:
    """Three numbers first (NaN too: `_check_structure` refuses it with its own reason)."""
    fields = line.split()
    if len(fields) < 3:
        return False
    try:
        for f in fields[:3]:
            float(f)
    except ValueError:
        return False
    return True


def _check_poscar_counts(text: str, location: str, max_sites: int) -> None:
    """Refuse, before pymatgen builds anything, a POSCAR whose count line is over `max_sites` or does not match
    the coordinate lines after it (pymatgen would silently read a wrong structure). A layout this check cannot
    follow is left to pymatgen's parser, which reports it."""
    lines = text.splitlines()
    if len(lines) < 7:
        return
    fields = lines[5].split()
    counts_at = 5 if fields and all(f.lstrip("+-").isdigit() for f in fields) else 6
    try:
        counts = [int(f) for f in lines[counts_at].split()]
    except (ValueError, IndexError):
        return
    if not counts:
        return
    if any(c < 0 for c in counts):
        raise InputError(f"{location}: negative atom count in the count line {lines[counts_at].strip()!r}")
    total = sum(counts)
    if total > max_sites:
        raise InputError(f"{location}: count line says {total} atoms, over the limit of {max_sites} sites "
                         "(HOPFLOW_MAX_SITES)")
    first = counts_at + 2  # after the coordinate-mode line
    if len(lines) > counts_at + 1 and lines[counts_at + 1].strip()[:1] in ("s", "S"):
        first += 1  # selective dynamics
    coordinates = 0
    for line in lines[first:]:
        if not _is_coordinate_line(line):
            break  # a blank line ends the positions (velocities may follow)
        coordinates += 1
    if coordinates != total:
        raise InputError(f"{location}: count line says {total} atoms but {coordinates} coordinate lines follow")


def _parse_poscar(text: str, location: str, max_sites: int) -> Structure:
    _check_poscar_counts(text, location, max_sites)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return Poscar.from_str(text).structure
        except Exception as exc:  # noqa: BLE001 - any parser failure is a bad input
            raise InputError(f"{location}: unreadable POSCAR ({_short(exc)})") from exc


def _structure_from_dict(data: Mapping[str, Any], location: str, max_sites: int) -> Structure:
    sites = data.get("sites")
    if isinstance(sites, list) and len(sites) > max_sites:
        raise InputError(f"{location}: {len(sites)} sites exceed the limit of {max_sites} (HOPFLOW_MAX_SITES)")
    try:
        return Structure.from_dict(dict(data))
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{location}: JSON is not a pymatgen Structure ({_short(exc)})") from exc


def _parse_json(text: str, location: str, max_sites: int) -> Structure:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{location}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise InputError(f"{location}: JSON must be one object (a Structure or an MP document), got a {kind}")
    if "structure" in data and "material_id" in data:
        structure = data["structure"]
        if not isinstance(structure, dict):
            raise InputError(f"{location}: MP document has no structure object")
        return _structure_from_dict(structure, location, max_sites)
    if "lattice" in data and "sites" in data:
        return _structure_from_dict(data, location, max_sites)
    raise InputError(f"{location}: JSON is neither a pymatgen Structure nor a Materials Project document")


def _parse_bundled(text: str, location: str, max_sites: int) -> Structure:
    entry = json.loads(text)
    try:
        lat = entry["lattice"]
        lattice = Lattice.from_parameters(lat["a"], lat["b"], lat["c"], lat["alpha"], lat["beta"], lat["gamma"])
        species = [site["species"] for site in entry["sites"]]
        coords = [site["coords"] for site in entry["sites"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # full Hermann-Mauguin symbols such as P12_1/n1 warn needlessly
            return Structure.from_spacegroup(entry["spacegroup"], lattice, species, coords)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{location}: bad bundled entry ({_short(exc)})") from exc


_PARSERS = {
    "cif": _parse_cif,
    "poscar": _parse_poscar,
    "json": _parse_json,
    "mp-json": _parse_json,
    "bundled": _parse_bundled,
}


def _short(exc: BaseException | str, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_input(raw: RawInput, *, max_sites: int | None = None) -> Structure:
    """The structure in `raw`; raises `InputError` naming the input and the reason when there is none.

    Inputs that declare more than `max_sites` atoms (default: the setting) are refused before a structure is built.
    """
    max_sites = max_sites if max_sites is not None else get_settings().max_sites
    if raw.read_error is not None:
        raise InputError(f"{raw.location}: {raw.read_error}")
    if not raw.payload.strip():
        raise InputError(f"{raw.location}: empty file")
    if raw.format is None:
        raise InputError(f"{raw.location}: unknown format (expected CIF, POSCAR/CONTCAR/*.vasp, or JSON)")
    structure = _PARSERS[raw.format](raw.payload, raw.location, max_sites)
    return _check_structure(structure, raw.location)


# ---------------------------------------------------------------- sanitizing


def _min_distance(structure: Structure) -> float:
    if len(structure) == 1:
        return min(structure.lattice.abc)
    dists = structure.distance_matrix + np.diag(np.full(len(structure), np.inf))
    return float(min(dists.min(), min(structure.lattice.abc)))


def _bond_valence(structure: Structure) -> Structure | None:
    try:
        return BVAnalyzer().get_oxi_state_decorated_structure(structure)
    except (ValueError, KeyError):  # no charge-balanced assignment, or an element without bond-valence parameters
        return None


def _guess(structure: Structure) -> Structure | None:
    guessed = structure.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guessed.add_oxidation_state_by_guess()
    states = [float(getattr(site.specie, "oxi_state", None) or 0.0) for site in guessed]
    # add_oxidation_state_by_guess silently falls back to all-zero states when it finds no guess
    if all(state == 0 for state in states) or abs(sum(states)) > CHARGE_TOLERANCE:
        return None
    return guessed


def assign_oxidation_states(structure: Structure) -> tuple[Structure, OxidationMethod | None]:
    """The structure decorated with oxidation states (bond valence first, then guessing) and the method used.

    Returns the undecorated structure and None when neither method gives a charge-balanced assignment.
    """
    plain = structure.copy()
    plain.remove_oxidation_states()
    if (decorated := _bond_valence(plain)) is not None:
        return decorated, "bond-valence"
    if (decorated := _guess(plain)) is not None:
        return decorated, "guess"
    return plain, None


def _mean_oxidation_states(structure: Structure) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for site in structure:
        totals.setdefault(site.specie.symbol, []).append(float(getattr(site.specie, "oxi_state", None) or 0.0))
    return {element: sum(values) / len(values) for element, values in sorted(totals.items())}


def _ion_element(ion: str) -> Element:
    try:
        return Element(ion)
    except ValueError as exc:
        raise InputError(f"migrating ion {ion!r} is not an element symbol") from exc


def sanitize(structure: Structure, *, ion: str, max_sites: int, name: str | None = None) -> SanitizedStructure:
    """Check and reduce a parsed structure; raises `InputError` with the reason when it cannot be screened.

    Refused: disorder or partial occupancy, no `ion` sites, more than `max_sites` sites in the input cell (checked
    before any symmetry work, so a large supercell is refused even if its primitive cell would fit), overlapping atoms.
    Oxidation states come from bond valence, else guessing; when both fail the structure is kept with
    `oxidation_method=None` and stages that need oxidation states must record an error for it.
    """
    label = name or structure.composition.reduced_formula
    if not structure.is_ordered:
        raise InputError(f"{label}: disordered or partially occupied sites are not supported")
    element = _ion_element(ion)
    if element not in structure.composition.element_composition:
        raise InputError(f"{label}: no {ion} sites (migrating ion) in {structure.composition.reduced_formula}")
    if len(structure) > max_sites:
        raise InputError(f"{label}: {len(structure)} sites exceed the limit of {max_sites}")
    if (closest := _min_distance(structure)) < MIN_SITE_DISTANCE:
        raise InputError(f"{label}: overlapping atoms ({closest:.2f} Å apart, minimum {MIN_SITE_DISTANCE} Å)")

    reduced = structure.get_primitive_structure(tolerance=PRIMITIVE_TOLERANCE).get_reduced_structure("LLL")
    decorated, method = assign_oxidation_states(reduced)
    try:
        sga = SpacegroupAnalyzer(decorated, symprec=SYMPREC)
        symbol, number = sga.get_space_group_symbol(), sga.get_space_group_number()
    except Exception as exc:  # noqa: BLE001 - spglib failure is a property of this input
        raise InputError(f"{label}: symmetry analysis failed ({_short(exc)})") from exc

    formula = decorated.composition.reduced_formula
    volume = float(decorated.volume)
    volume_per_atom = round(volume / len(decorated), FINGERPRINT_VOLUME_DECIMALS)
    return SanitizedStructure(
        structure=decorated,
        formula=formula,
        chemsys=decorated.composition.chemical_system,
        spacegroup_symbol=symbol,
        spacegroup_number=number,
        nsites=len(decorated),
        oxidation_states=_mean_oxidation_states(decorated) if method else None,
        oxidation_method=method,
        density=float(decorated.density),
        volume=volume,
        fingerprint=f"{formula}|{number}|{volume_per_atom:.{FINGERPRINT_VOLUME_DECIMALS}f}",
    )


# ---------------------------------------------------------------- dedupe


def find_duplicate(candidate: Structure, stored: Iterable[tuple[int, Structure]]) -> int | None:
    """The id of the first stored structure equivalent to `candidate`, or None.

    pymatgen's StructureMatcher with its default tolerances; species are compared by element so that a structure
    with oxidation states matches the same structure without. The caller pre-filters `stored` by reduced formula.
    """
    matcher = StructureMatcher(comparator=ElementComparator())
    for structure_id, other in stored:
        if matcher.fit(candidate, other):
            return structure_id
    return None


# ---------------------------------------------------------------- Materials Project


class MPCriteria(BaseModel):
    """A Materials Project query: elements that must be present, excluded elements and size/stability limits."""

    model_config = ConfigDict(frozen=True)

    elements: tuple[str, ...] = Field(default=("F",), description="Elements every result must contain.")
    exclude_elements: tuple[str, ...] = Field(default=(), description="Elements no result may contain.")
    energy_above_hull_max: float | None = Field(default=0.1, ge=0, description="Largest energy above hull, eV/atom.")
    nsites_max: int | None = Field(default=None, gt=0, description="Most sites in the MP cell.")
    num_elements: tuple[int, int] | None = Field(default=None, description="Inclusive range of the number of elements.")
    limit: int | None = Field(default=None, gt=0, description="Most documents returned (None: all).")

    def matches(self, structure: Structure, energy_above_hull: float | None) -> bool:
        """Whether a structure meets these criteria (what the server filters; used by the stand-in client)."""
        present = {el.symbol for el in structure.composition.elements}
        if not set(self.elements) <= present or present & set(self.exclude_elements):
            return False
        if self.energy_above_hull_max is not None and (
            energy_above_hull is None or energy_above_hull > self.energy_above_hull_max
        ):
            return False
        if self.nsites_max is not None and len(structure) > self.nsites_max:
            return False
        if self.num_elements is not None and not self.num_elements[0] <= len(present) <= self.num_elements[1]:
            return False
        return True


class MaterialsProjectClient(Protocol):
    """Anything that turns MP criteria into raw inputs (the real API client or the test stand-in)."""

    def search(self, criteria: MPCriteria) -> list[RawInput]:
        """Raw inputs (kind "mp", key = MP id) for every document matching `criteria`."""
        ...


def mp_raw_input(material_id: str, structure: Structure, energy_above_hull: float | None) -> RawInput:
    """A raw input holding one Materials Project document (material id, structure, energy above hull)."""
    document = {
        "material_id": material_id,
        "energy_above_hull": energy_above_hull,
        "structure": structure.as_dict(),
    }
    return RawInput(
        kind="mp",
        key=material_id,
        location=material_id,
        payload=json.dumps(document),
        format="mp-json",
        metadata=SourceMetadata(
            database=f"Materials Project {material_id}",
            material_id=material_id,
            energy_above_hull=energy_above_hull,
        ),
    )


MP_FIELDS = ["material_id", "structure", "energy_above_hull"]


class MPApiClient:
    """Materials Project client on mp-api (`MPRester().materials.summary.search`); needs an API key."""

    def __init__(self, api_key: SecretStr | None = None) -> None:
        key = api_key if api_key is not None else get_settings().mp_api_key
        if key is None or not key.get_secret_value().strip():
            raise MissingAPIKeyError(
                "no Materials Project API key: set MP_API_KEY (or HOPFLOW_MP_API_KEY) to import from Materials Project"
            )
        self._api_key = key

    def __repr__(self) -> str:
        return "MPApiClient(api_key=SecretStr('**********'))"

    def _query(self, criteria: MPCriteria) -> dict[str, Any]:
        query: dict[str, Any] = {"elements": list(criteria.elements), "fields": MP_FIELDS}
        if criteria.exclude_elements:
            query["exclude_elements"] = list(criteria.exclude_elements)
        if criteria.energy_above_hull_max is not None:
            query["energy_above_hull"] = (0.0, criteria.energy_above_hull_max)
        if criteria.nsites_max is not None:
            query["num_sites"] = (1, criteria.nsites_max)
        if criteria.num_elements is not None:
            query["num_elements"] = criteria.num_elements
        return query

    def search(self, criteria: MPCriteria) -> list[RawInput]:
        """Query the MP summary endpoint; each document becomes one raw input keyed by its MP id."""
        from mp_api.client import MPRester  # imported here: slow, and only needed with a key

        secret = self._api_key.get_secret_value()
        try:
            with MPRester(api_key=secret, mute_progress_bars=True) as rester:  # contacts the server at once
                docs = rester.materials.summary.search(**self._query(criteria))
        except Exception as exc:  # requests and mp-api raise many types; all mean "the query failed"
            reason = _short(exc).replace(secret, "**********")
            raise MaterialsProjectError(f"Materials Project query failed: {reason}") from None
        inputs = []
        for doc in docs[: criteria.limit] if criteria.limit else docs:
            structure = doc.structure if isinstance(doc.structure, Structure) else Structure.from_dict(doc.structure)
            inputs.append(mp_raw_input(str(doc.material_id), structure, doc.energy_above_hull))
        return inputs

