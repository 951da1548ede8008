"""Barrier engines behind one interface: `compute_barrier("mlip-idpp" | "mlip-neb" | "vasp-neb", images, workdir)`."""

from hopflow.tasks.engines import mlip, vasp
from hopflow.tasks.engines.base import (
    ENGINES,
    BarrierResult,
    Correction,
    Engine,
    PreparedInputs,
    Timings,
    compute_barrier,
    get_engine,
)

__all__ = [
    "ENGINES",
    "BarrierResult",
    "Correction",
    "Engine",
    "PreparedInputs",
    "Timings",
    "compute_barrier",
    "get_engine",
    "mlip",
    "vasp",
]
