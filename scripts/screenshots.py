"""The README's pictures, made by the project itself: a small screen (CaF2, KMgF3), its HTML report in headless
Chromium, and the controller's artifacts in the Prefect UI of a throw-away server.

    python scripts/screenshots.py [--home DIR]   # DIR: reuse a home that was screened already

Writes docs/report.png and docs/prefect-ui-artifacts.png (each kept under 300 KB)."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
SMALL = {"HOPFLOW_SUPERCELL_MIN_LENGTH": "7", "HOPFLOW_SUPERCELL_MIN_ATOMS": "1", "HOPFLOW_NIMAGES": "3",
         "HOPFLOW_SCREEN_TOP": "3", "HOPFLOW_DASK_PROFILE": "local-threads"}
MAX_BYTES = 300_000
CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def screen(home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOPFLOW_", "PREFECT_API_URL"))}
    env.update(SMALL, HOPFLOW_HOME=str(home), PREFECT_HOME=str(home / "prefect"))
    subprocess.run([str(BIN / "hopflow"), "screen", "--structure", "CaF2", "--structure", "KMgF3"], cwd=ROOT,
                   env=env, check=True)


def shoot(url: str, out: Path, size: tuple[int, int], wait_ms: int) -> None:
    """A headless Chromium screenshot, then shrunk (palette PNG, halved if need be) below MAX_BYTES."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as profile:
        raw = Path(profile) / "shot.png"
        subprocess.run([*CHROMIUM, f"--user-data-dir={profile}/p", f"--window-size={size[0]},{size[1]}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={raw}", url], check=True,
                       capture_output=True, timeout=180)
        image = Image.open(raw).convert("RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
        if out.stat().st_size < MAX_BYTES:
            break
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
    print(f"{out.relative_to(ROOT)}: {out.stat().st_size // 1000} KB")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefect_ui(home: Path, out: Path) -> None:
    """A Prefect server with its UI on a free port; the controller's artifacts published into it; the overview
    artifact's page photographed."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = {**os.environ, "PREFECT_HOME": str(home / "prefect-ui"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "PREFECT_UI_API_URL": api, "PREFECT_UI_ENABLED": "true"}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        env = {**os.environ, "HOPFLOW_HOME": str(home), "PREFECT_API_URL": api, "PYTHONPATH": str(ROOT)}
        env.pop("HOPFLOW_DATABASE_URL", None)
        publish = ("from prefect.client.orchestration import get_client\n"
                   "from hopflow.flows import artifacts, mirror\nfrom hopflow.flows import controller as ctl\n"
                   "from hopflow.flows.artifacts import OVERVIEW_KEY\n"
                   "from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey\n"
                   "with get_client(sync_client=True) as c:\n"
                   "    report = ctl.TickReport((), (), (), {}, mirror.MirrorReport(), 0.0)\n"
                   "    artifacts.publish_artifacts(c, None, report)\n"
                   "    key = ArtifactFilterKey(any_=[OVERVIEW_KEY])\n"
                   "    (a,) = c.read_artifacts(artifact_filter=ArtifactFilter(key=key))\n"
                   "    print(a.id)\n")
        artifact = subprocess.run([sys.executable, "-c", publish], cwd=ROOT, env=env, check=True,
                                  capture_output=True, text=True).stdout.split()[-1]
        shoot(f"http://127.0.0.1:{port}/artifacts/artifact/{artifact}", out, (1400, 2000), 20000)
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="A HOPFLOW_HOME that `hopflow screen` filled already.")
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    home = args.home or Path(tempfile.mkdtemp(prefix="hopflow-shots-"))
    if args.home is None:
        screen(home)
    shoot((home / "report.html").resolve().as_uri(), DOCS / "report.png", (1300, 1900), 5000)
    prefect_ui(home, DOCS / "prefect-ui-artifacts.png")


if __name__ == "__main__":
    main()
