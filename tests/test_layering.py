"""The import arrows of the project point down, and nowhere do they form a cycle.

Layers, bottom to top (RANKS below is the table the tests hold the code to):
    splinter/              the model library: stdlib + torch, tokenizers, safetensors, numpy only
    pipeline/settings.py   every job's settings; pipeline/progress.py the console; pipeline/signals.py stops;
                           pipeline/console.py keeps Ray's notices off stderr
    pipeline/storage/      filesystems (local, S3), input formats, sources (read + shard), model files
    pipeline/engine/       what a job is, batches, commits, the runner (the only code mapping stages onto Ray)
    pipeline/stages/       plain batch -> batch classes; never ray
    pipeline/corpus/       the Ray Data jobs: mine, extract, evaluate
    pipeline/training/     the Ray Train jobs: pretrain, finetune, the few-shot grid
    pipeline/report/       `splinter report`: reads any job's output records, draws the report page
    pipeline/submit.py     cluster submission; pipeline/cli.py the application, the only typer user
    jobs/                  `ray job submit` entrypoints over the CLI
A module may import its own layer and the layers below. Every import counts, including those inside
functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("splinter", "pipeline", "jobs")
# What the model library may import besides the standard library.
LIBRARY_DEPENDENCIES = {"torch", "tokenizers", "safetensors", "numpy"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            # `from pipeline import cli` imports the module pipeline.cli.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _project_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _third_party(path: Path) -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    tops = {m.split(".")[0] for m in _imports(path)}
    return {t for t in tops if t and t not in stdlib and t not in PACKAGES}


GRAPH = _project_graph()

# Layer of every module, by its longest matching prefix; higher may import lower or equal, never higher.
RANKS = {
    "splinter": 0,
    "pipeline": 1,  # the package itself, pipeline.settings, pipeline.progress, pipeline.signals, pipeline.paths
    "pipeline.storage": 2,
    "pipeline.engine": 3,
    "pipeline.stages": 4,
    "pipeline.corpus": 5,
    "pipeline.training": 5,
    "pipeline.report": 6,
    "pipeline.submit": 6,
    "pipeline.cli": 7,
    "jobs": 8,
}
# Modules of the bottom pipeline layer: anything else at pipeline/'s top level must be placed in RANKS.
PIPELINE_BASE = {"pipeline", "pipeline.settings", "pipeline.progress", "pipeline.signals", "pipeline.paths",
                 "pipeline.console"}


def _rank(module: str) -> int:
    best = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)
    return RANKS[best]


def test_graph_is_not_empty() -> None:
    # The checks below are only as good as the parse: make sure they see the real project.
    assert {"splinter.model", "splinter.checkpoint", "pipeline.cli", "pipeline.engine.runner"} <= set(GRAPH)
    assert "splinter.model" in GRAPH["splinter.checkpoint"]


@pytest.mark.parametrize("path", sorted((ROOT / "splinter").rglob("*.py")), ids=lambda p: p.name)
def test_model_library_imports_only_its_dependencies(path: Path) -> None:
    extra = _third_party(path) - LIBRARY_DEPENDENCIES
    assert not extra, (
        f"{path.relative_to(ROOT)} imports {sorted(extra)}: splinter/ may use only {sorted(LIBRARY_DEPENDENCIES)}"
    )
    upward = {m for m in GRAPH[_module_name(path)] if not m.startswith("splinter")}
    assert not upward, (
        f"{path.relative_to(ROOT)} imports {sorted(upward)} from a layer above the model library"
    )


def test_every_module_has_a_layer() -> None:
    for name in GRAPH:
        if name.startswith("pipeline") and name.count(".") == 1:
            assert name in PIPELINE_BASE or name in RANKS, (
                f"{name} sits at pipeline/'s top level without a layer: move it into a subpackage by role "
                "or give it a rank in RANKS"
            )


def test_imports_point_down_the_layers() -> None:
    for name, deps in GRAPH.items():
        for dep in deps:
            assert _rank(dep) <= _rank(name), (
                f"{name} (layer {_rank(name)}) imports {dep} (layer {_rank(dep)}): imports only point down"
            )


def test_layer_check_catches_an_upward_import(monkeypatch) -> None:
    monkeypatch.setitem(GRAPH, "pipeline.storage.sources",
                        GRAPH["pipeline.storage.sources"] | {"pipeline.engine.runner"})
    with pytest.raises(AssertionError, match="imports only point down"):
        test_imports_point_down_the_layers()


def test_no_two_modules_share_a_file_name() -> None:
    """A name says which module it is: no `config.py` in two packages, no `mine.py` twice."""
    seen: dict[str, str] = {}
    for name in GRAPH:
        if name.startswith("jobs"):  # entrypoints are named after the commands they run
            continue
        path = _path(name)
        if path.name == "__init__.py":
            continue
        assert path.name not in seen, f"{name} and {seen[path.name]} share the file name {path.name}"
        seen[path.name] = name


def test_pipeline_top_level_stays_small() -> None:
    top = [p for p in (ROOT / "pipeline").glob("*.py")]
    assert len(top) <= 10, f"pipeline/ has {len(top)} top-level modules: put new ones in a subpackage by role"


def test_checkpoint_depends_on_model_never_the_reverse() -> None:
    assert "splinter.checkpoint" not in GRAPH["splinter.model"]


def _path(module: str) -> Path:
    path = ROOT / (module.replace(".", "/") + ".py")
    return path if path.exists() else ROOT / module.replace(".", "/") / "__init__.py"


def _reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for dep in GRAPH[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_stages_never_reach_ray() -> None:
    """A stage, and everything it imports, runs without Ray: only pipeline/engine/runner.py maps stages onto it."""
    for path in sorted((ROOT / "pipeline" / "stages").rglob("*.py")):
        name = _module_name(path)
        for module in {name} | _reachable(name):
            assert "ray" not in _third_party(_path(module)), f"{name} reaches ray through {module}"


def test_only_the_cli_and_entrypoints_sit_on_top() -> None:
    for name, deps in GRAPH.items():
        if name.startswith("jobs") or name == "pipeline.cli":
            continue
        assert "pipeline.cli" not in deps, f"{name} imports the CLI: the application sits on top"
        assert not any(d.startswith("jobs") for d in deps), f"{name} imports jobs/"
        assert "typer" not in _third_party(_path(name)), f"{name} imports typer: only pipeline/cli.py may"


def test_no_import_cycles_anywhere() -> None:
    # Tarjan-free check: a depth-first search that reports the first back edge as the cycle it closes.
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_cycle_check_catches_a_cycle(monkeypatch) -> None:
    """The cycle check itself must fail on a cycle (a check that cannot fail proves nothing)."""
    monkeypatch.setitem(GRAPH, "splinter.model", GRAPH["splinter.model"] | {"splinter.checkpoint"})
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles_anywhere()


def test_import_splinter_needs_only_its_dependencies() -> None:
    """Every splinter module imports with ray, pyarrow, typer, transformers, datasets and pipeline blocked."""
    modules = sorted(m for m in GRAPH if m.startswith("splinter"))
    code = f"""
import importlib, importlib.abc, sys
BLOCKED = {{"ray", "pyarrow", "typer", "transformers", "datasets", "pandas", "pipeline", "jobs"}}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {{name}}")
sys.meta_path.insert(0, Block())
import splinter
for name in splinter.__all__:
    getattr(splinter, name)
for module in {modules!r}:
    importlib.import_module(module)
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
