"""Dependencies point one way: the core (`hopflow` minus its command line) imports no flow, task, deployment or
command-line module, at module level or inside a function; and no generic top-level package is installed. In tests/,
no file imports a test module or conftest.py (shared code lives in fixtures and helper modules)."""

from __future__ import annotations

import ast
import importlib.metadata
import site
from pathlib import Path

import hopflow

CORE = Path(hopflow.__file__).parent
TESTS = Path(__file__).resolve().parent
OUTER = ("hopflow.flows", "hopflow.tasks", "hopflow.deployments", "hopflow.cli")


def imported_modules(path: Path, root: Path = CORE) -> list[tuple[int, str]]:
    """Every module an import statement in the file names (absolute, or relative resolved against the package)."""
    package = ".".join(("hopflow", *path.relative_to(root).parent.parts))
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def core_files() -> list[Path]:
    return [p for p in CORE.rglob("*.py") if "cli" not in p.relative_to(CORE).parts]


def test_the_core_imports_no_outer_layer():
    files = core_files()
    assert len(files) > 20 and CORE / "queue.py" in files and CORE / "stages" / "pathways.py" in files
    edges = [f"{path.relative_to(CORE.parent)}:{line} imports {module}"
             for path in files for line, module in imported_modules(path)
             if module.startswith(OUTER) or module.split(".")[0] in ("flows", "tasks", "deployments")]
    assert edges == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "hopflow" / "probe.py"
    sample.parent.mkdir()
    sample.write_text("def f():\n    from hopflow.flows.batch import run_batch\n    from .cli import main\n")
    modules = [m for _, m in imported_modules(sample, root=tmp_path / "hopflow")]
    assert "hopflow.flows.batch" in modules and "hopflow.cli" in modules


def test_no_string_names_a_flow_function_for_the_registry():
    from hopflow.registry import STAGES, get_stage

    get_stage("import")
    for stage in STAGES.values():
        assert not hasattr(stage, "extra")
        assert stage.entrypoint.startswith("flows/") and stage.entrypoint.count(":") == 1
    texts = [(CORE / "registry.py").read_text(), *(p.read_text() for p in (CORE / "stages").glob("*.py"))]
    assert not any("import_module" in text or "flow_function" in text for text in texts)


def test_no_generic_top_level_package_is_installed():
    site_dirs = [Path(p) for p in site.getsitepackages()]
    dists = [d for d in importlib.metadata.distributions(path=[str(s) for s in site_dirs])
             if d.metadata["Name"] == "hopflow"]
    assert dists, "hopflow is not installed in this environment's site-packages"
    for dist in dists:
        assert (dist.read_text("top_level.txt") or "hopflow").split() == ["hopflow"]
        assert not {Path(str(f)).parts[0] for f in dist.files or []} & {"flows", "tasks", "deployments"}
    for site_dir in site_dirs:
        for finder in site_dir.glob("__editable___hopflow*finder.py"):
            text = finder.read_text()
            assert "'hopflow.flows'" in text and not any(f"'{g}':" in text for g in ("flows", "tasks", "deployments"))
    import hopflow.flows.batch
    import hopflow.tasks.pathways

    assert Path(hopflow.flows.batch.__file__).parent.name == "flows"
    assert Path(hopflow.tasks.pathways.__file__).parent.name == "tasks"


def imports_of_test_modules(path: Path) -> list[str]:
    """`file:line imports module` for each import in `path` of a test module (test_*) or of conftest, in any form:
    `import tests.test_x`, `from tests import test_x`, `from . import conftest`, `from` the module itself ..."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = [part for part in name.split(".") if part]
            if any(part.startswith("test_") or part == "conftest" for part in parts):
                found.append(f"{path.name}:{node.lineno} imports {name}")
                break
    return found


def test_no_test_file_imports_a_test_module_or_conftest():
    files = sorted(TESTS.rglob("*.py"))
    assert TESTS / "conftest.py" in files and TESTS / "test_queue.py" in files and len(files) > 40
    assert [edge for path in files for edge in imports_of_test_modules(path)] == []


def test_the_test_import_check_sees_every_form(tmp_path):
    # spelled in pieces, so that the grep for such imports in tests/ finds only real ones
    lines = [("import", "tests.test_queue", None), ("from", "test_pathways", "crystal"),
             ("from", "tests", "test_flags"),
             "def f():", ("    from", "conftest", "postgres_url"), ("    from", ".", "conftest"),
             ("from", "tests.conftest", "x"), ("import", "crystals", None), ("from", "prefect_helpers", "wait_for"),
             ("from", "tests.fake_vasp.fake_potcar", "write_fake_psp_dir")]
    sample = tmp_path / "test_probe.py"
    sample.write_text("".join((line if isinstance(line, str) else
                               f"{line[0]} {line[1]}" + (f" import {line[2]}" if line[2] else "")) + "\n"
                              for line in lines))
    assert sorted(edge.split(" imports ")[0] for edge in imports_of_test_modules(sample)) == [
        f"test_probe.py:{line}" for line in (1, 2, 3, 5, 6, 7)]
