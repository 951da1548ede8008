"""`vasp-neb`: VASP (CI-)NEB inputs from pymatgen's NEB set, a custodian run with NEB-aware handlers, NEBAnalysis
parse."""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from custodian import Custodian
from custodian.custodian import CustodianError
from custodian.vasp.handlers import FrozenJobErrorHandler, StdErrHandler, VaspErrorHandler
from custodian.vasp.jobs import VaspJob, VaspNEBJob
from monty.io import zopen
from monty.shutil import compress_file
from pydantic import BaseModel, ConfigDict
from pymatgen.analysis.transition_state import NEBAnalysis
from pymatgen.core import SETTINGS as PMG_SETTINGS
from pymatgen.core import Element, Structure
from pymatgen.io.vasp.inputs import Incar, Kpoints, Poscar, Potcar, PotcarSingle
from pymatgen.io.vasp.sets import CINEBSet, NEBSet

from hopflow.engines import (
    VASP_EXECUTION_FIELDS as EXECUTION_FIELDS,
)
from hopflow.engines import (
    VaspNebSettings,
    versions_of,
)
from hopflow.errors import EngineError, InputError
from hopflow.tasks.engines.base import (
    PREPARED_FILE,
    RUN_FILE,
    BarrierResult,
    Correction,
    EngineBase,
    Images,
    PreparedInputs,
    Stopwatch,
    Timings,
    hop_images,
    read_prepared,
    register,
    result_fields,
    write_model,
)

PACKAGES = ("pymatgen", "custodian", "pymatgen-analysis-diffusion")

NEB_OUTPUT = "neb_vasp.out"  # VaspNEBJob's stdout and stderr names: the handlers must be told them
NEB_STDERR = "neb_std_err.txt"
ENDPOINT_OUTPUT = "vasp.out"  # VaspJob's defaults
ENDPOINT_STDERR = "std_err.txt"
ENDPOINT_DIRS = ("start", "end")  # a convention NEBAnalysis.from_dir knows; not digits, so custodian skips them
REACHED_ACCURACY = "reached required accuracy"
FINISHED = "General timing and accounting"  # VASP's OUTCAR ends with it only after a normal finish
# INCAR tags that make a run an NEB; the endpoint single points drop them.
NEB_TAGS = ("IMAGES", "LCLIMB", "ICHAIN", "IOPT", "SPRING", "IBRION", "POTIM", "EDIFFG", "NSW")
# Outputs worth compressing once parsed (CONTCARs stay plain: a continuation reads them).
COMPRESSIBLE = ("OUTCAR", "vasprun.xml", "OSZICAR", "XDATCAR", "PROCAR", "DOSCAR", "EIGENVAL", "CHG", "CHGCAR",
                "WAVECAR", "PCDAT", "IBZKPT", NEB_OUTPUT, ENDPOINT_OUTPUT)
_FORCE_BLOCK = re.compile(r"TOTAL-FORCE \(eV/Angst\)\s*\n\s*-{20,}\n(.*?)\n\s*-{20,}", re.DOTALL)


class VaspRunRecord(BaseModel):
    """Every attempt's corrections and outcome, accumulated across continuations in `RUN_FILE`."""

    model_config = ConfigDict(frozen=True)

    attempts: int = 0
    corrections: tuple[Correction, ...] = ()
    errors: tuple[str, ...] = ()
    run_s: float = 0.0


# --- inputs ----------------------------------------------------------------------------------------------------------


def psp_root(psp_dir: Path | None) -> Path:
    """The POTCAR root: the setting, else pymatgen's PMG_VASP_PSP_DIR."""
    root = psp_dir or PMG_SETTINGS.get("PMG_VASP_PSP_DIR")
    if not root:
        raise InputError("no POTCAR directory: set HOPFLOW_VASP_PSP_DIR (or pymatgen's PMG_VASP_PSP_DIR)")
    if not Path(root).is_dir():
        raise InputError(f"POTCAR directory {root} does not exist")
    return Path(root)


def assemble_potcar(symbols: Sequence[str], functional: str, psp_dir: Path) -> Potcar:
    """A POTCAR from `psp_dir` in pymatgen's layout (<functional dir>/<symbol>/POTCAR or POTCAR.<symbol>)."""
    subdir = psp_dir / PotcarSingle.functional_dir[functional]
    potcar = Potcar()
    for symbol in symbols:
        candidates = [subdir / symbol / "POTCAR", subdir / f"POTCAR.{symbol}"]
        candidates += [Path(f"{c}.gz") for c in candidates]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise InputError(f"no POTCAR for {symbol} ({functional}) under {psp_dir}")
        potcar.append(PotcarSingle.from_file(str(found)))
    return potcar


def neutral_nelect(poscar: Poscar, potcar: Potcar) -> float:
    """Valence electrons of the neutral cell (ZVAL x count per species)."""
    return float(sum(p.zval * n for p, n in zip(potcar, poscar.natoms, strict=True)))


def vacancy_charge(images: Images, structure: Structure, moving_index: int) -> int:
    """Charge of the cell with an ionic vacancy: minus the migrating ion's oxidation state (+1 for F⁻)."""
    given = getattr(images, "vacancy_charge", None)
    if given is not None:
        return round(given)
    specie = structure[moving_index].specie
    oxi = getattr(specie, "oxi_state", None)
    if oxi is None:
        common = Element(specie.symbol).common_oxidation_states
        if not common:
            raise InputError(f"no oxidation state known for the migrating {specie.symbol}: cannot charge its vacancy")
        oxi = common[0]
    return -round(oxi)


def endpoint_incar(neb_incar: Incar) -> Incar:
    """The NEB INCAR made a single point (same electronic settings, NEB tags dropped)."""
    incar = Incar({k: v for k, v in neb_incar.items() if k not in NEB_TAGS})
    incar.update({"NSW": 0, "IBRION": -1})
    return incar


def image_dirs(workdir: Path) -> list[Path]:
    """The NEB image folders 00, 01, ... in order."""
    return sorted((p for p in workdir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def valid_contcar(path: Path, natoms: int) -> bool:
    """True when `path` holds a readable structure with `natoms` atoms."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        return len(Poscar.from_file(str(path)).structure) == natoms
    except Exception:  # a half-written CONTCAR of a killed run
        return False


def continue_from_contcars(workdir: Path, natoms: int) -> int:
    """Copy each intermediate image's valid CONTCAR onto its POSCAR; returns how many were copied."""
    copied = 0
    for d in image_dirs(workdir)[1:-1]:
        if valid_contcar(d / "CONTCAR", natoms):
            shutil.copy(d / "CONTCAR", d / "POSCAR")
            copied += 1
    return copied


# --- outputs ---------------------------------------------------------------------------------------------------------


def find_output(directory: Path, name: str) -> Path | None:
    """`name` in `directory`, plain or gzipped."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_text(path: Path) -> str:
    """A text file, plain or compressed."""
    with zopen(str(path), mode="rt", encoding="utf-8", errors="replace") as fh:
        return fh.read()


def outcar_finished(directory: Path) -> bool:
    """True when the directory's OUTCAR is that of a run that ended normally."""
    path = find_output(directory, "OUTCAR")
    return path is not None and FINISHED in read_text(path)


def outcar_converged(directory: Path) -> bool:
    """True when the image's OUTCAR says the ionic relaxation reached the required accuracy."""
    path = find_output(directory, "OUTCAR")
    return path is not None and REACHED_ACCURACY in read_text(path)


def outcar_max_force(path: Path | None) -> float | None:
    """Largest atomic force (eV/Å) in the last TOTAL-FORCE table of an OUTCAR; None without one."""
    if path is None:
        return None
    blocks = _FORCE_BLOCK.findall(read_text(path))
    if not blocks:
        return None
    rows = [line.split() for line in blocks[-1].strip().splitlines()]
    forces = [[float(x) for x in row[3:6]] for row in rows if len(row) >= 6]
    return max((sum(f * f for f in row) ** 0.5 for row in forces), default=None)


def outcar_steps(path: Path | None) -> int | None:
    """Ionic steps recorded in an OUTCAR."""
    return None if path is None else read_text(path).count("energy(sigma->0)")


def vasp_version(path: Path | None) -> str | None:
    """The version banner on an OUTCAR's first line."""
    if path is None:
        return None
    with zopen(str(path), mode="rt", encoding="utf-8", errors="replace") as fh:
        return fh.readline().strip() or None


def corrections_of(run_log: list[dict[str, Any]], job: str) -> list[Correction]:
    """Custodian's run log flattened into `Correction` records."""
    found = []
    for entry in run_log:
        for corr in entry.get("corrections", []):
            handler = corr.get("handler")
            found.append(
                Correction(
                    job=job,
                    handler=type(handler).__name__ if handler is not None else "?",
                    errors=tuple(str(e) for e in corr.get("errors", [])),
                    actions=tuple(corr.get("actions") or ()),
                )
            )
    return found


def compress_outputs(workdir: Path) -> None:
    """Gzip the large outputs of the NEB root, its images and the endpoint folders."""
    for directory in [workdir, *image_dirs(workdir), *(workdir / d for d in ENDPOINT_DIRS)]:
        for name in COMPRESSIBLE:
            if (directory / name).is_file():
                compress_file(directory / name, "gz")


# --- the engine ------------------------------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class VaspNebEngine(EngineBase):
    """`vasp-neb`: VASP CI-NEB through custodian; continues from the previous CONTCARs when re-run in place."""

    name: ClassVar[str] = "vasp-neb"
    settings_type: ClassVar[type[BaseModel]] = VaspNebSettings
    settings: VaspNebSettings = field(default_factory=VaspNebSettings)

    def prepare(self, images: Images, workdir: Path) -> PreparedInputs:
        """Write INCAR/KPOINTS/POTCAR, image folders 00..N+1 and endpoint folders; or resume from CONTCARs."""
        workdir = Path(workdir)
        structures, moving = hop_images(images)
        s = self.settings
        charge = vacancy_charge(images, structures[0], moving) if s.vacancy_mode == "charged" else 0
        existing = image_dirs(workdir) if workdir.is_dir() else []
        reuse = (workdir / "INCAR").is_file() and len(existing) == len(structures)
        if reuse:
            self._check_same_calculation(workdir, len(structures[0]))
            continued = continue_from_contcars(workdir, len(structures[0])) > 0
        else:
            self._write_inputs(structures, workdir, charge)
            continued = False
        return self.record_prepared(workdir, structures, moving, vacancy_mode=s.vacancy_mode, charge=charge,
                                    continued=continued, versions=versions_of(*PACKAGES))

    def _check_same_calculation(self, workdir: Path, natoms: int) -> None:
        """Refuse to resume a directory that holds another pathway or other physics settings."""
        if len(Poscar.from_file(str(workdir / "00" / "POSCAR")).structure) != natoms:
            raise InputError(f"{workdir} holds another calculation (different atom count); use a fresh directory")
        if (workdir / PREPARED_FILE).is_file():
            before = read_prepared(workdir).settings
            now = self.settings.model_dump(mode="json")
            changed = sorted(k for k in now.keys() - EXECUTION_FIELDS if before.get(k) != now[k])
            if changed:
                raise InputError(f"{workdir} was prepared with other settings ({', '.join(changed)}); "
                                 "use a fresh directory")

    def _write_inputs(self, structures: list[Structure], workdir: Path, charge: int) -> None:
        s = self.settings
        plain = [st.copy() for st in structures]
        for st in plain:
            st.remove_oxidation_states()
        set_cls = CINEBSet if s.climbing else NEBSet
        kpoints_settings = {"reciprocal_density": s.reciprocal_density} if s.reciprocal_density else None
        vis = set_cls(
            plain,
            user_incar_settings=s.user_incar_settings,
            user_kpoints_settings=kpoints_settings,
            user_potcar_functional=s.functional,
        )
        potcar = assemble_potcar(vis.potcar_symbols, s.functional, psp_root(s.psp_dir))
        poscars = vis.poscars
        incar = vis.incar
        if charge:
            incar["NELECT"] = neutral_nelect(poscars[0], potcar) - charge
        kpoints: Kpoints | None = vis.kpoints
        if kpoints is None:
            raise InputError("the NEB input set produced no KPOINTS")
        workdir.mkdir(parents=True, exist_ok=True)
        incar.write_file(str(workdir / "INCAR"))
        kpoints.write_file(str(workdir / "KPOINTS"))
        potcar.write_file(str(workdir / "POTCAR"))
        for i, poscar in enumerate(poscars):
            folder = workdir / f"{i:02d}"
            folder.mkdir(exist_ok=True)
            poscar.write_file(str(folder / "POSCAR"))
        if s.endpoint_calculations:
            for name, poscar in zip(ENDPOINT_DIRS, (poscars[0], poscars[-1]), strict=True):
                folder = workdir / name
                folder.mkdir(exist_ok=True)
                endpoint_incar(incar).write_file(str(folder / "INCAR"))
                kpoints.write_file(str(folder / "KPOINTS"))
                potcar.write_file(str(folder / "POTCAR"))
                poscar.write_file(str(folder / "POSCAR"))

    def _custodian(self, job: Any, handlers: list[Any], directory: Path) -> Custodian:
        s = self.settings
        return Custodian(
            handlers,
            [job],
            validators=[],
            max_errors=s.max_errors,
            polling_time_step=s.polling_s,
            monitor_freq=s.monitor_freq,
            directory=str(directory),
        )

    def run(self, workdir: Path) -> None:
        """Endpoint single points (unless done), then the NEB, each under custodian; corrections go to `RUN_FILE`."""
        workdir = Path(workdir)
        clock = Stopwatch.started()
        cmd = self.settings.command()
        runs: list[tuple[str, Custodian]] = []
        for name in ENDPOINT_DIRS:
            folder = workdir / name
            if folder.is_dir() and not outcar_finished(folder):
                job = VaspJob(
                    cmd, output_file=ENDPOINT_OUTPUT, stderr_file=ENDPOINT_STDERR, auto_npar=False, auto_gamma=False
                )
                handlers = [VaspErrorHandler(), StdErrHandler(), FrozenJobErrorHandler()]
                runs.append((name, self._custodian(job, handlers, folder)))
        if not all(outcar_converged(d) for d in image_dirs(workdir)[1:-1]):
            # auto_gamma reads a root POSCAR, which an NEB has not; NPAR is the user's to set
            job = VaspNEBJob(cmd, output_file=NEB_OUTPUT, stderr_file=NEB_STDERR, auto_npar=False, auto_gamma=False)
            handlers = [
                VaspErrorHandler(output_filename=NEB_OUTPUT),
                StdErrHandler(output_filename=NEB_STDERR),
                FrozenJobErrorHandler(output_filename=NEB_OUTPUT),
            ]
            runs.append(("neb", self._custodian(job, handlers, workdir)))
        record_path = workdir / RUN_FILE
        record = (
            VaspRunRecord.model_validate_json(record_path.read_text()) if record_path.is_file() else VaspRunRecord()
        )
        corrections = list(record.corrections)
        failure: str | None = None
        for name, custodian in runs:
            try:
                custodian.run()
            except (CustodianError, OSError) as exc:  # OSError: the command itself cannot start
                failure = f"{name}: {type(exc).__name__}: {exc}"
            corrections += corrections_of(custodian.run_log, name)
            if failure is not None:
                break
        record = VaspRunRecord(
            attempts=record.attempts + 1,
            corrections=tuple(corrections),
            errors=(*record.errors, failure) if failure is not None else record.errors,
            run_s=record.run_s + clock.seconds(),
        )
        write_model(record_path, record)
        if failure is not None:
            raise EngineError(f"VASP NEB in {workdir} failed: {failure}")

    def parse(self, workdir: Path) -> BarrierResult:
        """NEBAnalysis of the image folders (endpoint energies from start/ and end/); compresses outputs if set."""
        workdir = Path(workdir)
        prepared = read_prepared(workdir)
        record_path = workdir / RUN_FILE
        record = (
            VaspRunRecord.model_validate_json(record_path.read_text()) if record_path.is_file() else VaspRunRecord()
        )
        folders = image_dirs(workdir)
        ends = [workdir / d for d in ENDPOINT_DIRS]
        relaxation_dirs = (str(ends[0]), str(ends[1])) if all(find_output(d, "OUTCAR") for d in ends) else None
        try:
            neb = NEBAnalysis.from_dir(str(workdir), relaxation_dirs=relaxation_dirs)
        except (ValueError, IndexError, KeyError, FileNotFoundError) as exc:
            raise EngineError(f"cannot parse the NEB in {workdir}: {exc}") from exc
        energies = tuple(float(e) for e in neb.energies)
        converged = all(outcar_converged(d) for d in folders[1:-1])
        terminal = [ends[0] if relaxation_dirs else folders[0], ends[1] if relaxation_dirs else folders[-1]]
        force_dirs = [terminal[0], *folders[1:-1], terminal[1]]
        middle = find_output(folders[1], "OUTCAR") if len(folders) > 2 else None
        banner = vasp_version(middle)
        result = BarrierResult(
            **result_fields(prepared, workdir, energies, converged, self.settings.intermediate_minimum_tol),
            reaction_coordinate=tuple(float(r) for r in neb.r),
            max_forces=tuple(outcar_max_force(find_output(d, "OUTCAR")) for d in force_dirs),
            n_images=len(folders) - 2,
            steps=outcar_steps(middle),
            timings=Timings(run_s=record.run_s),
            corrections=record.corrections,
            continued=prepared.continued,
            vacancy_mode=prepared.vacancy_mode,
            charge=prepared.charge,
            versions=prepared.versions | ({"vasp": banner} if banner else {}),
        )
        if self.settings.compress:
            compress_outputs(workdir)
        return result
