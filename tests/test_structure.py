"""The package's shape: one import name, one-way dependencies, no import cycles, an installable wheel, and the
README's Python API example running as written."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"indexer": "clipsearch.indexer", "search": "clipsearch.search", "ui": "clipsearch.ui",
            "clipsearch": "clipsearch"}
LAYER = {"clipsearch.indexer": 0, "clipsearch.search": 1, "clipsearch.ui": 2}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, name in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


def _imports(module: str, path: Path, top_level_only: bool) -> set[str]:
    """Modules of ours that `module` imports (at module level only, when asked: lazy imports cannot cycle)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` blocks do not run
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*up, base]) if base else ".".join(up)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("clipsearch")}


def test_no_import_cycles_between_modules() -> None:
    mods = _modules()
    graph = {m: {i for i in _imports(m, p, top_level_only=True) if i in mods and i != m} for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n):], n]))
            if n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_dependencies_point_one_way_ui_search_indexer() -> None:
    """indexer never imports search or ui; search never imports ui (lazy imports included)."""
    for mod, path in _modules().items():
        mine = next((LAYER[p] for p in LAYER if mod.startswith(p)), None)
        if mine is None:
            continue
        for imp in _imports(mod, path, top_level_only=False):
            theirs = next((LAYER[p] for p in LAYER if imp.startswith(p)), None)
            assert theirs is None or theirs <= mine, f"{mod} imports {imp} (a higher layer)"


def _readme_api_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.integration
def test_readme_python_api_example_runs_as_written(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
    out = subprocess.run([sys.executable, "-c", _readme_api_example()], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "circle" in out.stdout  # the example prints its hits' paths; the demo library names files by shape


@pytest.mark.integration
def test_wheel_installs_under_one_name_and_searches(tmp_path) -> None:
    """Build the wheel, install it into a fresh venv (dependencies borrowed from this one, the package itself not),
    and use it from outside the source tree."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("clipsearch-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # a plain path: no editable hook
    top = {p.name for p in site.iterdir()}
    assert "clipsearch" in top and not top & {"indexer", "search", "ui"}, sorted(top)
    cli = [str(venv / "bin" / "clipsearch")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    version = subprocess.run([*cli, "--version"], **run)
    assert version.returncode == 0 and re.search(r"\d+\.\d+", version.stdout), version.stderr
    where = subprocess.run([str(py), "-c", "import clipsearch; print(clipsearch.__file__)"], **run).stdout
    assert where.startswith(str(site)), where
    subprocess.run([*cli, "make-sample", "photos", "--count", "12"], check=True, **run)
    home = ["--home", str(tmp_path / "home")]
    indexed = subprocess.run([*cli, "index", "photos", "--model", "demo", "--no-progress", *home], **run)
    assert indexed.returncode == 0, indexed.stderr
    hits = subprocess.run([*cli, "search", "a red circle", "-k", "3", *home], **run)
    assert hits.returncode == 0 and hits.stdout.count("photos/") == 3, hits.stdout + hits.stderr
