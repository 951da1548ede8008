"""The report of a small real run, as a user gets it: `hopflow screen` (CaF2 and the ternary KMgF3 through estimates,
CHGNet on the CPU, batch mode with its own temporary Prefect server, offline) prints no ERROR line and logs none, ends
with the per-material table and the report's path; the report loads in headless Chromium with no request leaving the
file, shows the leaderboard and embedded energy profiles, and a file name made of markup is shown as text."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hopflow.report import CSP

ROOT = Path(__file__).resolve().parents[1]
HOPFLOW = str(Path(sys.executable).with_name("hopflow"))
HOSTILE_NAME = "<img src=x onerror=alert(1)>[bold]x.cif"
"""A legal Linux file name (no `/`) that is HTML and rich markup at once."""
SMALL = {"HOPFLOW_SUPERCELL_MIN_LENGTH": "7", "HOPFLOW_SUPERCELL_MIN_ATOMS": "1", "HOPFLOW_NIMAGES": "3",
         "HOPFLOW_SCREEN_TOP": "3", "HOPFLOW_DASK_PROFILE": "local-threads"}
"""Small vacancy cells, 3 images, the 3 best-ranked pathways, Dask worker threads in the command's process."""
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-default-apps",
                  "--disable-domain-reliability", "--window-size=1400,1000", "--virtual-time-budget=5000"]
ERROR_LINE = re.compile(r"^.*\bERROR\b.*$", re.MULTILINE)


@dataclass(frozen=True)
class Screened:
    home: Path
    output: str
    report: Path
    log: Path


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        raise RuntimeError("chromium is not installed: .ci/run installs Debian's `chromium` package")
    return found


@pytest.fixture(scope="module")
def screened(tmp_path_factory) -> Screened:
    """`hopflow import <hostile file>` then `hopflow screen --structure CaF2 --structure KMgF3` in a fresh home, no
    Prefect API configured (batch mode starts its own server) and analytics left to hopflow."""
    from pymatgen.io.cif import CifWriter

    from hopflow.tasks.structures import bundled_inputs, parse_input

    base = tmp_path_factory.mktemp("report")
    home = base / "home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "HOPFLOW_DATABASE_URL")
           and not k.startswith("HOPFLOW_")}
    env.update(SMALL, HOPFLOW_HOME=str(home), PREFECT_HOME=str(base / "prefect"), COLUMNS="200", PYTHONPATH=str(ROOT))
    (caf2,) = [r for r in bundled_inputs() if r.location == "CaF2"]
    hostile = base / "inputs" / HOSTILE_NAME
    hostile.parent.mkdir()
    CifWriter(parse_input(caf2)).write_file(hostile)
    imported = subprocess.run([HOPFLOW, "import", str(hostile)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    done = subprocess.run([HOPFLOW, "screen", "--structure", "CaF2", "--structure", "KMgF3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    joined = "".join(done.stdout.split())  # paths hold no spaces; a line rich wrapped or a bar beside it still match
    report = home / "report.html"
    assert f"report:{report}" in joined, output[-5000:]
    found = re.search(r"Prefectlogs:(\S+?\.log)", joined)
    assert found is not None, output[-5000:]
    log = Path(found.group(1))
    return Screened(home=home, output=output, report=report, log=log)


def test_screen_prints_no_error_ends_with_materials_and_the_report_path(screened) -> None:
    assert not ERROR_LINE.findall(screened.output), ERROR_LINE.findall(screened.output)
    logged = screened.log.read_text()
    assert "Beginning flow run" in logged and "Starting temporary server" in logged  # the file has Prefect's logs
    assert not ERROR_LINE.findall(logged), ERROR_LINE.findall(logged)[:5]
    assert "Beginning flow run" not in screened.output  # ... and the terminal has none of them
    tail = screened.output.strip().splitlines()
    assert tail[-1] == f"report: {screened.report}"
    materials_title = max(i for i, line in enumerate(tail) if "materials: percolation barriers" in line)
    assert all("leaderboard: best barrier" not in line for line in tail[materials_title:])  # materials come last
    assert screened.report == screened.home / "report.html" and screened.report.stat().st_size > 0


def test_report_renders_offline_in_headless_chromium(screened, tmp_path) -> None:
    html = screened.report.read_text()
    assert f'content="{CSP}"' in html  # the page itself forbids every load but data: images and inline styles
    assert not re.search(r"""(?:src|href|srcset)\s*=\s*["']?\s*(?:https?:)?//""", html, re.IGNORECASE)
    url = screened.report.resolve().as_uri()
    profile = tmp_path / "chromium"
    shot, netlog = tmp_path / "report.png", tmp_path / "netlog.json"
    subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                    f"--log-net-log={netlog}", url], capture_output=True, timeout=120, check=True)
    dom = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120, check=True).stdout

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1000, 1400) and pixels.std() > 10, "blank screenshot"

    page = Page()
    page.feed(dom)
    assert "leaderboard" in page.table_ids
    profiles = [img for img in page.images if img.get("class") == "profile"]
    assert profiles and all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    assert {"CaF2", "KMgF3"} <= set(page.texts)

    assert page_requests(netlog) == [], "the page asked the network for something"


def test_file_name_of_markup_is_shown_as_text(screened, tmp_path) -> None:
    dom = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom",
                          screened.report.resolve().as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    page = Page()
    page.feed(dom)
    sources = [t for t in page.texts if HOSTILE_NAME in t]
    assert sources, "the hostile file's name is not on the page"
    assert "&lt;img src=x onerror=alert(1)&gt;[bold]x.cif" in dom
    assert not [img for img in page.images if img.get("src") == "x" or "onerror" in img]


def page_requests(netlog: Path) -> list[str]:
    """URLs the page (a file:// document) requested, from Chromium's net log; Chromium's own background requests
    (isolation key not the file) are left out."""
    log = json.loads(netlog.read_text())
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    return [e["params"]["url"] for e in log["events"]
            if names.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in e.get("params", {})
            and "file://" in str(e["params"].get("network_isolation_key", ""))]


class Page(HTMLParser):
    """The parts of a DOM dump the tests look at: img attributes, table ids, text nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.table_ids: list[str] = []
        self.texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(found)
        if tag == "table" and "id" in found:
            self.table_ids.append(found["id"])

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.texts.append(data.strip())
