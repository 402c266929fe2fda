"""Which modules may import which: shared helpers live below both of their users, so `medtune predict` does not
depend on the evaluation driver (and a change there cannot break predict's resume)."""

from __future__ import annotations

import ast
from pathlib import Path

import medtune

PACKAGE = Path(medtune.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_serve_does_not_import_the_evaluation_driver():
    importers = {path.name: sorted(m for m in imported_modules(path) if m in ("medtune.eval.runner",
                                                                             "medtune.eval.clin"))
                 for path in sorted((PACKAGE / "serve").glob("*.py"))}
    assert {name: found for name, found in importers.items() if found} == {}


def test_eval_and_predict_import_their_resume_helpers_from_data_resume():
    from medtune.data import resume
    from medtune.eval import runner
    from medtune.serve import predict

    for name in ("read_predictions", "read_settings", "write_atomically", "folder_fingerprint", "progress"):
        assert getattr(runner, name) is getattr(predict, name) is getattr(resume, name), name
