"""Hydra multirun bookkeeping: each job's outcome on disk, and one summary table when the sweep ends.

`SweepSummary` is a Hydra callback (conf/hydra/default.yaml). At the end of every job it writes
`job_status.json` into the job's folder (status, error, wall time, overrides); that runs in whatever
process ran the job, so it works with the basic, joblib and submitit launchers alike. When the sweep
ends it reads every job folder of the sweep and prints, and writes as `summary.csv` and
`summary.md` into the sweep folder, one row per job: overrides, status, val/acc_best, test/acc,
epochs, wall time and run folder. A job that failed is a row with status `failed` and its error.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from animal_lightning.atomic import write_text_atomic
from animal_lightning.compat import job_return_value
from animal_lightning.reports import rows_csv

log = logging.getLogger(__name__)

STATUS_FILE = "job_status.json"
ERROR_FILE = "job_error.txt"  # written by train.py when a sweep job fails (its one-line reason)
COLUMNS = ["job", "overrides", "status", "val/acc_best", "test/acc", "epochs", "wall_s", "run_dir", "error"]


class SweepSummary(Callback):
    def __init__(self) -> None:
        self._started: float | None = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.monotonic()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        output_dir = Path(config.hydra.runtime.output_dir)
        status, error = "completed", None
        returned = job_return_value(job_return)
        if job_return.status == JobStatus.FAILED:
            reason = f"{type(returned).__name__}: {returned}"
            status, error = "failed", (reason.splitlines() or [""])[0][:500]
        elif not _finite(returned):
            status = "failed"  # train.py returns None for a job that raised or ended without a finite score
            error_file = output_dir / ERROR_FILE
            error = error_file.read_text().strip() if error_file.is_file() else "no finite val/acc_best"
        record = {"status": status, "error": error, "overrides": list(job_return.overrides or []),
                  "job": int(config.hydra.job.num) if config.hydra.job.get("num") is not None else 0,
                  "wall_s": round(time.monotonic() - self._started, 1) if self._started is not None else None}
        write_text_atomic(output_dir / STATUS_FILE, json.dumps(record, indent=1) + "\n")
        if str(config.hydra.get("mode")).endswith(RunMode.MULTIRUN.name):  # an enum or its name
            # kept up to date after every job: a sweeper that gives up at the end (Optuna when every trial
            # failed) never reaches on_multirun_end, and the table must still be there
            self._write(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table, rows = self._write(sweep_dir)
        if rows:
            failed = sum(1 for row in rows if row["status"] != "completed")
            print(f"\nSweep summary ({len(rows)} jobs, {failed} failed): {sweep_dir / 'summary.csv'}\n{table}",
                  flush=True)

    @staticmethod
    def _write(sweep_dir: Path) -> tuple[str, list[dict]]:
        rows = summarize(sweep_dir)
        if not rows:
            return "", rows
        write_text_atomic(sweep_dir / "summary.csv",
                          rows_csv([{**row, "overrides": " ".join(row["overrides"])} for row in rows], COLUMNS))
        common = shared_overrides(rows)
        table = (f"common overrides: {' '.join(common)}\n\n" if common else "") + markdown_table(rows, common)
        write_text_atomic(sweep_dir / "summary.md", table + "\n")
        return table, rows


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def summarize(sweep_dir: Path) -> list[dict]:
    """One row per job folder of a sweep (those holding .hydra/overrides.yaml), in job order."""
    rows = []
    for folder in sweep_dir.iterdir():
        if not (folder / ".hydra" / "overrides.yaml").is_file():
            continue
        status = _read_json(folder / STATUS_FILE) or {}
        metrics = _read_json(folder / "metrics.json") or {}
        overrides = status.get("overrides") or _read_overrides(folder)
        number = status.get("job", int(folder.name) if folder.name.isdigit() else None)
        row = {"job": number, "overrides": list(overrides),
               # a job without a status file was killed (or is still running when the sweep was cut short)
               "status": status.get("status", "incomplete"), "val/acc_best": _metric(metrics, "val", "val/acc_best"),
               "test/acc": _metric(metrics, "test", "test/acc"), "epochs": metrics.get("epochs_completed"),
               "wall_s": status.get("wall_s"), "run_dir": str(folder), "error": status.get("error") or ""}
        rows.append(row)
    return sorted(rows, key=lambda row: (row["job"] is None, row["job"] or 0, row["run_dir"]))


def _metric(metrics: dict, split: str, name: str) -> float | None:
    value = (metrics.get(split) or {}).get(name)
    return round(float(value), 4) if value is not None else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_overrides(folder: Path) -> list[str]:
    lines = (folder / ".hydra" / "overrides.yaml").read_text().splitlines()
    return [line[2:].strip() for line in lines if line.startswith("- ")]


def shared_overrides(rows: list[dict]) -> list[str]:
    """The overrides every job has (the sweep's fixed settings), in the first job's order."""
    if len(rows) < 2:
        return []
    others = [set(row["overrides"]) for row in rows[1:]]
    return [o for o in rows[0]["overrides"] if all(o in other for other in others)]


def markdown_table(rows: list[dict], common: list[str] = ()) -> str:
    """The summary for a reader: only the overrides that vary between jobs (`common` are left out)."""
    columns = ["job", "overrides", "status", "val/acc_best", "test/acc", "epochs", "wall_s", "run_dir"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        shown = {**row, "overrides": " ".join(o for o in row["overrides"] if o not in common)}
        cells = ["" if shown[c] is None else str(shown[c]) for c in columns]
        if row["error"]:
            cells[2] += f" ({row['error'][:80]})"
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)
