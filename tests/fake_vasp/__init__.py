"""The VASP stand-in (NOT VASP) and FAKE POTCARs used by the vasp-neb tests."""
