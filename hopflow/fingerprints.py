"""Content identities (no row ids) of the items the pathway-derived stages take: the cache key's input part."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

COORD_DECIMALS = 4
"""Fractional coordinates in a fingerprint are rounded to this many decimals."""
LATTICE_DECIMALS = 3
"""Lattice lengths (Å) and angles (°) in a fingerprint are rounded to this many decimals."""


def _digest(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:40]


def _rounded(values: Sequence[float], decimals: int) -> str:
    # + 0.0 turns -0.0 into 0.0, so that a coordinate's sign of zero never changes an identity
    return ",".join(f"{round(float(v), decimals) + 0.0:.{decimals}f}" for v in values)


def pathway_fingerprint(structure_fingerprint: str, lattice: Sequence[float], ion: str, start_frac: Sequence[float],
                        end_frac: Sequence[float]) -> str:
    """A hop's identity: its structure's fingerprint and lattice (a, b, c, α, β, γ), the ion and the hop's end
    points in the stored cell."""
    return _digest("pathway", structure_fingerprint, _rounded(lattice, LATTICE_DECIMALS), ion,
                   _rounded(start_frac, COORD_DECIMALS), _rounded(end_frac, COORD_DECIMALS))


def vacancy_site_fingerprint(structure_fingerprint: str, lattice: Sequence[float], supercell: str,
                             site_frac: Sequence[float]) -> str:
    """A vacancy site's identity: its structure's fingerprint and lattice, the supercell matrix and the removed site's
    fractional coordinates in the stored cell."""
    return _digest("vacancy", structure_fingerprint, _rounded(lattice, LATTICE_DECIMALS), supercell,
                   _rounded(site_frac, COORD_DECIMALS))
