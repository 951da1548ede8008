"""MLIP engines on CaF2's shortest F-vacancy hop: mlip-idpp single points and mlip-neb climbing-image NEB, with
CHGNet 0.3.0 and SevenNet-0; profile checks (`check_profile`) on hand-made and computed profiles."""

from __future__ import annotations

import math
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from crystals import CAF2_A, caf2, caf2_hop
from pydantic import ValidationError
from pymatgen.core import Structure

from hopflow.engines import MLIP_ENGINE_REVISION as ENGINE_REVISION
from hopflow.engines import model_version
from hopflow.settings import get_settings
from hopflow.tasks.engines import BarrierResult, compute_barrier, get_engine
from hopflow.tasks.engines.base import RUN_FILE, check_profile
from hopflow.tasks.engines.mlip import (
    FINAL_IMAGES_FILE,
    INPUT_IMAGES_FILE,
    MlipIdppSettings,
    MlipNebSettings,
    MlipRunRecord,
    idpp_path,
)
from hopflow.tasks.engines.potentials import _weights, pick_device, single_points
from hopflow.tasks.images import HopImages, hop_images
from hopflow.tasks.pathways import find_pathways

EXPERIMENT_RANGE = (0.35, 0.55)  # eV, F-vacancy migration in CaF2 (ENVIRONMENT.md); universal MLIPs come out softer
ACCEPTED_RANGE = (0.1, 0.6)  # eV, what the acceptance criterion allows for CHGNet


def fluorite() -> Structure:
    """CaF2, conventional cell, with the oxidation states the engines must strip."""
    return caf2(oxidation_states=True)


@cache
def caf2_small_hop() -> HopImages:
    """The same hop in one conventional cell (11 atoms): enough for tests of the unconverged paths."""
    record = find_pathways(fluorite(), ion="F", max_hop=3.0, max_paths=1)[0]
    return hop_images(fluorite(), record, nimages=3, min_length=5.0, min_atoms=1, max_atoms=20)


@cache
def caf2_primitive_hop() -> list[Structure]:
    """The a/2 <100> hop in the 2x2x2 supercell of the primitive cell (23 atoms), unrelaxed, 3 IDPP images.

    pymatgen's supercells of this hop are cubic (11 or 95 atoms); this one is built by hand: every atom but the two
    F sites a and b in supercell order, then the moving F (at a in the start, at b in the end)."""
    cell = fluorite().get_primitive_structure() * (2, 2, 2)
    fluorines = [i for i, site in enumerate(cell) if site.specie.symbol == "F"]
    a = fluorines[0]
    b = min(fluorines[1:], key=lambda j: cell.get_distance(a, j))
    assert cell.get_distance(a, b) == pytest.approx(CAF2_A / 2, abs=1e-3)
    rest = [k for k in range(len(cell)) if k not in (a, b)]
    species = [cell[k].specie for k in rest] + [cell[a].specie]
    start, end = (Structure(cell.lattice, species, [cell[k].frac_coords for k in rest] + [cell[m].frac_coords])
                  for m in (a, b))
    return idpp_path(start, end, 3)


@pytest.fixture(scope="module")
def idpp_result(tmp_path_factory) -> BarrierResult:
    """CHGNet single points on the 95-atom hop with unrelaxed (bulk-position) endpoints."""
    return compute_barrier("mlip-idpp", caf2_hop(), tmp_path_factory.mktemp("idpp"), {"model": "chgnet-0.3.0"})


# ---------------------------------------------------------------- profiles

def test_check_profile_flags_an_interior_minimum() -> None:
    check = check_profile([0.0, -0.05, 0.3, 0.1, 0.02], converged=True, tolerance=0.02)
    assert check.flag == "intermediate-minimum" and check.barrier is None and check.forward_barrier is None
    assert "image 1" in check.reason and "0.050 eV" in check.reason
    within = check_profile([0.0, -0.01, 0.3, 0.0], converged=True, tolerance=0.02)  # round-off below the ends is ok
    assert within.flag == "ok" and within.barrier == pytest.approx(0.3)


def test_check_profile_unconverged_has_no_barrier() -> None:
    check = check_profile([0.0, 0.3, 0.0], converged=False, tolerance=0.02)
    assert check.flag == "unconverged" and check.barrier is None and check.reason


def test_check_profile_barrier_is_from_the_lower_end() -> None:
    forward = check_profile([0.0, 0.2, 0.5, 0.3, 0.1], converged=True, tolerance=0.02)
    assert forward.flag == "ok" and forward.reason is None
    assert (forward.barrier, forward.forward_barrier, forward.reverse_barrier) == pytest.approx((0.5, 0.5, 0.4))
    reverse = check_profile([0.1, 0.3, 0.6, 0.0], converged=True, tolerance=0.02)
    assert (reverse.barrier, reverse.forward_barrier, reverse.reverse_barrier) == pytest.approx((0.6, 0.5, 0.6))


def test_parse_classifies_the_stored_profile(tmp_path) -> None:
    engine = get_engine("mlip-idpp", {"model": "7net-0", "intermediate_minimum_tol": 0.03})
    engine.prepare(caf2_small_hop(), tmp_path)
    (tmp_path / FINAL_IMAGES_FILE).write_text((tmp_path / INPUT_IMAGES_FILE).read_text())
    record = MlipRunRecord(energies=(-10.0, -10.05, -9.7, -10.01, -10.02), max_forces=(0.1,) * 5, converged=True,
                           device="cpu", run_s=1.0)
    (tmp_path / RUN_FILE).write_text(record.model_dump_json())
    r = engine.parse(tmp_path)
    assert r.flag == "intermediate-minimum" and r.barrier is None and "image 1" in r.flag_reason
    assert r.model == "7net-0" and r.versions["model"] == "7net-0" and "sevenn" in r.versions


# ---------------------------------------------------------------- settings

def test_settings_follow_the_configured_potential(monkeypatch) -> None:
    assert MlipIdppSettings().model == MlipNebSettings().model == "chgnet-0.3.0"
    assert not MlipIdppSettings().relax_endpoints and not MlipNebSettings().relax_endpoints
    assert MlipNebSettings().intermediate_minimum_tol == 0.02
    assert MlipIdppSettings(model="0.3.0").model == "chgnet-0.3.0"  # the CHGNet-only engines' name
    with pytest.raises(ValidationError, match="known: chgnet-0.3.0, 7net-0"):
        MlipIdppSettings(model="mace-mp-0")
    monkeypatch.setenv("HOPFLOW_BARRIER_MODEL", "7net-0")
    monkeypatch.setenv("HOPFLOW_INTERMEDIATE_MINIMUM_TOL", "0.05")
    get_settings.cache_clear()
    engine = get_engine("mlip-neb")
    assert engine.settings.model == "7net-0" and engine.settings.intermediate_minimum_tol == 0.05
    assert engine.version == f"{ENGINE_REVISION}+{model_version('7net-0')}"
    assert "sevenn-" in engine.version and get_engine("mlip-idpp", {"model": "0.3.0"}).version.endswith("+0.3.0")


# ---------------------------------------------------------------- real runs

def test_sevennet_idpp_with_relaxed_endpoints_is_an_ok_single_hop(tmp_path) -> None:
    images = caf2_primitive_hop()
    t0 = time.perf_counter()
    r = compute_barrier("mlip-idpp", images, tmp_path, {"model": "7net-0", "relax_endpoints": True,
                                                         "endpoint_fmax": 0.05})
    print(f"mlip-idpp 7net-0, 23 atoms, relaxed endpoints: {time.perf_counter() - t0:.1f} s")
    assert r.converged and r.flag == "ok" and r.flag_reason is None and r.model == "7net-0"
    assert r.barrier is not None and 0.05 < r.barrier < 1.0
    assert r.forward_barrier == pytest.approx(r.reverse_barrier, abs=0.01)  # start and end are equivalent sites
    assert r.barrier == pytest.approx(max(r.energies) - min(r.energies[0], r.energies[-1]))
    assert int(np.argmax(r.energies)) == 2  # symmetric hop: saddle at the middle image
    assert r.energies[0] < single_points(images[:1], "7net-0", "cpu")[0][0]  # the relaxation lowered the endpoint
    assert r.engine_version.startswith(f"{ENGINE_REVISION}+sevenn-") and r.versions["sevenn"]


def test_chgnet_idpp_between_unrelaxed_endpoints_passes_lower_configurations(idpp_result: BarrierResult) -> None:
    r = idpp_result
    assert r.engine == "mlip-idpp" and r.converged and r.n_images == 3 and r.model == "chgnet-0.3.0"
    # bulk-position endpoints are no minima for CHGNet: the images next to them, where the neighbours have begun to
    # relax towards the moving ion, lie lower; the path check refuses to call that a barrier
    assert r.flag == "intermediate-minimum" and r.barrier is None and "image" in r.flag_reason
    assert r.relative_energies[0] == 0.0 and min(r.relative_energies) < -0.02
    assert int(np.argmax(r.relative_energies)) == 2  # a <100> fluorite hop is symmetric: its top at the middle
    assert r.relative_energies[1] == pytest.approx(r.relative_energies[3], abs=0.01)
    assert r.relative_energies[4] == pytest.approx(0.0, abs=0.01)  # start and end are equivalent sites
    assert r.energies[0] == pytest.approx(-583.0, abs=5.0)  # ~6.1 eV/atom: a CaF2 cell, not a unit mix-up
    assert r.moving_index == caf2_hop().moving_index
    assert r.reaction_coordinate[-1] > caf2_hop().hop_length  # the RMS path includes the neighbours' motion
    assert r.max_forces == (None,) * 5  # single points of energy alone: no backward pass for forces nobody uses
    assert {"chgnet", "torch", "ase"} <= set(r.versions) and r.versions["device"] in {"cpu", "cuda"}
    assert r.timings.run_s is not None and Path(r.workdir, FINAL_IMAGES_FILE).is_file()


def test_the_network_is_loaded_once_per_process(idpp_result: BarrierResult, tmp_path) -> None:
    misses = _weights.cache_info().misses
    first = compute_barrier("mlip-idpp", caf2_small_hop(), tmp_path / "a", {"model": "0.3.0"})
    second = compute_barrier("mlip-idpp", caf2_small_hop(), tmp_path / "b", {"model": "chgnet-0.3.0"})
    assert _weights.cache_info().misses == misses  # further pathways reuse the network loaded for idpp_result
    assert second.energies == pytest.approx(first.energies, abs=1e-4)
    assert pick_device(None) in {"cpu", "cuda"}


def test_unconverged_endpoint_relaxation_gives_no_barrier(tmp_path) -> None:
    settings = {"model": "7net-0", "relax_endpoints": True, "endpoint_steps": 1, "endpoint_fmax": 0.01}
    r = compute_barrier("mlip-idpp", caf2_small_hop(), tmp_path, settings)
    assert caf2_small_hop().nsites == 11
    assert not r.converged and r.flag == "unconverged" and r.barrier is None and len(r.energies) == 5
    assert r.settings["relax_endpoints"] is True


def test_unconverged_neb_is_stored_without_a_barrier(tmp_path) -> None:
    # one image (re-interpolated from the three given) and one step cannot reach 0.01 eV/Å
    settings = {"model": "7net-0", "nimages": 1, "steps": 1, "fmax": 0.01}
    r = compute_barrier("mlip-neb", caf2_small_hop(), tmp_path, settings)
    assert r.engine == "mlip-neb" and not r.converged and r.flag == "unconverged" and r.barrier is None
    assert r.n_images == 1 and len(r.energies) == 3 and r.steps == 1 and r.model == "7net-0"
    assert r.max_forces[1] > 0.01 and all(math.isfinite(e) for e in r.energies)


@pytest.mark.slow
def test_mlip_neb_caf2_barrier_is_in_the_accepted_range(idpp_result: BarrierResult, tmp_path) -> None:
    settings = {"model": "chgnet-0.3.0", "nimages": 3, "fmax": 0.1, "relax_endpoints": True, "endpoint_fmax": 0.1}
    t0 = time.perf_counter()
    r = compute_barrier("mlip-neb", caf2_hop(), tmp_path, settings)
    print(f"mlip-neb CaF2 95 atoms, 3 images: {time.perf_counter() - t0:.0f} s, {r.steps} band steps")
    assert r.converged and r.flag == "ok" and r.barrier is not None
    assert ACCEPTED_RANGE[0] <= r.barrier <= ACCEPTED_RANGE[1]
    assert r.barrier < EXPERIMENT_RANGE[1]  # softer than experiment, as universal potentials are known to be
    assert int(np.argmax(r.relative_energies)) == 2  # the climbing image sits at the symmetric saddle
    assert max(r.max_forces) <= 0.1 + 1e-6  # endpoints and band all converged
    assert r.energies[0] < idpp_result.energies[0]  # relaxing the endpoint lowered its energy
    assert r.barrier > max(idpp_result.relative_energies)  # unrelaxed endpoints understate the barrier
