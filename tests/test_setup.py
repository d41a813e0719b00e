"""setup.py's promises: the package imports only its declared run-time dependencies (and the standard
library), and declares no dependency it never imports; its commands are the scripts' mains, and every
program says the one version."""
import ast
import importlib
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import mulmodseg

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = [ROOT / "train.py", ROOT / "infer.py"]


def imported_modules(paths) -> set[str]:
    """Top-level names of every absolute import in the files (relative imports are the package's own)."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_the_package_imports_only_what_setup_py_requires():
    requires = re.search(r"install_requires=\[(.*?)\]", (ROOT / "setup.py").read_text()).group(1)
    declared = set(re.findall(r'"([A-Za-z0-9_.-]+)"', requires))
    assert declared == {"torch", "nibabel", "numpy", "scipy", "ftfy", "regex"}
    used = imported_modules([*(ROOT / "mulmodseg").rglob("*.py"), *PROGRAMS])
    third_party = used - set(sys.stdlib_module_names) - {"__future__", "mulmodseg"}
    assert third_party == declared, third_party ^ declared


ENTRY_POINTS = {
    "mulmodseg-train": "mulmodseg.cli.train:main",
    "mulmodseg-predict": "mulmodseg.cli.predict:main",
    "mulmodseg-evaluate": "mulmodseg.cli.evaluate:main",
    "mulmodseg-text": "mulmodseg.cli.text:main",
}


def test_console_commands_are_the_scripts_mains():
    declared = dict(re.findall(r'"(mulmodseg-\w+) = ([\w.:]+)"', (ROOT / "setup.py").read_text()))
    assert declared == ENTRY_POINTS
    # The scripts' own globals (run_path: not as __main__, so nothing runs).
    assert runpy.run_path(str(ROOT / "train.py"))["main"] is importlib.import_module("mulmodseg.cli.train").main
    assert runpy.run_path(str(ROOT / "infer.py"))["main"] is importlib.import_module("mulmodseg.cli.predict").main
    # setup.py reads mulmodseg.__version__: one source of truth.
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == mulmodseg.__version__ == "0.1.0"


@pytest.mark.parametrize("target", sorted(ENTRY_POINTS.values()))
def test_every_command_has_the_one_version(target, capsys):
    module, name = target.split(":")
    with pytest.raises(SystemExit) as exit_:
        getattr(importlib.import_module(module), name)(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip().endswith(f" {mulmodseg.__version__}")


@pytest.mark.parametrize("command", sorted(ENTRY_POINTS))
def test_installed_commands_say_their_own_name(command, capsys, monkeypatch):
    module, name = ENTRY_POINTS[command].split(":")
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{command}"])
    with pytest.raises(SystemExit):
        getattr(importlib.import_module(module), name)(["--version"])
    assert capsys.readouterr().out.strip() == f"{command} {mulmodseg.__version__}"


@pytest.mark.parametrize("module", ["mulmodseg.evaluate", "mulmodseg.text"])
def test_python_m_programs_say_how_they_were_started(module, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"/src/{module.replace('.', '/')}/__main__.py"])
    target = ENTRY_POINTS["mulmodseg-" + module.split(".")[1]]
    with pytest.raises(SystemExit):
        getattr(importlib.import_module(target.split(":")[0]), "main")(["--version"])
    assert capsys.readouterr().out.strip() == f"python -m {module} {mulmodseg.__version__}"
