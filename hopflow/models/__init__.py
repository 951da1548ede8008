"""All tables of hopflow; importing this module registers every model on `Base.metadata`."""

from hopflow.models.archives import Archive
from hopflow.models.barriers import Estimate, NebResult
from hopflow.models.core import Run, RunState, Score, Source, StageSetting, Structure
from hopflow.models.learning import BarrierModelRow, CalibrationRow
from hopflow.models.pathways import Features, Pathway
from hopflow.models.synthetic import SyntheticItem, SyntheticResult
from hopflow.models.vacancies import Vacancy, VacancySite

__all__ = [
    "Archive",
    "BarrierModelRow",
    "CalibrationRow",
    "Estimate",
    "Features",
    "NebResult",
    "Pathway",
    "Run",
    "RunState",
    "Score",
    "Source",
    "StageSetting",
    "Structure",
    "SyntheticItem",
    "SyntheticResult",
    "Vacancy",
    "VacancySite",
]
