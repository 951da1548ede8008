"""A VASP STAND-IN for tests (NOT VASP): reads INCAR/POSCARs, writes OUTCARs/CONTCARs of a known analytic path.

It behaves like VASP at the file level only. NEB mode (INCAR IMAGES = N > 0): reads 00/POSCAR ... (N+1)/POSCAR,
writes CONTCAR and OUTCAR into 01 ... N and a VASP-like log to stdout (custodian redirects it to neb_vasp.out).
Single-point mode (no IMAGES): reads ./POSCAR, writes ./OUTCAR and ./CONTCAR.

Energies follow E(s) = N_atoms * E_ATOM + Eb * sin^2(pi * s), s = projection of the migrating ion's displacement
from image 00 onto the 00 -> N+1 hop vector, so the analytic barrier is Eb (exactly, when an image sits at s = 1/2).
The "relaxed" geometry written to CONTCAR puts the migrating ion on the straight hop line and the host atoms on the
linear interpolation of the endpoints plus a fixed small offset: a converged run's CONTCARs are reproducible.

Controlled by environment variables:
  HOPFLOW_FAKE_VASP_BARRIER=0.4       barrier Eb in eV
  HOPFLOW_FAKE_VASP_ERROR=rspher      print the first message of custodian's VaspErrorHandler.error_msgs[key] and
                                      exit 1. For keys whose fix sets LREAL = .FALSE. (rspher, real_optlay,
                                      nicht_konv) the error repeats while LREAL is not .FALSE.; for any other key it
                                      fires once per directory (marker file).
  HOPFLOW_FAKE_VASP_INTERRUPT=2       write CONTCARs of the first 2 images (half-way relaxed), partial OUTCARs, then
                                      exit 137 as if killed (a wall-time kill); "all" = every image.
  HOPFLOW_FAKE_VASP_NEVER_CONVERGE=1  use every ionic step (NSW) and never reach the force criterion.
  HOPFLOW_FAKE_VASP_LOG=path          append one line per invocation (mode and directory).
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")  # stderr is read by custodian's StdErrHandler; keep it to real errors

from pymatgen.core import Structure  # noqa: E402
from pymatgen.io.vasp.inputs import Incar, Poscar  # noqa: E402

E_ATOM = -5.0  # eV per atom of the reference (endpoint) energy
DEFAULT_BARRIER = 0.4  # eV
HOST_OFFSET = 0.01  # Å, the fixed "relaxation" of host atoms written to CONTCAR
CONVERGED_FORCE = 0.005  # eV/Å, residual force of a converged image (below any sensible EDIFFG)
UNCONVERGED_FORCE = 0.5  # eV/Å
CONVERGED_STEPS = 3
KILLED_EXIT = 137
LREAL_ERRORS = {"rspher", "real_optlay", "nicht_konv"}
VERSION_LINE = " vasp.0.0.0-hopflow-standin (NOT VASP: a file-level stand-in for tests)"
REACHED = " reached required accuracy - stopping structural energy minimisation"
FINISHED = " General timing and accounting informations for this job:"


def log_invocation(mode: str) -> None:
    """Append a line to HOPFLOW_FAKE_VASP_LOG when set."""
    if path := os.environ.get("HOPFLOW_FAKE_VASP_LOG"):
        with open(path, "a") as fh:
            fh.write(f"{mode} {Path.cwd()}\n")


def die(message: str, code: int = 1) -> None:
    """Print an error the way VASP does (stdout) and exit."""
    print(f" {message}")
    sys.stdout.flush()
    sys.exit(code)


def potcar_elements(path: Path) -> list[str]:
    """Element of each POTCAR dataset, from its TITEL lines."""
    titles = re.findall(r"TITEL\s*=\s*\S+\s+(\S+)", path.read_text())
    return [t.split("_")[0] for t in titles]


def potcar_zvals(path: Path) -> list[float]:
    """ZVAL of each POTCAR dataset."""
    return [float(z) for z in re.findall(r"ZVAL\s*=\s*([\d.]+)", path.read_text())]


def check_inputs(incar_dir: Path, poscar: Poscar) -> float:
    """VASP refuses to start without KPOINTS/POTCAR or with a POTCAR that does not match POSCAR; returns NELECT."""
    for name in ("INCAR", "KPOINTS", "POTCAR"):
        if not (incar_dir / name).is_file():
            die(f"ERROR: file {name} not found")
    elements = potcar_elements(incar_dir / "POTCAR")
    if elements != poscar.site_symbols:
        die(f"ERROR: POTCAR elements {elements} do not match POSCAR {poscar.site_symbols}")
    zvals = potcar_zvals(incar_dir / "POTCAR")
    return float(sum(z * n for z, n in zip(zvals, poscar.natoms, strict=True)))


def maybe_fail(incar: Incar) -> None:
    """Inject the error named by HOPFLOW_FAKE_VASP_ERROR, if its condition holds."""
    key = os.environ.get("HOPFLOW_FAKE_VASP_ERROR")
    if not key:
        return
    from custodian.vasp.handlers import VaspErrorHandler  # only here: its import costs a second per run

    message = VaspErrorHandler.error_msgs[key][0]  # custodian's own table: its handler must recognise it
    if key in LREAL_ERRORS:
        if incar.get("LREAL", False) is False:
            return
    else:
        marker = Path(f".standin_failed_{key}")
        if marker.exists():
            return
        marker.write_text("failed once\n")
    print(VERSION_LINE)
    die(message)


def wrap(frac: np.ndarray) -> np.ndarray:
    """Fractional differences into [-0.5, 0.5)."""
    return frac - np.round(frac)


def host_offset(n_sites: int, image: int) -> np.ndarray:
    """A fixed, deterministic Cartesian offset per host atom (the stand-in's 'relaxation')."""
    j = np.arange(n_sites)[:, None]
    phase = np.array([1.3, 0.7, 0.3])[None, :] * j + image
    return HOST_OFFSET * np.sin(phase)


class Path1D:
    """The analytic path between the two endpoint structures."""

    def __init__(self, start: Structure, end: Structure, barrier: float) -> None:
        self.start = start
        self.lattice = start.lattice
        self.dfrac = wrap(end.frac_coords - start.frac_coords)
        dcart = self.lattice.get_cartesian_coords(self.dfrac)
        self.moving = int(np.argmax(np.linalg.norm(dcart, axis=1)))
        self.hop = dcart[self.moving]
        self.length = float(np.linalg.norm(self.hop))
        self.barrier = barrier
        self.e_ref = E_ATOM * len(start)

    def coordinate(self, s: Structure) -> float:
        """Reaction coordinate s in [0, 1] of an image."""
        d = self.lattice.get_cartesian_coords(wrap(s.frac_coords[self.moving] - self.start.frac_coords[self.moving]))
        return float(np.dot(d, self.hop) / self.length**2)

    def energy(self, s: float) -> float:
        """E(s) in eV."""
        return self.e_ref + self.barrier * math.sin(math.pi * s) ** 2

    def tangent_force(self, s: float) -> float:
        """-dE/dx along the path (eV/Å)."""
        return -self.barrier * math.pi * math.sin(2 * math.pi * s) / self.length

    def relaxed(self, s_value: float, image: int) -> Structure:
        """The image's 'relaxed' geometry at coordinate s."""
        frac = self.start.frac_coords + s_value * self.dfrac
        cart = self.lattice.get_cartesian_coords(frac)
        offset = host_offset(len(self.start), image)
        offset[self.moving] = 0.0
        return Structure(self.lattice, self.start.species, cart + offset, coords_are_cartesian=True)


def partially_relaxed(current: Structure, target: Structure) -> Structure:
    """Half-way from current to target (minimum image)."""
    d = wrap(target.frac_coords - current.frac_coords)
    return Structure(current.lattice, current.species, current.frac_coords + 0.5 * d)


def force_block(structure: Structure, forces: np.ndarray) -> str:
    """OUTCAR's POSITION / TOTAL-FORCE table."""
    rule = " " + "-" * 83
    rows = [
        f" {p[0]:12.5f} {p[1]:12.5f} {p[2]:12.5f}   {f[0]:14.6f} {f[1]:14.6f} {f[2]:14.6f}"
        for p, f in zip(structure.cart_coords, forces, strict=True)
    ]
    return "\n".join([" POSITION                                       TOTAL-FORCE (eV/Angst)", rule, *rows, rule])


def outcar_text(
    structure: Structure, energies: list[float], force: float, moving: int, incar: Incar, nelect: float,
    tangent: float | None, reached: bool,
) -> str:
    """An OUTCAR with the lines pymatgen's Outcar, read_neb and NEBAnalysis read, one block per ionic step."""
    n = len(structure)
    forces = np.zeros((n, 3))
    forces[moving, 0] = force
    head = [
        VERSION_LINE,
        " executed on             stand-in date 1970.01.01  00:00:00",
        f"   NIONS = {n:7d}",
        f"   IBRION = {int(incar.get('IBRION', -1)):6d}    ionic relax: 0-MD 1-quasi-New 2-CG",
        f"   NSW    = {int(incar.get('NSW', 0)):6d}    number of steps for IOM",
        f"   NELECT = {nelect:12.4f}    total number of electrons",
        " Dimension of arrays:",
        f"   k-points           NKPTS =      1   k-points in BZ     NKDIM =      1   number of bands    NBANDS= {n:6d}",
        "   total plane-waves  NPLWV =  32768",
    ]
    body = []
    for step, energy in enumerate(energies, start=1):
        body += [
            f"{'-' * 39} Iteration {step:6d}(   1)  {'-' * 39}",
            force_block(structure, forces),
            "  FREE ENERGIE OF THE ION-ELECTRON SYSTEM (eV)",
            "  ---------------------------------------------------",
            f"  free  energy   TOTEN  = {energy:18.8f} eV",
            "",
            f"  energy  without entropy= {energy:18.8f}  energy(sigma->0) = {energy:18.8f}",
        ]
        if tangent is not None:
            body.append(f"  NEB: projections on to tangent (spring, REAL) {0.0:12.6f} {tangent:12.6f}")
            body.append(f"  FORCES: max atom, RMS {abs(force):12.6f} {abs(force) / math.sqrt(n):12.6f}")
    tail = ([REACHED] if reached else []) + [FINISHED, "  Total CPU time used (sec):        0.000"]
    return "\n".join([*head, *body, *tail, ""])


def step_energies(final: float, n_steps: int, converged: bool) -> list[float]:
    """Energies of the ionic steps, approaching `final` (still 10 meV above it when never converging)."""
    last = final if converged else final + 0.01
    return [last + 0.05 * 0.5**k for k in range(n_steps - 1, 0, -1)] + [last]


def run_neb(incar: Incar, n_images: int) -> None:
    """NEB mode."""
    dirs = [Path(f"{i:02d}") for i in range(n_images + 2)]
    for d in dirs:
        if not (d / "POSCAR").is_file():
            die(f"ERROR: {d}/POSCAR not found (IMAGES = {n_images})")
    poscars = [Poscar.from_file(d / "POSCAR") for d in dirs]
    if len({len(p.structure) for p in poscars}) != 1:
        die("ERROR: the images have different numbers of ions")
    nelect = float(incar.get("NELECT", check_inputs(Path("."), poscars[0])))
    barrier = float(os.environ.get("HOPFLOW_FAKE_VASP_BARRIER", DEFAULT_BARRIER))
    path = Path1D(poscars[0].structure, poscars[-1].structure, barrier)
    interrupt = os.environ.get("HOPFLOW_FAKE_VASP_INTERRUPT")
    never = os.environ.get("HOPFLOW_FAKE_VASP_NEVER_CONVERGE") == "1"
    n_steps = int(incar.get("NSW", CONVERGED_STEPS)) if never else CONVERGED_STEPS
    print(VERSION_LINE)
    print(f" running on    1 total cores; each image on    1 cores; {n_images} images")
    if interrupt:
        n_write = n_images if interrupt == "all" else min(int(interrupt), n_images)
        for i in range(1, n_write + 1):
            current = poscars[i].structure
            target = path.relaxed(path.coordinate(current), i)
            partially_relaxed(current, target).to(filename=str(dirs[i] / "CONTCAR"), fmt="poscar")
            (dirs[i] / "OUTCAR").write_text(VERSION_LINE + "\n (run killed before the first ionic step finished)\n")
        print(" DAV:   1    -0.1E+03  (killed)")
        sys.stdout.flush()
        sys.exit(KILLED_EXIT)
    for i in range(1, n_images + 1):
        s = path.coordinate(poscars[i].structure)
        relaxed = path.relaxed(s, i)
        relaxed.to(filename=str(dirs[i] / "CONTCAR"), fmt="poscar")
        energy = path.energy(s)
        text = outcar_text(
            relaxed,
            step_energies(energy, n_steps, not never),
            UNCONVERGED_FORCE if never else CONVERGED_FORCE,
            path.moving,
            incar,
            nelect,
            path.tangent_force(s),
            reached=not never,
        )
        (dirs[i] / "OUTCAR").write_text(text)
    for step in range(1, n_steps + 1):
        print(f" {step:4d} F= {path.e_ref:.8E} E0= {path.e_ref:.8E}  d E =0.000000E+00")
    if not never:
        print(REACHED)


def run_single(incar: Incar) -> None:
    """Single-point mode: the endpoint energy E_ref."""
    if not Path("POSCAR").is_file():
        die("ERROR: file POSCAR not found")
    poscar = Poscar.from_file("POSCAR")
    nelect = float(incar.get("NELECT", check_inputs(Path("."), poscar)))
    structure = poscar.structure
    energy = E_ATOM * len(structure)
    print(VERSION_LINE)
    print(f"   1 F= {energy:.8E} E0= {energy:.8E}  d E =0.000000E+00")
    structure.to(filename="CONTCAR", fmt="poscar")
    Path("OUTCAR").write_text(outcar_text(structure, [energy], 0.0, 0, incar, nelect, None, reached=False))


def main() -> None:
    """Run as VASP would, in the current directory."""
    if not Path("INCAR").is_file():
        die("ERROR: file INCAR not found")
    incar = Incar.from_file("INCAR")
    n_images = int(incar.get("IMAGES", 0))
    log_invocation("neb" if n_images else "single")
    maybe_fail(incar)
    if n_images > 0:
        run_neb(incar, n_images)
    else:
        run_single(incar)


if __name__ == "__main__":
    main()
