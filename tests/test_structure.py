"""The shape of the code, so that it cannot slide back: small modules, short parameter lists, and
the layers of DESIGN.md as pyproject.toml's import-linter contract (no import circles, imports
inside functions counted)."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted((ROOT / "cnnlab").glob("*.py"))
MAX_LINES = 400
MAX_PARAMETERS = 8
# the first parameter of a method, or of an autograd Function's forward/backward (its context)
IMPLICIT = {"self", "cls", "ctx"}


def _parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Every named parameter (``*args`` and ``**kwargs`` included) but the implicit first one."""
    args = function.args
    named = args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]
    return [a.arg for a in named if a.arg not in IMPLICIT]


def test_the_package_has_modules_to_check():
    assert len(MODULES) > 10


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_module_is_over_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it by concern (at most {MAX_LINES})"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_function_takes_more_than_8_parameters(path):
    long = [f"{node.name} (line {node.lineno}): {len(_parameters(node))}"
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(_parameters(node)) > MAX_PARAMETERS]
    assert not long, f"{path.name}: more than {MAX_PARAMETERS} parameters in {'; '.join(long)}; pass a value instead"


def test_imports_follow_the_layers_of_pyproject_toml():
    beside = Path(sys.executable).with_name("lint-imports")  # this environment's, else one on the PATH
    linter = str(beside) if beside.is_file() else shutil.which("lint-imports")
    if linter is None:
        pytest.skip("lint-imports (import-linter) is not installed: pip install -e '.[test]'")
    done = subprocess.run([linter, "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
