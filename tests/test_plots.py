"""Plots: an energy profile with its barrier and a leaderboard, written as valid PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np

from hopflow.tasks.engines import BarrierResult
from hopflow.tasks.engines.base import checked_fields
from hopflow.tasks.plots import LeaderboardRow, plot_energy_profile, plot_leaderboard

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def result(converged: bool = True) -> BarrierResult:
    s = np.linspace(0.0, 1.0, 5)
    rel = tuple(float(0.4 * np.sin(np.pi * x) ** 2 - 0.1 * x) for x in s)  # the end lies 0.1 eV below the start
    energies = tuple(-475.0 + e for e in rel)
    return BarrierResult(
        engine="vasp-neb", engine_version="1", energies=energies, relative_energies=rel,
        reaction_coordinate=tuple(float(x * 2.73) for x in s), **checked_fields(energies, converged, 0.02),
        converged=converged, max_forces=(0.0, 0.01, 0.01, 0.01, 0.0), n_images=3, moving_index=94,
    )


def read_png(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 0 and pixels.shape[1] > 0
    assert pixels.std() > 0  # something was drawn
    return pixels


def test_energy_profile_png(tmp_path) -> None:
    out = plot_energy_profile(result(), tmp_path / "plots" / "profile.png")
    assert out == tmp_path / "plots" / "profile.png"
    converged = read_png(out)
    unconverged = read_png(plot_energy_profile(result(converged=False), tmp_path / "open.png"))
    assert converged.shape == unconverged.shape
    assert not np.array_equal(converged, unconverged)  # the barrier line and label only on the converged one


def test_leaderboard_png_grows_with_rows(tmp_path) -> None:
    rows = [
        LeaderboardRow("CaF2", 0.25, "mlip-neb", 2.73),
        LeaderboardRow("PbF2", 0.18, "mlip-idpp", 2.97),
        LeaderboardRow("LaF3", None, "mlip-neb"),
        LeaderboardRow("BaF2", 0.31, "vasp-neb", 3.10),
    ]
    few = read_png(plot_leaderboard(rows[:1], tmp_path / "one.png"))
    many = read_png(plot_leaderboard(rows * 5, tmp_path / "many.png"))
    assert many.shape[0] > few.shape[0]  # one row of bars per structure
    read_png(plot_leaderboard([], tmp_path / "empty.png"))  # an empty leaderboard is still a picture
