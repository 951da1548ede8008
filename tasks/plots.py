"""PNG plots of barrier results: one pathway's energy profile, and a leaderboard of barriers by structure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hopflow.tasks.engines.base import BarrierResult  # noqa: E402

DPI = 120
PROFILE_SIZE = (6.0, 4.0)  # inches
LEADERBOARD_WIDTH = 7.0  # inches
LEADERBOARD_ROW_HEIGHT = 0.35  # inches per structure
LEADERBOARD_MIN_HEIGHT = 2.5  # inches
SMOOTH_POINTS = 200


@dataclass(frozen=True)
class LeaderboardRow:
    """One structure's best barrier for the leaderboard."""

    label: str
    """Structure label, e.g. the formula with an id."""
    barrier: float | None
    """Barrier in eV; None (not converged or not computed) is listed as missing."""
    engine: str = ""
    """Engine that produced the barrier (colours the bar)."""
    hop_length: float | None = None
    """Hop length in Å, shown beside the label when given."""


def profile_file_name(formula: str, structure_id: int, pathway_id: int, engine: str, model: str | None = None) -> str:
    """File name of an energy profile by material and pathway (never by result row id): formula, structure,
    pathway, engine and the model's family, e.g. `CaF2-s1-p3-mlip-idpp-chgnet.png`; only [A-Za-z0-9._-] kept."""
    parts = [formula, f"s{structure_id}", f"p{pathway_id}", engine]
    if model:
        parts.append(model.split("-")[0])
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(parts)) + ".png"


def _smooth_profile(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A monotone cubic through the images (no overshoot beyond the computed energies)."""
    from scipy.interpolate import PchipInterpolator

    if len(x) < 3 or np.any(np.diff(x) <= 0):
        return x, y
    xs = np.linspace(x[0], x[-1], SMOOTH_POINTS)
    return xs, PchipInterpolator(x, y)(xs)


def plot_energy_profile(result: BarrierResult, path: Path | str, title: str | None = None) -> Path:
    """Relative energy of each image along the reaction coordinate, the barrier marked; writes a PNG at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.asarray(result.reaction_coordinate, dtype=float)
    energies = np.asarray(result.energies, dtype=float)
    lower = float(min(energies[0], energies[-1]))
    y = energies - lower  # the barrier counts from the lower endpoint
    fig, ax = plt.subplots(figsize=PROFILE_SIZE)
    try:
        xs, ys = _smooth_profile(x, y)
        ax.plot(xs, ys, "-", color="0.4", linewidth=1.5)
        ax.plot(x, y, "o", color="tab:blue", markersize=7, label="images")
        if result.barrier is not None:
            top = int(np.argmax(y))
            ax.axhline(result.barrier, color="tab:red", linestyle="--", linewidth=1)
            ax.annotate(
                f"barrier {result.barrier:.3f} eV",
                xy=(x[top], result.barrier),
                xytext=(0, 8),
                textcoords="offset points",
                ha="center",
                color="tab:red",
            )
        else:
            ax.text(0.5, 0.92, f"{result.flag}: no barrier", transform=ax.transAxes, ha="center", color="tab:red")
        ax.axhline(0.0, color="0.7", linewidth=0.8)
        ax.set_xlabel("reaction coordinate (Å)")
        ax.set_ylabel("energy above the lower endpoint (eV)")
        ax.set_title(title or f"{result.engine}: {result.n_images} images")
        ax.margins(y=0.2)
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


def plot_leaderboard(rows: Sequence[LeaderboardRow], path: Path | str, title: str = "Migration barriers") -> Path:
    """Horizontal bars of barriers by structure, lowest first, coloured by engine; writes a PNG at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ranked = sorted(rows, key=lambda r: (r.barrier is None, r.barrier if r.barrier is not None else 0.0))
    height = max(LEADERBOARD_MIN_HEIGHT, LEADERBOARD_ROW_HEIGHT * len(ranked) + 1.2)
    fig, ax = plt.subplots(figsize=(LEADERBOARD_WIDTH, height))
    try:
        if not ranked:
            ax.text(0.5, 0.5, "no barriers yet", transform=ax.transAxes, ha="center", va="center")
            ax.set_axis_off()
        else:
            engines = sorted({r.engine for r in ranked})
            colours = {e: plt.cm.tab10(i % 10) for i, e in enumerate(engines)}
            positions = np.arange(len(ranked))[::-1]  # lowest barrier on top
            for pos, row in zip(positions, ranked, strict=True):
                if row.barrier is None:
                    ax.text(0.0, pos, "  not converged", va="center", color="0.4", fontsize=8)
                    continue
                ax.barh(pos, row.barrier, color=colours[row.engine], label=row.engine or None)
                ax.text(row.barrier, pos, f" {row.barrier:.3f}", va="center", fontsize=8)
            labels = [r.label + (f" ({r.hop_length:.2f} Å)" if r.hop_length is not None else "") for r in ranked]
            ax.set_yticks(positions, labels)
            ax.set_xlabel("barrier (eV)")
            handles, names = ax.get_legend_handles_labels()
            unique = dict(zip(names, handles, strict=True))
            if unique:
                ax.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8)
            ax.margins(x=0.15)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path
