"""TEST STAND-IN for the Materials Project web API: serves documents built from pymatgen structures, no network."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pymatgen.core import Structure

from hopflow.tasks.structures import MPCriteria, RawInput, mp_raw_input


class FakeMaterialsProject:
    """The Materials Project as the tests see it: documents built from pymatgen structures.

    Filters by the same criteria the server applies, so callers exercise the real query path.
    """

    def __init__(self, documents: Sequence[tuple[str, Structure, float | None]]) -> None:
        self._documents = list(documents)
        self.queries: list[MPCriteria] = []

    @classmethod
    def from_structures(cls, structures: Iterable[Structure], energy_above_hull: float = 0.0) -> FakeMaterialsProject:
        """Documents with ids mp-fake-1, mp-fake-2 ... and one energy above hull for all."""
        return cls([(f"mp-fake-{i}", s, energy_above_hull) for i, s in enumerate(structures, start=1)])

    def search(self, criteria: MPCriteria) -> list[RawInput]:
        """Raw inputs for the stored documents that match `criteria`."""
        self.queries.append(criteria)
        hits = [mp_raw_input(mid, s, e) for mid, s, e in self._documents if criteria.matches(s, e)]
        return hits[: criteria.limit] if criteria.limit else hits
