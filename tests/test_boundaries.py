"""The package boundary: the library (`minillm/`) never imports the harness (`evals/`).

Imports are read from the source with `ast`, so an import inside a function (done lazily to keep
start-up fast) counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parent.parent / "minillm"


def imported_modules(source: str) -> set[str]:
    """Every module an `import` or `from ... import` statement names, anywhere in the source."""
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def is_harness(module: str) -> bool:
    return module == "evals" or module.startswith("evals.")


@pytest.mark.parametrize("path", sorted(LIBRARY.rglob("*.py")), ids=lambda path: path.name)
def test_the_library_never_imports_the_harness(path):
    harness = sorted(filter(is_harness, imported_modules(path.read_text(encoding="utf-8"))))
    assert not harness, f"{path.relative_to(LIBRARY.parent)} imports {', '.join(harness)}"


def test_the_check_sees_imports_in_every_form():
    source = "import evals.sweep\nfrom evals import cli\ndef later():\n    from evals.report import write_report\n"
    assert sorted(filter(is_harness, imported_modules(source))) == ["evals", "evals.report", "evals.sweep"]
    assert not any(map(is_harness, imported_modules("import evaluate\nfrom minillm import evals_like\n")))
