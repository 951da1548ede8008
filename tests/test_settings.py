"""The settings object: per-stage profiles, the override context, the unknown-variable check, no dead fields."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from hopflow.flows.common import profile_for
from hopflow.registry import get_stage
from hopflow.settings import (
    NON_SETTING_VARIABLES,
    Settings,
    UnknownSettingWarning,
    check_environment,
    get_settings,
    override,
    setting_variables,
)

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("hopflow", "flows", "tasks", "deployments")


@pytest.fixture(autouse=True)
def no_profile_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the caller's HOPFLOW_PROFILE_* nor HOPFLOW_DASK_PROFILE leak in; settings re-read."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("HOPFLOW_PROFILE_") or name.upper() == "HOPFLOW_DASK_PROFILE":
            monkeypatch.delenv(name)
    get_settings.cache_clear()


def test_profile_variables_fill_the_stage_profiles_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOPFLOW_PROFILE_VASP_NEB", "slurm-vasp")
    monkeypatch.setenv("HOPFLOW_PROFILE_PATHWAYS", "local-threads")
    monkeypatch.setenv("HOPFLOW_PROFILE_FEATURES", "")  # empty: not an entry
    assert Settings().stage_profiles == {"vasp-neb": "slurm-vasp", "pathways": "local-threads"}


def test_profile_precedence_stage_then_explicit_dask_profile_then_the_stage_resources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    own = get_stage("synthetic").resources
    assert profile_for("synthetic") == own  # dask_profile's default does not count
    monkeypatch.setenv("HOPFLOW_DASK_PROFILE", "local-threads")
    get_settings.cache_clear()
    assert profile_for("synthetic") == "local-threads"
    monkeypatch.setenv("HOPFLOW_PROFILE_SYNTHETIC", "threads")
    get_settings.cache_clear()
    assert profile_for("synthetic") == "threads"
    assert profile_for("pathways") == "local-threads"


def test_profile_for_reads_the_settings_object_only() -> None:
    with override(stage_profiles={"synthetic": "from-override"}):
        assert profile_for("synthetic") == "from-override"
    with override(dask_profile="local"):  # set explicitly, even to the default value
        assert profile_for("synthetic") == "local"
    assert profile_for("synthetic") == get_stage("synthetic").resources


def test_override_replaces_fields_and_restores_them() -> None:
    before = get_settings()
    with override(max_paths=2, slurm_queue="gpu") as settings:
        assert get_settings() is settings
        assert (settings.max_paths, settings.slurm_queue) == (2, "gpu")
        assert settings.home == before.home
        with override(max_paths=3):
            assert get_settings().max_paths == 3 and get_settings().slurm_queue == "gpu"
        assert get_settings().max_paths == 2
    assert get_settings() is before


def test_override_restores_after_an_exception_and_validates() -> None:
    before = get_settings()
    with pytest.raises(RuntimeError), override(max_paths=2):
        raise RuntimeError("boom")
    assert get_settings() is before
    with pytest.raises(ValueError), override(max_paths=0):
        pass
    with pytest.raises(TypeError, match="max_hopp"), override(max_hopp=3):
        pass
    assert get_settings() is before


def test_unknown_variable_warns_naming_it_and_the_closest_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOPFLOW_MAX_HOPP", "3")
    get_settings.cache_clear()
    with pytest.warns(UnknownSettingWarning, match=r"HOPFLOW_MAX_HOPP .*HOPFLOW_MAX_HOP \(setting `max_hop`\)"):
        settings = get_settings()
    assert settings.max_hop is None  # ignored, as the warning says


def test_unknown_variable_without_a_close_setting_still_warns() -> None:
    messages = check_environment({"HOPFLOW_ZZZ": "1", "PATH": "/bin"}, warn=False)
    assert len(messages) == 1 and messages[0].startswith("HOPFLOW_ZZZ ") and "did you mean" not in messages[0]


def test_a_secret_value_is_never_in_a_message() -> None:
    messages = check_environment({"HOPFLOW_MP_API_KY": "s3cret-value"}, warn=False)
    assert len(messages) == 1 and "HOPFLOW_MP_API_KEY" in messages[0] and "s3cret" not in messages[0]


def test_settings_aliases_profiles_and_script_and_test_knobs_do_not_warn() -> None:
    environ = {name: "1" for name in setting_variables()}
    environ |= {name: "x" for name in NON_SETTING_VARIABLES}
    environ |= {"HOPFLOW_MP_API_KEY": "k", "MP_API_KEY": "k", "HOPFLOW_PROFILE_VASP_NEB": "slurm-vasp",
                "HOPFLOW_TEST_POSTGRES_URL": "postgresql://", "HOPFLOW_TEST_TIMEOUT": "600",
                "HOPFLOW_FAKE_VASP_BARRIER": "0.5", "hopflow_home": "/tmp", "PREFECT_API_URL": "http://x"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_environment(environ) == []


def test_every_variable_the_scripts_read_is_known() -> None:
    """The shell scripts' `${HOPFLOW_X:-...}` knobs are listed as non-settings (or are settings)."""
    known = set(setting_variables()) | NON_SETTING_VARIABLES
    read = set()
    for script in (ROOT / "scripts").glob("*.sh"):
        read |= set(re.findall(r"\$\{(HOPFLOW_[A-Z0-9_]+)", script.read_text()))
    assert read, "no knobs found in scripts/*.sh"
    assert {name for name in read if not name.startswith("HOPFLOW_TEST_")} <= known


def test_no_hopflow_variable_is_read_around_the_settings() -> None:
    """Program code reads `HOPFLOW_*` only through the settings object (not os.environ / os.getenv)."""
    offenders = []
    for directory in CODE_DIRS:
        for path in (ROOT / directory).rglob("*.py"):
            text = path.read_text()
            if re.search(r"(environ(\.get)?\s*[\[(]|getenv\()\s*f?[\"']HOPFLOW_", text):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_no_dead_field(field: str) -> None:
    """Every setting is read somewhere outside hopflow/settings.py."""
    pattern = re.compile(rf"\b{field}\b")
    for directory in CODE_DIRS:
        for path in (ROOT / directory).rglob("*.py"):
            if path != ROOT / "hopflow" / "settings.py" and pattern.search(path.read_text()):
                return
    if field == "database_url":  # read through the `url` property
        assert "self.database_url" in (ROOT / "hopflow" / "settings.py").read_text()
        return
    pytest.fail(f"setting {field!r} is read nowhere: wire it or remove it")
