"""Both leaderboards on a database of real hops and constructed barrier rows: only trusted barriers rank, the model
spread, the per-material E*(d) with bounds and cut-offs, the CLI's JSON and tables, and the controller's artifacts
read back from a real Prefect server in the same order."""

from __future__ import annotations

import json
from dataclasses import asdict, fields

import pytest
from barrier_rows import CHGNET, SEVENNET
from barrier_rows import add_results as _add
from barrier_rows import barrier_row as _result
from barrier_rows import store_pathways as _store
from crystals import CAF2_A, caf2
from pymatgen.core import Lattice
from pymatgen.core import Structure as PmgStructure
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from hopflow.cli.barriers import write_profile_plots
from hopflow.cli.main import app
from hopflow.db import session_scope
from hopflow.flows import artifacts, mirror
from hopflow.flows import controller as ctl
from hopflow.leaderboard import MaterialEntry, PathwayEntry, material_leaderboard, pathway_leaderboard
from hopflow.models import Estimate, NebResult, Run, Vacancy, VacancySite
from hopflow.tasks.pathways import PathwayRecord, find_pathways

from prefect_helpers import latest_artifact

MINIMUM_REASON = "image [2] lies 0.100 eV below the lower endpoint [/red]"  # markup-like text must print as is


def _fluorite(a: float) -> PmgStructure:
    return caf2(a).get_primitive_structure()


RUTILE = PmgStructure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.621, 3.052), ["Mg", "F"],
                                      [[0, 0, 0], [0.303, 0.303, 0]])


@pytest.fixture(scope="module")
def hops() -> dict[str, tuple[PmgStructure, list[PathwayRecord]]]:
    """Real hops: CaF2 (a/2, a/√2), a SrF2-sized fluorite cut to its shortest hop, MgF2 (0D, 3D, 1D alone)."""
    srf2 = _fluorite(5.80)
    return {"CaF2": (_fluorite(CAF2_A), find_pathways(_fluorite(CAF2_A), ion="F", max_hop=4.0, max_paths=5)),
            "SrF2": (srf2, find_pathways(srf2, ion="F", max_hop=4.2, max_paths=1)),
            "MgF2": (RUTILE, find_pathways(RUTILE, ion="F", max_hop=3.1, max_paths=5))}


@pytest.fixture
def board(engine, hops) -> dict[str, list[int] | int]:
    """CaF2: both hops known, its a/2 hop by two models, with a lower flagged and a lower legacy value besides.
    SrF2: cut to one of two hops by max_paths. MgF2: only its 1D hop trusted, the others flagged."""
    with session_scope(engine, write=True) as session:
        caf2, (a2, a_sqrt2) = _store(session, "CaF2", *hops["CaF2"], max_paths=5, hops_found=2)
        srf2, (s_a2,) = _store(session, "SrF2", *hops["SrF2"], max_paths=1, hops_found=2)
        mgf2, (m0, m3d, m1d) = _store(session, "MgF2", *hops["MgF2"], max_paths=5, hops_found=3)
        _add(session,
             _result(Estimate, a2, 0.42, model=SEVENNET),
             _result(Estimate, a2, 0.30),
             _result(Estimate, a2, 0.04, flag="intermediate-minimum", reason=MINIMUM_REASON),  # newest, lowest
             _result(Estimate, a2, 0.01, flag="unchecked"),  # a legacy row that kept its barrier
             _result(Estimate, a_sqrt2, 0.90),
             _result(Estimate, s_a2, 0.35),
             _result(Estimate, m1d, 0.25),
             _result(Estimate, m0, None, flag="intermediate-minimum", reason=MINIMUM_REASON),
             _result(Estimate, m3d, None, flag="vacancy-moved", reason="an F atom filled the vacancy"),
             _result(NebResult, m3d, None, flag="unconverged", reason="the band did not converge", engine="vasp-neb",
                     model=None))
    return {"structures": [caf2, srf2, mgf2], "caf2": [a2, a_sqrt2], "srf2": [s_a2], "mgf2": [m0, m3d, m1d]}


def test_only_trusted_barriers_rank_per_pathway(engine, board) -> None:
    (a2, a_sqrt2), (s_a2,), (m0, m3d, m1d) = board["caf2"], board["srf2"], board["mgf2"]
    with session_scope(engine) as session:
        entries = pathway_leaderboard(session)
        assert pathway_leaderboard(session, limit=2) == entries[:2]
    assert [e.pathway_id for e in entries] == [m1d, a2, s_a2, a_sqrt2, m0, m3d]
    by_id = {e.pathway_id: e for e in entries}
    # the lower flagged (0.04) and legacy (0.01) values never beat the trusted 0.30
    assert (by_id[a2].barrier, by_id[a2].model, by_id[a2].flag, by_id[a2].flag_reason) == (0.30, CHGNET, "ok", None)
    assert all(e.barrier is None or e.barrier >= 0.25 for e in entries)
    assert by_id[a2].model_spread == pytest.approx(0.12)  # chgnet 0.30 vs 7net 0.42
    assert by_id[a_sqrt2].model_spread is None
    # all flagged: last, no barrier, the best result's flag (vasp-neb outranks mlip-idpp) and reason
    assert (by_id[m0].barrier, by_id[m0].flag, by_id[m0].flag_reason) == (None, "intermediate-minimum", MINIMUM_REASON)
    assert (by_id[m3d].barrier, by_id[m3d].flag, by_id[m3d].engine) == (None, "unconverged", "vasp-neb")


def test_per_material_answer_uses_the_same_trusted_barriers(engine, board) -> None:
    caf2, srf2, mgf2 = board["structures"]
    with session_scope(engine) as session:
        entries = material_leaderboard(session)
        assert material_leaderboard(session, limit=1) == entries[:1]
    assert [e.structure_id for e in entries] == [caf2, srf2, mgf2]
    ca, sr, mg = entries
    assert (ca.e_star_3d, ca.status_3d, ca.e_star_1d, ca.hops_known, ca.hops_total, ca.cut_off) == \
        (0.30, "complete", 0.30, 2, 2, None)
    assert ca.pathways_3d == (board["caf2"][0],) and ca.mode == "barrier"
    assert (sr.status_3d, sr.e_star_3d, sr.lower_3d, sr.upper_3d, sr.hops_known, sr.hops_total) == \
        ("incomplete", None, 0.0, 0.35, 1, 2)
    assert sr.cut_off == "max_paths kept 1 of 2 hops"
    # MgF2: the trusted c-axis hop makes 1D at 0.25 at most; the flagged 3D hop could close 3D at any barrier
    assert (mg.status_1d, mg.lower_1d, mg.upper_1d) == ("incomplete", 0.0, 0.25)
    assert (mg.status_3d, mg.lower_3d, mg.upper_3d) == ("incomplete", 0.0, None)
    assert (mg.hops_known, mg.hops_total, mg.cut_off) == (1, 3, None)


def test_cli_json_is_the_functions_output(engine, board) -> None:
    runner = CliRunner()
    with session_scope(engine) as session:
        expected = {"pathway": _as_json(pathway_leaderboard(session)),
                    "structure": _as_json(material_leaderboard(session))}
    for by, rows in expected.items():
        out = runner.invoke(app, ["leaderboard", "--json", "--by", by])
        assert out.exit_code == 0, out.output
        assert json.loads(out.stdout) == rows
    default = runner.invoke(app, ["leaderboard", "--json"])
    assert json.loads(default.stdout) == expected["pathway"]
    assert [r["structure_id"] for r in expected["structure"]] == board["structures"]
    assert {f.name for f in fields(MaterialEntry)} == set(expected["structure"][0])
    assert {f.name for f in fields(PathwayEntry)} == set(expected["pathway"][0])


def test_cli_tables_print_data_as_text(engine, board, tmp_path) -> None:
    runner = CliRunner()
    pathways = runner.invoke(app, ["leaderboard"], env={"COLUMNS": "300"})
    assert pathways.exit_code == 0, pathways.output
    assert "[/red]" in pathways.output and "intermediate-minimum" in pathways.output
    materials = runner.invoke(app, ["leaderboard", "--by", "structure", "--plot", str(tmp_path / "m.png")],
                              env={"COLUMNS": "300"})
    assert materials.exit_code == 0, materials.output
    assert "0.300" in materials.output and "0.000 .. 0.350 (incomplete)" in materials.output
    assert "max_paths kept 1 of 2 hops" in materials.output
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_profile_plots_are_named_by_formula_pathway_engine_and_model(engine, board, tmp_path) -> None:
    caf2 = board["structures"][0]
    a2 = board["caf2"][0]
    with session_scope(engine) as session:
        written = write_profile_plots(session, tmp_path)
    names = {p.name for p in written}
    assert len(written) == len(names) == 10  # every row, flagged ones too, none overwritten
    assert {f"CaF2-s{caf2}-p{a2}-mlip-idpp-chgnet.png", f"CaF2-s{caf2}-p{a2}-mlip-idpp-7net.png"} <= names
    assert any(name.startswith("MgF2-") and "vasp-neb" in name for name in names)


def test_shared_relaxed_vacancies_switch_to_transition_state_thresholds(engine, hops) -> None:
    """CaF2 with one vacancy orbit: energies from one supercell and model compare, and give the same E*."""
    with session_scope(engine, write=True) as session:
        caf2, (a2, a_sqrt2) = _store(session, "CaF2", *hops["CaF2"], max_paths=5, hops_found=2)
        vacancy = _vacancy(session, caf2)
        e_site = -300.0
        _add(session, _result(Estimate, a2, 0.3, energies=[e_site, e_site + 0.3, e_site], vacancies=(vacancy,) * 2),
             _result(Estimate, a_sqrt2, 0.9, energies=[e_site, e_site + 0.9, e_site], vacancies=(vacancy,) * 2))
    with session_scope(engine) as session:
        (entry,) = material_leaderboard(session)
    assert entry.mode == "ts" and entry.status_3d == "complete"
    assert entry.e_star_3d == pytest.approx(0.3) and entry.pathways_3d == (a2,)


def _vacancy(session: Session, structure_id: int) -> int:
    site = VacancySite(structure_id=structure_id, supercell="[[2,0,0],[0,2,0],[0,0,2]]", site_index=8,
                       site_label="F 8c", orbit_size=16, nsites=24, fingerprint="fp-site")
    session.add(site)
    session.flush()
    run = Run(stage="vacancies", input_id=site.id, param_hash="test-vacancy", parameters={}, state="done")
    session.add(run)
    session.flush()
    vacancy = Vacancy(run_id=run.id, site_id=site.id, structure_id=structure_id, model=CHGNET, energy=-300.0,
                      max_force=0.01, converged=True, steps=5, structure={}, bulk_structure={}, bulk_energy=-305.0,
                      bulk_converged=True, max_displacement=0.1, fill_distance=2.0, flag="ok", flag_reason=None,
                      settings={}, versions={}, relax_s=1.0)
    session.add(vacancy)
    session.flush()
    return vacancy.id


def _as_json(entries: list) -> list[dict]:
    return json.loads(json.dumps([asdict(e) for e in entries], default=str))


@pytest.mark.prefect
def test_artifacts_hold_the_cli_rows_in_the_cli_order(engine, board, prefect_client) -> None:  # noqa: F811
    artifacts.publish_artifacts(prefect_client, engine, ctl.TickReport((), (), (), {}, mirror.MirrorReport(), 0.0))
    runner = CliRunner()
    for key, by in ((artifacts.MATERIALS_KEY, "structure"), (artifacts.LEADERBOARD_KEY, "pathway")):
        cli = json.loads(runner.invoke(app, ["leaderboard", "--json", "--by", by]).stdout)
        artifact = latest_artifact(prefect_client, key)
        assert artifact.type == "table"
        assert json.loads(artifact.data) == cli[:artifacts.LEADERBOARD_SIZE] and cli


@pytest.mark.prefect
def test_overview_artifact_has_the_leaderboards_and_plots_inline(engine, board, prefect_client) -> None:  # noqa: F811
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from hopflow.flows.artifacts import OVERVIEW_KEY, overview_markdown

    with session_scope(engine) as session:
        expected = overview_markdown(session, {}, {})
    versions = ArtifactFilter(key=ArtifactFilterKey(any_=[OVERVIEW_KEY]))
    before = len(prefect_client.read_artifacts(artifact_filter=versions))
    artifacts.publish_artifacts(prefect_client, engine, ctl.TickReport((), (), (), {}, mirror.MirrorReport(), 0.0))
    overview = latest_artifact(prefect_client, OVERVIEW_KEY)
    assert overview.type == "markdown" and overview.data.split("## Materials")[1] == expected.split("## Materials")[1]
    text = overview.data
    assert text.index("CaF2") < text.index("SrF2") < text.index("MgF2")  # the CLI's order
    assert text.count("](data:image/png;base64,") == 4  # the materials plot and the three best profiles
    assert "report.html" in text and "hopflow trace" in text
    artifacts.publish_artifacts(prefect_client, engine, ctl.TickReport((), (), (), {}, mirror.MirrorReport(), 0.0))
    assert len(prefect_client.read_artifacts(artifact_filter=versions)) == before + 1  # unchanged: not again
    progress = json.loads(latest_artifact(prefect_client, artifacts.PROGRESS_KEY).data)
    assert {row["stage"]: row["cached"] for row in progress}["estimates"] == 0
    assert list(progress[0])[:7] == ["stage", "queued", "claimed", "running", "done", "failed", "cached"]
