"""CHGNet engines on CaF2's shortest F-vacancy hop: mlip-idpp single points and mlip-neb climbing-image NEB."""

from __future__ import annotations

import math
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from tasks.engines import BarrierResult, compute_barrier
from tasks.engines.mlip import FINAL_IMAGES_FILE, load_model, pick_device
from tasks.images import HopImages, hop_images
from tasks.pathways import find_pathways
from tests.test_engines_vasp import CAF2_A, caf2_hop

EXPERIMENT_RANGE = (0.35, 0.55)  # eV, F-vacancy migration in CaF2 (ENVIRONMENT.md); universal MLIPs come out softer
ACCEPTED_RANGE = (0.1, 0.6)  # eV, what the acceptance criterion allows for CHGNet


@cache
def caf2_small_hop() -> HopImages:
    """The same hop in one conventional cell (11 atoms): enough for tests of the unconverged paths."""
    structure = Structure.from_spacegroup("Fm-3m", Lattice.cubic(CAF2_A), ["Ca", "F"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    record = find_pathways(structure, ion="F", max_hop=3.0, max_paths=1)[0]
    return hop_images(structure, record, nimages=3, min_length=5.0, min_atoms=1, max_atoms=20)


@pytest.fixture(scope="module")
def idpp_result(tmp_path_factory) -> BarrierResult:
    return compute_barrier("mlip-idpp", caf2_hop(), tmp_path_factory.mktemp("idpp"))


def test_device_is_cuda_only_when_present() -> None:
    import torch

    assert pick_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == "cpu"


def test_mlip_idpp_gives_a_finite_barrier_at_the_midpoint(idpp_result: BarrierResult) -> None:
    r = idpp_result
    assert r.engine == "mlip-idpp" and r.converged and r.n_images == 3
    assert r.barrier is not None and math.isfinite(r.barrier) and 0.0 < r.barrier < 1.0
    assert r.relative_energies[0] == 0.0 and r.barrier == max(r.relative_energies)
    # a <100> fluorite hop is symmetric: saddle at the middle image, equal energies at mirror images
    assert int(np.argmax(r.relative_energies)) == 2
    assert r.relative_energies[1] == pytest.approx(r.relative_energies[3], abs=0.01)
    assert r.relative_energies[4] == pytest.approx(0.0, abs=0.01)  # start and end are equivalent sites
    assert r.energies[0] == pytest.approx(-583.0, abs=5.0)  # ~6.1 eV/atom: a CaF2 cell, not a unit mix-up
    assert r.moving_index == caf2_hop().moving_index
    assert r.reaction_coordinate[-1] > caf2_hop().hop_length  # the RMS path includes the neighbours' motion
    assert all(f is not None and math.isfinite(f) for f in r.max_forces)
    assert {"chgnet", "torch", "ase"} <= set(r.versions) and r.versions["device"] in {"cpu", "cuda"}
    assert r.timings.run_s is not None and Path(r.workdir, FINAL_IMAGES_FILE).is_file()


def test_the_model_is_loaded_once_per_process(idpp_result: BarrierResult, tmp_path) -> None:
    device = pick_device(None)
    assert load_model("0.3.0", device) is load_model("0.3.0", device)
    misses = load_model.cache_info().misses
    first = compute_barrier("mlip-idpp", caf2_small_hop(), tmp_path / "a")
    second = compute_barrier("mlip-idpp", caf2_small_hop(), tmp_path / "b", {"forces": False})
    assert load_model.cache_info().misses == misses  # further pathways reuse the model loaded for idpp_result
    assert second.energies == pytest.approx(first.energies, abs=1e-4)  # energies do not depend on the forces
    assert second.max_forces == (None,) * 5 and all(f is not None for f in first.max_forces)


def test_unconverged_endpoint_relaxation_gives_no_barrier(tmp_path) -> None:
    settings = {"relax_endpoints": True, "endpoint_steps": 1, "endpoint_fmax": 0.01}
    r = compute_barrier("mlip-idpp", caf2_small_hop(), tmp_path, settings)
    assert caf2_small_hop().nsites == 11
    assert not r.converged and r.barrier is None and len(r.energies) == 5
    assert r.settings["relax_endpoints"] is True


def test_unconverged_neb_is_stored_without_a_barrier(tmp_path) -> None:
    # one image (re-interpolated from the three given) and one step cannot reach 0.01 eV/Å
    settings = {"nimages": 1, "steps": 1, "fmax": 0.01, "relax_endpoints": False}
    r = compute_barrier("mlip-neb", caf2_small_hop(), tmp_path, settings)
    assert r.engine == "mlip-neb" and not r.converged and r.barrier is None
    assert r.n_images == 1 and len(r.energies) == 3 and r.steps == 1
    assert r.max_forces[1] > 0.01 and all(math.isfinite(e) for e in r.energies)


@pytest.mark.slow
def test_mlip_neb_caf2_barrier_is_in_the_accepted_range(idpp_result: BarrierResult, tmp_path) -> None:
    settings = {"nimages": 3, "fmax": 0.1, "endpoint_fmax": 0.1}
    t0 = time.perf_counter()
    r = compute_barrier("mlip-neb", caf2_hop(), tmp_path, settings)
    print(f"mlip-neb CaF2 95 atoms, 3 images: {time.perf_counter() - t0:.0f} s, {r.steps} band steps")
    assert r.converged and r.barrier is not None
    assert ACCEPTED_RANGE[0] <= r.barrier <= ACCEPTED_RANGE[1]
    assert r.barrier < EXPERIMENT_RANGE[1]  # softer than experiment, as universal potentials are known to be
    assert int(np.argmax(r.relative_energies)) == 2  # the climbing image sits at the symmetric saddle
    assert max(r.max_forces) <= 0.1 + 1e-6  # endpoints and band all converged
    assert r.energies[0] < idpp_result.energies[0]  # relaxing the endpoint lowered its energy
    assert r.barrier > idpp_result.barrier  # unrelaxed endpoints understate the barrier
