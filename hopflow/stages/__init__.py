"""The built-in stages, one module each (input query, typed parameters, rankers, cutoffs, load, store); importing
this package registers them."""

from hopflow.engines import engine_parameters
from hopflow.stages.barriers import BARRIER_COLUMNS, barrier_values, learning_rankers
from hopflow.stages.estimates import ESTIMATES, EstimatesParams, physics_score
from hopflow.stages.features import FEATURE_COLUMNS, FEATURES, FeaturesParams, ImageParams
from hopflow.stages.neb import NEB, NebParams
from hopflow.stages.pathways import (
                                     PATHWAY_FIELDS,
                                     PATHWAYS,
                                     PathwaysParams,
                                     lattice_parameters,
                                     pathway_fields,
                                     pathway_producer,
                                     structure_producer,
)
from hopflow.stages.structures import IMPORT, ImportParams
from hopflow.stages.synthetic import SYNTHETIC, SyntheticParams
from hopflow.stages.vacancies import VACANCIES, VACANCY_COLUMNS, VacancyParams, vacancy_parameters

__all__ = [
    "BARRIER_COLUMNS", "ESTIMATES", "FEATURES", "FEATURE_COLUMNS", "IMPORT", "NEB", "PATHWAYS", "PATHWAY_FIELDS",
    "SYNTHETIC", "VACANCIES", "VACANCY_COLUMNS", "EstimatesParams", "FeaturesParams", "ImageParams", "ImportParams",
    "NebParams", "PathwaysParams", "SyntheticParams", "VacancyParams", "barrier_values", "engine_parameters",
    "lattice_parameters", "learning_rankers", "pathway_fields", "pathway_producer", "physics_score",
    "structure_producer", "vacancy_parameters",
]
