"""Zero-shot and open-set figures on the demo data with held-out classes, plus a smoke run on real photos.

1. Trains `experiment=demo_zeroshot` with `python train.py` (the real path): 10 seen demo classes
   and 4 attribute combinations that appear only in the test folder.
2. Predicts the demo test folder once and reports, for each known-class score (msp, maxlogit,
   energy), the AUROC of seen vs unseen images and the share flagged unknown at the calibrated
   threshold; and the generalized zero-shot accuracy (seen, unseen, H; per-class averaged).
3. Real photos (when ../shared/data/awa2 is there): reads the AwA2 attribute files with the real
   task's 40 training classes and checks that the 10 unlabelled animals come out as the unseen
   classes; then predicts the 50 AwA2 sample photos with the demo model (file handling only: a
   model of drawn shapes knows nothing of real animals).

Prints JSON, then a one-line summary.

    python bench/zeroshot.py [--epochs 15] [--log-dir DIR] [--set key=value ...]
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

import torch

from animal_lightning.data.attributes import load_attributes
from animal_lightning.models import AnimalClassifier, openset
from animal_lightning.prediction import collect_inputs, decide, open_set_scores, predict_outputs

PROJECT = Path(__file__).resolve().parents[1]
AWA2 = PROJECT.parent / "shared" / "data" / "awa2"


def train(log_dir: Path, epochs: int, extra: list[str]) -> dict:
    command = [sys.executable, str(PROJECT / "train.py"), "experiment=demo_zeroshot", f"trainer.max_epochs={epochs}",
               f"paths.log_dir={log_dir}", "callbacks.progress_bar=null", "callbacks.model_summary=null", *extra]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise SystemExit(f"training failed:\n{result.stderr[-3000:]}")
    metrics = json.loads(next(log_dir.glob("train/runs/*/metrics.json")).read_text())
    metrics["wall_seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def demo_figures(model: AnimalClassifier, meta: dict) -> dict:
    root = Path(meta["data_root"])
    inputs = collect_inputs(root / "test", model.all_class_names, labels_csv=meta["test_labels"])
    outputs, errors = predict_outputs(model, inputs.paths, num_workers=0, progress=False)
    figures: dict = {"images": len(inputs.paths), "seen_classes": len(model.class_names),
                     "unseen_classes": model.unseen_class_names, "scores": {}}
    for method in openset.SCORES:
        result = open_set_scores(inputs, decide(model, outputs, score=method), errors, len(model.class_names))
        figures["scores"][method] = result["open_set"]
        figures["zero_shot"] = result["zero_shot"]  # the same for every score: attributes decide it
    # the stacking margin (best seen - best unseen compatibility) as a known-class score of its own
    labels = torch.tensor([inputs.labels[n] in model.class_names for n in range(len(inputs.labels))])
    margin = openset.stacking_margin(outputs["compat"], len(model.class_names))
    figures["scores"]["attribute_margin"] = {"auroc": openset.auroc(margin, labels)}
    return figures


def awa2_smoke(model: AnimalClassifier) -> dict | None:
    if not (AWA2 / "attributes").is_dir():
        return None
    folder = AWA2 / "attributes"
    table = load_attributes(folder)
    seen = (folder / "vlg_seen40.txt").read_text().split()
    expected_unseen = (folder / "vlg_unseen10.txt").read_text().split()
    table.check_covers(seen)
    unseen = table.unseen(seen)
    inputs = collect_inputs(AWA2 / "samples", model.all_class_names, recursive=True)
    outputs, errors = predict_outputs(model, inputs.paths, num_workers=0, progress=False)
    decisions = decide(model, outputs)
    return {"attribute_classes": len(table.classes), "attributes": len(table.predicates),
            "unseen_from_files": unseen, "unseen_match_the_task": sorted(unseen) == sorted(expected_unseen),
            "sample_photos": len(inputs.paths), "unreadable": sum(1 for e in errors if e),
            "flagged_unknown": int(decisions.unknown.sum()) if decisions.unknown is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the run here (default: a temp folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra train.py override")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        log_dir = args.log_dir or Path(scratch)
        metrics = train(log_dir, args.epochs, args.set)
        model, meta = AnimalClassifier.from_checkpoint(metrics["best_checkpoint"])
        report = {"benchmark": "zeroshot", "epochs": args.epochs, "train_wall_seconds": metrics["wall_seconds"],
                  "test_phase": {k: v for k, v in metrics["test"].items()
                                 if k in ("test/acc_seen", "test/acc_unseen", "test/H", "test/auroc_unknown")},
                  "demo": demo_figures(model, meta), "awa2_samples": awa2_smoke(model)}
    print(json.dumps(report, indent=2))
    zs, scores = report["demo"]["zero_shot"], report["demo"]["scores"]
    aurocs = ", ".join(f"{name} {100 * s['auroc']:.1f}%" for name, s in scores.items())
    print(f"zeroshot: seen {100 * zs['acc_seen']:.1f}%, unseen {100 * zs['acc_unseen']:.1f}%, "
          f"H {100 * zs['H']:.1f}%; AUROC seen vs unseen: {aurocs}")


if __name__ == "__main__":
    main()
