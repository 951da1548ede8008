"""FAKE POTCAR files for tests: headers that pymatgen's Potcar parser reads, no pseudopotential data (VASP's are
licensed).

Written in the PMG_VASP_PSP_DIR layout: <root>/POT_GGA_PAW_PBE/<symbol>/POTCAR. Run as a script to write one:
`python tests/fake_vasp/fake_potcar.py DIR Ca_sv F`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pymatgen.core import Element

FUNCTIONAL_DIR = "POT_GGA_PAW_PBE"  # pymatgen's PotcarSingle.functional_dir["PBE"]

# Valence electrons (ZVAL) of the PBE PAW datasets pymatgen's MP sets use, for the symbols the tests need.
ZVAL = {"Ca_sv": 10, "F": 7, "Sr_sv": 10, "Ba_sv": 10, "Li_sv": 3, "Na_pv": 7, "Mg_pv": 8, "La": 11, "Pb_d": 14}

TEMPLATE = """  PAW_PBE {symbol} 01Jan2000 FAKE-HOPFLOW-TEST
 {zval:.11f}
 parameters from PSCTR are:
   VRHFIN ={element}: FAKE POTCAR for hopflow tests, not a VASP pseudopotential
   LEXCH  = PE
   EATOM  =   100.0000 eV,    7.3499 Ry

   TITEL  = PAW_PBE {symbol} 01Jan2000
   LULTRA =        F    use ultrasoft PP ?
   IUNSCR =        1    unscreen: 0-lin 1-nonlin 2-no
   RPACOR =    1.200    partial core radius
   POMASS = {mass:8.3f}; ZVAL   = {zval:8.3f}    mass and valenz
   RCORE  =    1.500    outmost cutoff radius
   RWIGS  =    1.400; RWIGS  =    0.741    wigner-seitz radius (au A)
   ENMAX  =  400.000; ENMIN  =  300.000 eV
   LCOR   =        T    correct aug charges
   LPAW   =        T    paw PP
   EAUG   =  600.000
 END of PSCTR-controll parameters
 FAKE POTCAR: placeholder numbers below, no pseudopotential data
   0.00000000E+00   0.00000000E+00   0.00000000E+00
 End of Dataset
"""


def fake_potcar_text(symbol: str, zval: float | None = None) -> str:
    """The text of one FAKE POTCAR dataset for a symbol such as 'Ca_sv'."""
    element = Element(symbol.split("_")[0])
    valence = float(zval if zval is not None else ZVAL[symbol])
    return TEMPLATE.format(symbol=symbol, element=element.symbol, zval=valence, mass=float(element.atomic_mass))


def write_fake_psp_dir(root: Path, symbols: list[str] | tuple[str, ...]) -> Path:
    """Write FAKE POTCARs for `symbols` under `root` in the PMG_VASP_PSP_DIR layout; returns `root`."""
    for symbol in symbols:
        target = root / FUNCTIONAL_DIR / symbol / "POTCAR"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(fake_potcar_text(symbol))
    return root


if __name__ == "__main__":
    write_fake_psp_dir(Path(sys.argv[1]), sys.argv[2:])
