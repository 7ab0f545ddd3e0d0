"""The project's own files agree with the code: dvc.yaml's code deps, requirements.lock and the
command reference (docs/cli.md)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import BIN

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (a lazy import still runs)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_file(name: str) -> Path | None:
    """The project file of a `stages...` module (a package's __init__.py), or None."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_closure(module: str) -> set[str]:
    """The project files `python -m <module>` runs: the module, what it imports of stages/,
    transitively, and the packages those live in."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(m for m in imported_modules(path) if m.split(".")[0] == "stages")
    return {str(path.relative_to(ROOT)) for path in seen if runs_code(path)}


def runs_code(path: Path) -> bool:
    """False for a file that holds at most a docstring (an empty package __init__.py)."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def test_each_stage_depends_on_exactly_the_code_it_runs():
    """A module a stage imports but dvc.yaml does not list would change without the stage rerunning."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    mismatched = {}
    for name, stage in stages.items():
        module = re.search(r"python -m (stages\.\w+)", stage["cmd"]).group(1)
        listed = {dep for dep in stage.get("deps", []) if dep.endswith(".py")}
        closure = import_closure(module)
        if listed != closure:
            mismatched[name] = {"missing": sorted(closure - listed), "not imported": sorted(listed - closure)}
    assert not mismatched, mismatched


def test_the_lock_file_satisfies_pyproject():
    """requirements.lock was refreshed (`make lock`) after pyproject.toml's last change of a range."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [line.split(" ")[0] for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line]
    locked = {canonicalize_name(Requirement(line).name): line.split("==")[1] for line in lines}
    wanted = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["test"]]]
    unmet = [f"{r} (locked: {locked.get(canonicalize_name(r.name))})" for r in wanted
             if canonicalize_name(r.name) not in locked or locked[canonicalize_name(r.name)] not in r.specifier]
    assert not unmet, "requirements.lock does not satisfy pyproject.toml; run `make lock`: " + "; ".join(unmet)


def cli_reference() -> str:
    """docs/cli.md as typer's own docs generator writes it from the app."""
    done = subprocess.run([str(BIN / "typer"), "pipelines.cli", "utils", "docs", "--name", "cifar10-pipeline",
                           "--title", "Command reference"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_command_reference_is_the_apps():
    """`make cli-docs` regenerates it."""
    assert (ROOT / "docs" / "cli.md").read_text().strip() == cli_reference().strip(), \
        "docs/cli.md differs from the CLI; regenerate it with `make cli-docs`"


@pytest.mark.parametrize("module", ["stages.download", "stages.train"])
def test_the_closure_sees_lazy_imports(module):
    """The checker itself: a stage's closure holds the package __init__ and the schemas it reads."""
    closure = import_closure(module)
    assert {"stages/__init__.py", "stages/common/schemas.py", "stages/common/errors.py"} <= closure, closure
    assert sys.modules  # the closure is read from the files, nothing is imported
