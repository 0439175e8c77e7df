"""Epoch wall time of real training runs: the project's default recipe against the report's, via train.py.

Each recipe is a real `python train.py` subprocess (one after the other, never together) that trains
one epoch and validates it. A callback reports the training epoch's and the validation's wall time;
the whole command's wall time (start-up, dataset scan, checkpointing included) is measured too.

- ours: the defaults (`model=resnet50`, `precision: auto` = bf16 where the CPU has it, channels_last,
  35-100% crops and flips at 224 px);
- report: `experiment=seed_report` (squash to 224, no augmentation, AdamW 1e-3) in fp32 with
  contiguous memory, as the report trained.

    python bench/epoch_time.py [--data DIR] [--recipes ours,report] [--epochs 1] [--backbone resnet50]
        [--override KEY=VALUE ...]

--data is a folder with train/<class>/ images; by default ../shared/data/caltech101 (5,784 real
photos of 101 classes). Prints JSON, then a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch import Callback

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared" / "data" / "caltech101"
RECIPES = {
    "ours": [],
    "report": ["experiment=seed_report", "trainer.precision=32-true", "model.channels_last=false"],
}
MARK = "EPOCH_TIME "


class EpochClock(Callback):
    """Prints one JSON line per epoch (rank zero): the training batches' wall time, up to the start of the
    end-of-epoch validation, and the validation's wall time (Lightning runs it inside the training epoch)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.train_start, self.val_start, self.val_end = time.perf_counter(), None, None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        train_end = self.val_start or time.perf_counter()
        record = {"epoch": trainer.current_epoch, "seconds": round(train_end - self.train_start, 1),
                  "val_seconds": round(self.val_end - self.val_start, 1) if self.val_end else 0.0,
                  "train_images": trainer.num_training_batches * trainer.datamodule.batch_size}
        print(MARK + json.dumps(record), flush=True)


def run_recipe(name: str, data: Path, args, scratch: Path) -> dict:
    command = [sys.executable, str(PROJECT / "train.py"), f"data.root={data}", f"model={args.backbone}",
               "model.pretrained=false", f"trainer.max_epochs={args.epochs}", "test=false",
               "trainer.num_sanity_val_steps=0", "callbacks.progress_bar=null", f"paths.root_dir={scratch / name}",
               "+callbacks.epoch_clock._target_=epoch_time.EpochClock", *RECIPES[name], *args.override]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT / "bench"), str(PROJECT)]),
           "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{name}: train.py failed:\n{result.stderr[-3000:]}")
    epochs = [json.loads(line[len(MARK):]) for line in result.stdout.splitlines() if line.startswith(MARK)]
    return {"overrides": RECIPES[name], "command_seconds": round(wall, 1), "epochs": epochs,
            "train_images_per_s": round(epochs[-1]["train_images"] / epochs[-1]["seconds"], 2) if epochs else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED if (SHARED / "train").is_dir() else None)
    parser.add_argument("--recipes", default="ours,report")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--override", action="append", default=[],
                        help="a train.py override for every recipe (repeatable), e.g. data.num_workers=2")
    args = parser.parse_args()
    if args.data is None:
        parser.error("no --data given and ../shared/data/caltech101 is not here: pass a folder with train/<class>/")
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    if set(names) - set(RECIPES):
        parser.error(f"--recipes: choose from {', '.join(RECIPES)}")

    results = {}
    with tempfile.TemporaryDirectory() as scratch_dir:
        for name in names:
            results[name] = run_recipe(name, args.data, args, Path(scratch_dir))
            print(f"{name}: {results[name]['epochs']}", flush=True)
    summary = {"benchmark": "epoch_time", "data": str(args.data), "backbone": args.backbone, "recipes": results}
    if {"ours", "report"} <= set(results):
        ours, report = results["ours"]["epochs"][-1], results["report"]["epochs"][-1]
        summary["report_over_ours"] = round((report["seconds"] + report["val_seconds"]) /
                                            (ours["seconds"] + ours["val_seconds"]), 2)
    print(json.dumps(summary, indent=2))
    print("epoch_time: " + ", ".join(f"{name} train epoch {r['epochs'][-1]['seconds']} s + validation "
                                     f"{r['epochs'][-1]['val_seconds']} s ({r['train_images_per_s']} img/s)"
                                     for name, r in results.items() if r["epochs"]) +
          (f"; report / ours {summary['report_over_ours']}x" if "report_over_ours" in summary else ""))


if __name__ == "__main__":
    main()
