"""A Hydra callback that checks the run (or sweep) folder can be created before anything runs.

Hydra creates the folder itself, before the job starts, and a folder it cannot create ends in a
traceback. This callback checks first and stops with one line that names the folder and the fix.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def unwritable_reason(folder: Path) -> str | None:
    """Why `folder` cannot be created or written, or None when it can."""
    existing = folder.expanduser().absolute()
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as error:  # e.g. inside another user's private folder
        return f"{existing}: {error.strerror}"
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _check(folder: str, what: str) -> None:
    reason = unwritable_reason(Path(folder))
    if reason is not None:
        print(f"error: cannot write the {what} folder {folder}: {reason}; set paths.log_dir (or hydra.{what}.dir) "
              "to a folder you can write", file=sys.stderr, flush=True)
        raise SystemExit(2)


class WritableOutput(Callback):
    """Stop before the job when its output folder cannot be created (`hydra.callbacks.writable_output`)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(str(config.hydra.run.dir), "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(str(config.hydra.sweep.dir), "sweep")
