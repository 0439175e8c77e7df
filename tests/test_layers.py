"""The layers run one way (pyproject.toml's import-linter contract): data -> models -> training, prediction,
explain -> entry points. A test, so a circle or an upward import fails the suite by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import PROJECT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    """import-linter's check of `project`'s package against its pyproject.toml contract."""
    env = {**os.environ, "PYTHONPATH": str(project)}  # that copy of the package, not the installed one
    return subprocess.run([str(LINT_IMPORTS), "--config", str(project / "pyproject.toml"), "--no-cache"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)


def test_the_import_graph_keeps_the_layers():
    result = lint_imports(PROJECT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract_by_name(tmp_path):
    # the check is real: the data layer importing prediction code (even inside a function) is reported
    shutil.copytree(PROJECT / "animal_lightning", tmp_path / "animal_lightning",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "pyproject.toml", tmp_path / "pyproject.toml")
    images = tmp_path / "animal_lightning" / "data" / "images.py"
    images.write_text(images.read_text() + "\n\ndef planted():\n    from animal_lightning.prediction import predict\n"
                      "    return predict\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "animal_lightning.data is not allowed to import animal_lightning.prediction" in result.stdout
    assert "animal_lightning.data.images -> animal_lightning.prediction" in result.stdout
