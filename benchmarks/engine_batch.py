"""The ML potential alone on precomputed hop images: energies one image per call against batches of images per call,
on the CPU or a GPU (the accelerator figure of the cheap path).

    python -m benchmarks.engine_batch prepare [--out FILE] [--structures CaF2 …]  # here: hopflow builds the images
    python -m benchmarks.engine_batch run [FILE] [--device cuda] [--batch 1 4 16 64] [--rounds 3]

`run` imports only torch, CHGNet and the pymatgen CHGNet itself needs, so a GPU machine with nothing else installed can
run it on a file `prepare` wrote here. Each round times every batch size once, in turn (interleaved), over all images;
the energies of every batch size must agree with one image per call to BATCH_TOLERANCE, or the run fails.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_FILE = Path(__file__).resolve().parent / "results" / "engine_images.json.gz"
DEFAULT_STRUCTURES = ("CaF2", "LiF", "KMgF3", "PbClF", "CeF3", "Na3AlF6")
"""The cheap path's four, and two of the bundled set's larger vacancy cells."""
BATCH_TOLERANCE = 1e-5
"""eV per atom: a batched energy may differ from a one-image call by float32 summation order, no more."""


def prepare(out: Path, structures: list[str]) -> None:
    """Write the IDPP images (pymatgen dicts) of every pathway of the named bundled structures, as the cheap path
    builds them under the default settings."""
    from hopflow.errors import InputError
    from hopflow.settings import get_settings
    from hopflow.tasks.images import hop_images
    from hopflow.tasks.pathways import find_pathways
    from hopflow.tasks.structures import bundled_inputs, parse_input, sanitize

    settings = get_settings()
    paths: list[dict[str, Any]] = []
    for raw in bundled_inputs():
        if raw.location not in structures:
            continue
        structure = sanitize(parse_input(raw), ion=settings.migrating_ion, max_sites=settings.max_sites).structure
        for record in find_pathways(structure, ion=settings.migrating_ion, max_hop=settings.max_hop,
                                    max_paths=settings.max_paths, max_sites=settings.max_sites):
            try:
                images = hop_images(structure, record).images
            except InputError as exc:  # a path the cheap path would fail on its own (more than one ion moves)
                print(f"{raw.location}: left out: {exc}")
                continue
            paths.append({"structure": raw.location, "images": [image.as_dict() for image in images]})
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt") as stream:
        json.dump(paths, stream)
    atoms = sum(len(p["images"][0]["sites"]) * len(p["images"]) for p in paths)
    print(f"{len(paths)} pathways, {sum(len(p['images']) for p in paths)} images, {atoms} atoms -> {out}")


def energies(model: Any, structures: list[Any], batch: int) -> list[float]:
    """Energy per atom of each structure, `batch` structures per CHGNet call."""
    predicted = model.predict_structure(structures, task="e", batch_size=batch)
    return [float(p["e"]) for p in (predicted if isinstance(predicted, list) else [predicted])]


def run(path: Path, device: str, batches: list[int], rounds: int) -> None:
    """Time energies of all images at each batch size, interleaved over `rounds`, and print images per second."""
    import torch
    from chgnet.model import CHGNet
    from pymatgen.core import Structure

    with gzip.open(path, "rt") as stream:
        paths = json.load(stream)
    structures = [Structure.from_dict(image) for p in paths for image in p["images"]]
    atoms = sum(len(s) for s in structures)
    model = CHGNet.load(model_name="0.3.0", use_device=device, verbose=False)
    reference = energies(model, structures, 1)  # also the warm-up: first calls compile nothing, but allocate
    seconds: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(rounds):
        for batch in batches:
            if device == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            values = energies(model, structures, batch)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[batch].append(time.perf_counter() - began)
            worst = max(abs(a - b) for a, b in zip(values, reference, strict=True))
            if worst > BATCH_TOLERANCE:
                raise SystemExit(f"batch {batch}: energies differ from one image per call by {worst:.2e} eV/atom")
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"CHGNet energies of {len(structures)} images ({atoms} atoms, {len(paths)} pathways) on {name}; "
          f"{rounds} interleaved rounds, median [min-max]")
    base = statistics.median(seconds[batches[0]])
    print(f"  {'images per call':>15} {'seconds':>22} {'images/s':>9} {'atoms/s':>9} {'speed-up':>9}")
    for batch in batches:
        median = statistics.median(seconds[batch])
        spread = f"{median:.2f} [{min(seconds[batch]):.2f}-{max(seconds[batch]):.2f}]"
        print(f"  {batch:>15} {spread:>22} {len(structures) / median:>9.1f} {atoms / median:>9.0f} "
              f"{base / median:>8.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("prepare", help="Write the images of bundled structures (needs hopflow).")
    make.add_argument("--out", type=Path, default=DEFAULT_FILE)
    make.add_argument("--structures", nargs="*", default=list(DEFAULT_STRUCTURES))
    timing = commands.add_parser("run", help="Time CHGNet on the images (needs torch and chgnet only).")
    timing.add_argument("file", type=Path, nargs="?", default=DEFAULT_FILE)
    timing.add_argument("--device", choices=("cpu", "cuda"), default=None, help="Default: cuda when present.")
    timing.add_argument("--batch", type=int, nargs="*", default=[1, 4, 16, 64], help="Images per call; the first "
                        "is the baseline.")
    timing.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out, args.structures)
        return
    import torch

    run(args.file, args.device or ("cuda" if torch.cuda.is_available() else "cpu"), args.batch, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
