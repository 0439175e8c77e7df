"""Accuracy at equal compute: the report's recipe against the project's default, trained from scratch.

Each recipe runs as `python train.py` (the real path) on the same data, backbone, image size, batch
size and number of epochs; both are scored on the labelled test folder by the best checkpoint.
Prints JSON, then a one-line summary. Default data: ../shared/data/caltech101 (101 classes,
5,784 training photos, imbalanced; test/<class>/ is held out).

    python bench/recipe_compare.py [--epochs 24] [--backbone resnet18] [--image-size 128]
        [--recipes report,default] [--set default:data.augment.random_erasing=0.25 ...] [--per-class 16:8]
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

from animal_lightning.data.folders import scan_class_folders

PROJECT = Path(__file__).resolve().parents[1]
CALTECH = PROJECT.parent / "shared" / "data" / "caltech101"

# The report's recipe is an experiment config; "default" is what `python train.py` does out of the box.
# The ablations each take one part out of (or add one to) the default, at the same budget.
RECIPES = {
    "report": ["experiment=seed_report"],
    "default": [],
    "default_ema": ["callbacks=ema"],
    "no_augmentation": ["data.augment.enabled=false"],
    "fixres": ["data.augment.train_crop_ratio=0.875"],
    "squash_resize": ["data.resize_mode=squash"],
    "squash_fixres": ["data.resize_mode=squash", "data.augment.train_crop_ratio=0.875"],
    "no_augmentation_squash": ["data.augment.enabled=false", "data.resize_mode=squash"],
    "imagenet_augment": ["data.augment.crop_scale=[0.08,1.0]", "data.augment.policy=trivial_augment"],
    "strong_augment": ["data.augment.policy=trivial_augment", "data.mix.mixup_alpha=0.2",
                       "data.mix.cutmix_alpha=1.0"],
    "no_label_smoothing": ["model.label_smoothing=0"],
    "constant_lr": ["scheduler=none"],
}


def run_recipe(name: str, overrides: list[str], log_dir: Path) -> dict:
    command = [sys.executable, str(PROJECT / "train.py"), *overrides, f"paths.log_dir={log_dir / name}",
               "callbacks.progress_bar=null", "callbacks.model_summary=null"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"recipe {name} failed:\n{result.stderr[-3000:]}")
    metrics_file = next((log_dir / name).glob("train/runs/*/metrics.json"))
    metrics = json.loads(metrics_file.read_text())
    return {"top1": metrics["test"]["test/acc"], "macro_accuracy": metrics["test"]["test/acc_macro"],
            "top5": metrics["test"]["test/acc_top5"], "val_acc_best": metrics["val"]["val/acc_best"],
            "wall_seconds": round(seconds, 1), "epochs": metrics["epochs_completed"],
            "overrides": overrides, "run_dir": metrics["run_dir"], "test_source": metrics["test_source"]}


def add_arguments(parser: argparse.ArgumentParser, *, backbone: str, image_size: int, epochs: int) -> None:
    """The options every recipe benchmark shares: data, backbone, size, batch, epochs, per-row overrides."""
    parser.add_argument("--data", type=Path, default=CALTECH)
    parser.add_argument("--backbone", default=backbone)
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--set", action="append", default=[], metavar="RECIPE:OVERRIDE",
                        help="an extra override for one recipe, e.g. default:data.mix.mixup_alpha=0.2")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--per-class", default=None, type=photo_counts, metavar="TRAIN:TEST",
                        help="a quick pilot: only the first TRAIN photos of each training (and val/) class and "
                             "TEST of each test class, sorted by path, linked into a temporary copy of the data")


def photo_counts(text: str) -> tuple[int, int]:
    """--per-class TRAIN:TEST as two positive counts (argparse turns the error into one line)."""
    try:
        counts = tuple(int(n) for n in text.split(":"))
    except ValueError:
        counts = ()
    if len(counts) != 2 or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TRAIN:TEST, two positive photo counts, e.g. 16:8")
    return counts


def pilot_subset(data: Path, counts: tuple[int, int], scratch: Path) -> Path:
    """A copy of `data` under `scratch` that links the first photos of each class of train/, val/ and test/.

    Class folders and their images are found as the project finds them (recursively, images only); a
    flat test/ folder with a labels CSV has no class folders to take from and is not supported.
    """
    subset = scratch / "pilot_data"
    for split, count in (("train", counts[0]), ("val", counts[0]), ("test", counts[1])):
        if not (data / split).is_dir():
            continue
        for photos in scan_class_folders(data / split).values():
            for photo in sorted(photos)[:count]:
                link = subset / split / photo.relative_to(data / split)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(photo.resolve())
    return subset


def check_data(data: Path) -> Path:
    if not (data / "train").is_dir():
        raise SystemExit(f"no {data}/train: pass --data /path/to/dataset (train/<class>/ and test/<class>/)")
    return data


def common_overrides(args: argparse.Namespace, pretrained: bool) -> tuple[list[str], dict[str, list[str]]]:
    """What every recipe gets (the same data, backbone, size, batch and epochs; on the command line they win
    over an experiment's own values), and each recipe's extra overrides from --set."""
    common = [f"data.root={args.data.resolve()}", f"model={args.backbone}",
              f"model.pretrained={str(pretrained).lower()}", f"model.image_size={args.image_size}",
              f"data.batch_size={args.batch_size}", f"trainer.max_epochs={args.epochs}"]
    extra: dict[str, list[str]] = {}
    for item in args.set:
        recipe, _, override = item.partition(":")
        extra.setdefault(recipe, []).append(override)
    return common, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, backbone="resnet18", image_size=128, epochs=24)
    parser.add_argument("--recipes", default="report,default", help=f"comma-separated, from: {', '.join(RECIPES)}")
    args = parser.parse_args()
    names = args.recipes.split(",")
    source = check_data(args.data)
    with tempfile.TemporaryDirectory() as scratch:
        if args.per_class:
            args.data = pilot_subset(source, args.per_class, Path(scratch))
        common, extra = common_overrides(args, pretrained=False)
        log_dir = args.log_dir or Path(scratch)
        results = {name: run_recipe(name, RECIPES[name] + common + extra.get(name, []), log_dir) for name in names}

    report = {"benchmark": "recipe_compare", "data": str(source),
              "per_class": args.per_class, "backbone": args.backbone,
              "image_size": args.image_size, "batch_size": args.batch_size, "epochs": args.epochs,
              "recipes": results}
    if "report" in results and "default" in results:
        report["top1_gain_points"] = round(100 * (results["default"]["top1"] - results["report"]["top1"]), 2)
    print(json.dumps(report, indent=2))
    parts = [f"{name} top-1 {100 * r['top1']:.1f}% macro {100 * r['macro_accuracy']:.1f}% "
             f"in {r['wall_seconds'] / 60:.1f} min" for name, r in results.items()]
    gain = f"; gain {report['top1_gain_points']} points" if "top1_gain_points" in report else ""
    print("recipe_compare: " + ", ".join(parts) + gain)


if __name__ == "__main__":
    main()
