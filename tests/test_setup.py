"""setup.py's promises: the package imports only its declared run-time dependencies (and the standard
library), and declares no dependency it never imports."""
import ast
import re
import sys
from pathlib import Path

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
