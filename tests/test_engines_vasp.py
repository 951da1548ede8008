"""vasp-neb end to end with the VASP stand-in (tests/fake_vasp, NOT VASP) and FAKE POTCARs; engine registry and
schema."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from crystals import CAF2_A, caf2_hop
from pydantic import ValidationError
from pymatgen.analysis.transition_state import NEBAnalysis
from pymatgen.io.vasp.inputs import Incar, Poscar, Potcar

from hopflow.errors import EngineError, InputError
from hopflow.tasks.engines import ENGINES, BarrierResult, compute_barrier, get_engine
from hopflow.tasks.engines.base import RUN_FILE
from hopflow.tasks.engines.vasp import NEB_OUTPUT, VaspNebEngine, VaspNebSettings, VaspRunRecord
from hopflow.tasks.images import displacements

from tests.fake_vasp.fake_potcar import write_fake_psp_dir

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pymatgen rightly does not know the FAKE POTCARs

STANDIN = Path(__file__).parent / "fake_vasp" / "vasp_standin"
BARRIER = 0.37  # eV, the stand-in's analytic barrier for these tests
ZVAL = {"Ca": 10, "F": 7}  # the FAKE POTCARs' valence counts (those of VASP's Ca_sv and F)


@pytest.fixture(scope="module")
def psp_dir(tmp_path_factory) -> Path:
    return write_fake_psp_dir(tmp_path_factory.mktemp("psp"), ["Ca_sv", "F"])


@pytest.fixture
def standin_env(monkeypatch, tmp_path) -> Path:
    """The stand-in runs under this interpreter; its invocations are logged to the returned file."""
    log = tmp_path / "standin.log"
    monkeypatch.setenv("HOPFLOW_FAKE_VASP_PYTHON", sys.executable)
    monkeypatch.setenv("HOPFLOW_FAKE_VASP_BARRIER", str(BARRIER))
    monkeypatch.setenv("HOPFLOW_FAKE_VASP_LOG", str(log))
    for name in ("ERROR", "INTERRUPT", "NEVER_CONVERGE"):
        monkeypatch.delenv(f"HOPFLOW_FAKE_VASP_{name}", raising=False)
    return log


def settings(psp_dir: Path, **overrides) -> dict:
    return {"vasp_cmd": str(STANDIN), "psp_dir": str(psp_dir), "polling_s": 0.05, **overrides}


def invocations(log: Path) -> list[str]:
    return log.read_text().split("\n")[:-1] if log.exists() else []


# --- inputs ----------------------------------------------------------------------------------------------------------


def test_inputs_are_a_valid_ci_neb(psp_dir, tmp_path) -> None:
    hop = caf2_hop()
    prepared = get_engine("vasp-neb", settings(psp_dir)).prepare(hop, tmp_path)
    incar = Incar.from_file(tmp_path / "INCAR")
    assert incar["ISYM"] == 0 and incar["IMAGES"] == 3
    assert incar["IBRION"] == 3 and incar["POTIM"] == 0 and incar["IOPT"] == 1  # VTST FIRE-style optimizer
    assert incar["LCLIMB"] is True and incar["ICHAIN"] == 0
    assert "NELECT" not in incar  # neutral vacancy: VASP counts the electrons itself
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["00", "01", "02", "03", "04"]
    poscars = [Poscar.from_file(tmp_path / f"{i:02d}" / "POSCAR") for i in range(5)]
    assert {len(p.structure) for p in poscars} == {95}
    assert all(p.site_symbols == ["Ca", "F"] and p.natoms == [32, 63] for p in poscars)
    moved = displacements(poscars[0].structure, poscars[-1].structure)
    assert np.count_nonzero(moved > 1e-3) == 1  # exactly one ion moves ...
    assert moved.max() == pytest.approx(CAF2_A / 2, abs=1e-4)  # ... by the fluorite <100> F-F distance
    assert int(np.argmax(moved)) == hop.moving_index == prepared.moving_index
    assert [p.symbol for p in Potcar.from_file(tmp_path / "POTCAR")] == ["Ca_sv", "F"]
    assert (tmp_path / "KPOINTS").is_file()
    for end, image in (("start", "00"), ("end", "04")):
        single = Incar.from_file(tmp_path / end / "INCAR")
        assert single["NSW"] == 0 and "IMAGES" not in single and "LCLIMB" not in single
        assert Poscar.from_file(tmp_path / end / "POSCAR").structure == poscars[int(image)].structure


def test_plain_neb_has_no_climbing_image(psp_dir, tmp_path) -> None:
    get_engine("vasp-neb", settings(psp_dir, climbing=False)).prepare(caf2_hop(), tmp_path)
    incar = Incar.from_file(tmp_path / "INCAR")
    assert "LCLIMB" not in incar and incar["IMAGES"] == 3 and incar["ISYM"] == 0


def test_charged_vacancy_has_one_electron_less(psp_dir, tmp_path) -> None:
    neutral = get_engine("vasp-neb", settings(psp_dir)).prepare(caf2_hop(), tmp_path / "neutral")
    charged_engine = get_engine("vasp-neb", settings(psp_dir, vacancy_mode="charged"))
    charged = charged_engine.prepare(caf2_hop(), tmp_path / "charged")
    valence = 32 * ZVAL["Ca"] + 63 * ZVAL["F"]  # the neutral cell's electrons, 761
    assert Incar.from_file(tmp_path / "charged" / "INCAR")["NELECT"] == valence - 1
    assert Incar.from_file(tmp_path / "charged" / "start" / "INCAR")["NELECT"] == valence - 1
    assert (neutral.vacancy_mode, neutral.charge) == ("neutral", 0)
    assert (charged.vacancy_mode, charged.charge) == ("charged", 1)  # an F- vacancy leaves a +1 cell
    with pytest.raises(InputError, match=r"other settings \(vacancy_mode\)"):  # no silent reuse of other physics
        get_engine("vasp-neb", settings(psp_dir, vacancy_mode="charged")).prepare(caf2_hop(), tmp_path / "neutral")


def test_bad_inputs_are_refused(psp_dir, tmp_path) -> None:
    images = [s.copy() for s in caf2_hop().images]
    two_movers = [images[0], images[2], images[-1].copy()]
    two_movers[-1].translate_sites([0], [0.1, 0, 0])  # a Ca moves too
    with pytest.raises(InputError, match="more than one ion moves"):
        get_engine("vasp-neb", settings(psp_dir)).prepare(two_movers, tmp_path / "a")
    with pytest.raises(InputError, match="at least 3 images"):
        get_engine("vasp-neb", settings(psp_dir)).prepare(images[:2], tmp_path / "b")
    with pytest.raises(InputError, match="no POTCAR for Ca_sv"):
        get_engine("vasp-neb", settings(write_fake_psp_dir(tmp_path / "onlyF", ["F"]))).prepare(images, tmp_path / "c")
    with pytest.raises(InputError, match="does not exist"):
        get_engine("vasp-neb", settings(tmp_path / "missing")).prepare(images, tmp_path / "d")


# --- runs ------------------------------------------------------------------------------------------------------------


def test_end_to_end_with_a_corrected_error(psp_dir, tmp_path, standin_env, monkeypatch) -> None:
    monkeypatch.setenv("HOPFLOW_FAKE_VASP_ERROR", "rspher")  # 'ERROR RSPHER' until LREAL = .FALSE.
    workdir = tmp_path / "neb"
    result = compute_barrier("vasp-neb", caf2_hop(), workdir, settings(psp_dir, mpi_launcher="env"))

    assert result.engine == "vasp-neb" and result.converged and not result.continued
    assert result.barrier == pytest.approx(BARRIER, abs=1e-4)  # the analytic path's barrier
    assert result.barrier == pytest.approx(max(NEBAnalysis.from_dir(workdir, ("start", "end")).relative_energies))
    assert result.energies[0] == pytest.approx(-5.0 * 95) and result.relative_energies[0] == 0.0
    assert int(np.argmax(result.relative_energies)) == 2  # the saddle of a symmetric hop is the middle image
    assert result.relative_energies[1] == pytest.approx(result.relative_energies[3], abs=1e-3)
    assert result.n_images == 3 and len(result.energies) == 5
    assert result.max_forces[1:4] == pytest.approx((0.005, 0.005, 0.005))
    assert result.timings.run_s is not None and result.timings.run_s > 0
    assert result.versions["vasp"].startswith("vasp.0.0.0-hopflow-standin")

    neb_fixes = [c for c in result.corrections if c.job == "neb"]
    assert len(neb_fixes) == 1
    assert neb_fixes[0].handler == "VaspErrorHandler" and neb_fixes[0].errors == ("rspher",)
    assert neb_fixes[0].actions == ({"dict": "INCAR", "action": {"_set": {"LREAL": False}}},)
    assert {c.job for c in result.corrections} == {"start", "end", "neb"}  # the endpoint single points hit it too
    assert Incar.from_file(workdir / "INCAR")["LREAL"] is False
    assert "ERROR RSPHER" not in (workdir / NEB_OUTPUT).read_text()  # the corrected rerun ran clean
    assert invocations(standin_env).count(f"neb {workdir}") == 2


def test_max_errors_setting_stops_custodian(psp_dir, tmp_path, standin_env, monkeypatch) -> None:
    monkeypatch.setenv("HOPFLOW_FAKE_VASP_ERROR", "rspher")
    engine = get_engine("vasp-neb", settings(psp_dir, max_errors=1, endpoint_calculations=False))
    engine.prepare(caf2_hop(), tmp_path)
    with pytest.raises(EngineError, match="Max errors per job reached: 1"):
        engine.run(tmp_path)
    record = VaspRunRecord.model_validate_json((tmp_path / RUN_FILE).read_text())
    assert record.attempts == 1 and len(record.corrections) == 1 and "Max errors" in record.errors[0]


def test_interrupted_run_continues_from_its_contcars(psp_dir, tmp_path, standin_env, monkeypatch) -> None:
    hop = caf2_hop()
    workdir = tmp_path / "neb"
    monkeypatch.setenv("HOPFLOW_FAKE_VASP_INTERRUPT", "2")  # killed after writing CONTCARs of images 1 and 2
    with pytest.raises(EngineError, match="ReturnCodeError"):
        compute_barrier("vasp-neb", hop, workdir, settings(psp_dir))
    contcars = {i: Poscar.from_file(workdir / f"{i:02d}" / "CONTCAR").structure for i in (1, 2)}
    assert not (workdir / "03" / "CONTCAR").exists()
    for i, s in contcars.items():  # the killed run made progress: CONTCARs differ from the IDPP images
        assert np.abs(s.cart_coords - hop.images[i].cart_coords).max() > 1e-3

    monkeypatch.delenv("HOPFLOW_FAKE_VASP_INTERRUPT")
    engine = get_engine("vasp-neb", settings(psp_dir))
    prepared = engine.prepare(hop, workdir)
    assert prepared.continued
    for i, s in contcars.items():  # the continued run starts from the previous CONTCARs ...
        poscar = Poscar.from_file(workdir / f"{i:02d}" / "POSCAR").structure
        assert np.allclose(poscar.frac_coords, s.frac_coords, atol=1e-6)
    third = Poscar.from_file(workdir / "03" / "POSCAR").structure  # ... and image 3 from its own POSCAR
    assert np.allclose(third.cart_coords, hop.images[3].cart_coords, atol=1e-5)

    engine.run(workdir)
    result = engine.parse(workdir)
    assert result.continued and result.converged
    assert result.barrier == pytest.approx(BARRIER, abs=1e-3)
    record = VaspRunRecord.model_validate_json((workdir / RUN_FILE).read_text())
    assert record.attempts == 2 and len(record.errors) == 1
    # endpoints ran once (their OUTCARs survived the kill); the NEB twice
    assert sorted(line.split()[0] for line in invocations(standin_env)) == ["neb", "neb", "single", "single"]


def test_unconverged_run_has_energies_but_no_barrier(psp_dir, tmp_path, standin_env, monkeypatch) -> None:
    monkeypatch.setenv("HOPFLOW_FAKE_VASP_NEVER_CONVERGE", "1")
    result = compute_barrier("vasp-neb", caf2_hop(), tmp_path, settings(psp_dir, user_incar_settings={"NSW": 4}))
    assert not result.converged and result.barrier is None
    assert len(result.energies) == 5 and max(result.relative_energies) > 0
    assert result.steps == 4 and result.max_forces[2] == pytest.approx(0.5)


def test_outputs_compressed_after_parsing_still_parse(psp_dir, tmp_path, standin_env) -> None:
    result = compute_barrier("vasp-neb", caf2_hop(), tmp_path, settings(psp_dir, compress=True))
    assert (tmp_path / "02" / "OUTCAR.gz").is_file() and not (tmp_path / "02" / "OUTCAR").exists()
    assert (tmp_path / "02" / "CONTCAR").is_file()  # a continuation needs it plain
    again = get_engine("vasp-neb", settings(psp_dir)).parse(tmp_path)
    assert again.barrier == pytest.approx(result.barrier) and again.max_forces == result.max_forces


def test_missing_vasp_command_is_an_engine_error(psp_dir, tmp_path, standin_env) -> None:
    engine = get_engine("vasp-neb", settings(psp_dir, vasp_cmd=str(tmp_path / "no-vasp-here")))
    engine.prepare(caf2_hop(), tmp_path)
    with pytest.raises(EngineError, match="start"):
        engine.run(tmp_path)


# --- registry and schema ---------------------------------------------------------------------------------------------


def test_registry_and_settings(monkeypatch, tmp_path) -> None:
    assert set(ENGINES) == {"mlip-idpp", "mlip-neb", "vasp-neb"}
    with pytest.raises(InputError, match="unknown barrier engine 'dft'"):
        get_engine("dft")
    with pytest.raises(ValidationError):
        get_engine("vasp-neb", {"vasp_comand": "vasp"})  # typos are errors, not ignored
    monkeypatch.setenv("HOPFLOW_VASP_CMD", "vasp_gam")
    monkeypatch.setenv("HOPFLOW_VASP_MPI_LAUNCHER", "srun --mpi=pmix")
    monkeypatch.setenv("HOPFLOW_VASP_PSP_DIR", str(tmp_path))
    monkeypatch.setenv("HOPFLOW_VASP_MAX_ERRORS", "7")
    from hopflow.settings import get_settings

    get_settings.cache_clear()
    engine = get_engine("vasp-neb")
    assert isinstance(engine, VaspNebEngine)
    assert engine.settings.command() == ["srun", "--mpi=pmix", "vasp_gam"]
    assert engine.settings.psp_dir == tmp_path and engine.settings.max_errors == 7
    assert get_engine("vasp-neb", VaspNebSettings(vasp_cmd="x")).settings.vasp_cmd == "x"


def test_result_schema_is_checked() -> None:
    base = dict(
        engine="x", engine_version="1", energies=(0.0, 1.0, 0.0), relative_energies=(0.0, 1.0, 0.0),
        reaction_coordinate=(0.0, 1.0, 2.0), max_forces=(0.0, 0.1, 0.0), n_images=1, moving_index=0,
    )
    assert BarrierResult(**base, barrier=1.0, converged=True, flag="ok").barrier == 1.0
    with pytest.raises(ValidationError, match="unconverged"):
        BarrierResult(**base, barrier=1.0, converged=False, flag="unconverged")
    with pytest.raises(ValidationError, match="flagged 'intermediate-minimum' carries no barrier"):
        BarrierResult(**base, barrier=1.0, converged=True, flag="intermediate-minimum")
    with pytest.raises(ValidationError, match="flag"):
        BarrierResult(**base, barrier=1.0, converged=True, flag="looks-fine")
    with pytest.raises(ValidationError, match="expected 4"):
        BarrierResult(**(base | {"n_images": 2}), barrier=None, converged=False, flag="unconverged")
