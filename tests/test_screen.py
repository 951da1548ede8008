"""A cut-down main job (CaF2 and the ternary KMgF3, CHGNet on the CPU, small cells) judged as a scientist would: no
trusted barrier is implausibly small, every leaderboard row carries a flag, the per-material table is printed, and the
controller's artifacts on a real Prefect server list the command line's rows in the same order."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hopflow.cli.main import app
from hopflow.flows import artifacts, mirror
from hopflow.flows import controller as ctl
from hopflow.settings import get_settings

from prefect_helpers import latest_artifact

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.prefect]

SMALL = {"HOPFLOW_SUPERCELL_MIN_LENGTH": "7", "HOPFLOW_SUPERCELL_MIN_ATOMS": "1", "HOPFLOW_NIMAGES": "3",
         "HOPFLOW_SCREEN_TOP": "4", "HOPFLOW_DASK_PROFILE": "local-threads"}
"""Small vacancy cells (CaF2 23 atoms, KMgF3 39), 3 images, the 4 best-ranked pathways and Dask worker threads in
this process (one model load) keep this quick."""
SMALLEST_BELIEVABLE = 0.01
"""eV: a trusted fluoride hop barrier below this is an artefact (endpoints that are not minima)."""


def test_cut_down_screen_gives_flagged_believable_rows(monkeypatch, prefect_client) -> None:  # noqa: F811
    for key, value in SMALL.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    runner = CliRunner()
    result = runner.invoke(app, ["screen", "--structure", "CaF2", "--structure", "KMgF3"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "E*" in result.output and "KMgF3" in result.output and "CaF2" in result.output  # per-material table

    pathways = json.loads(runner.invoke(app, ["leaderboard", "--json"]).stdout)
    materials = json.loads(runner.invoke(app, ["leaderboard", "--json", "--by", "structure"]).stdout)
    assert pathways and {m["formula"] for m in materials} == {"CaF2", "KMgF3"}
    assert all(row["flag"] for row in pathways)
    trusted = [row for row in pathways if row["flag"] == "ok"]
    assert trusted, "no trusted barrier at all"
    assert all(row["barrier"] >= SMALLEST_BELIEVABLE for row in trusted)
    assert all(row["barrier"] is None for row in pathways if row["flag"] != "ok")

    artifacts.publish_artifacts(prefect_client, None, ctl.TickReport((), (), (), {}, mirror.MirrorReport(), 0.0))
    size = artifacts.LEADERBOARD_SIZE
    assert json.loads(latest_artifact(prefect_client, artifacts.LEADERBOARD_KEY).data) == pathways[:size]
    assert json.loads(latest_artifact(prefect_client, artifacts.MATERIALS_KEY).data) == materials[:size]
