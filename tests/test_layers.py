"""Dependencies point one way: the core (`hopflow` minus its command line) imports no flow, task, deployment or
command-line module, at module level or inside a function; and no generic top-level package is installed."""

from __future__ import annotations

import ast
import importlib.metadata
import site
from pathlib import Path

import hopflow

CORE = Path(hopflow.__file__).parent
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
