"""Fine-tuning real ImageNet weights on real photos: the report's recipe, a linear probe and ours.

Every row starts from the same packaged EfficientNet-Lite0 ImageNet weights (model=efficientnet_lite0,
pretrained, no internet needed) at the same image size, batch size and number of epochs, and is
scored on the held-out test folder:
- `probe`: the floor. The frozen network's features of the training images (evaluation transform,
  the whole photo squashed to a square as finetune_cpu and the report resize), an L2-regularised
  logistic regression (animal_lightning/models/probe.py, penalty chosen on the validation split),
  scored on the test images. No training loop. `probe_crop`: the same on centre crops.
- `report`: the report's recipe (`experiment=seed_report`: squash resize, no augmentation, AdamW
  1e-3 constant on every layer, no label smoothing), as `python train.py` runs it.
- `finetune_cpu`: the project's recommendation for a CPU, and ablations that change one part of it.

Prints JSON, then a one-line summary. Default data: ../shared/data/caltech101 (101 classes, 5,784
training photos, 2,893 test photos).

    python bench/finetune_compare.py [--image-size 224] [--epochs 3] [--rows probe,report,finetune_cpu]
        [--per-class 16:8]   # a quick pilot on the first 16 training and 8 test photos of each class
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from recipe_compare import add_arguments, check_data, common_overrides, pilot_subset, run_recipe

from animal_lightning.data import AnimalDataModule
from animal_lightning.models import AnimalClassifier
from animal_lightning.models.metrics import MeanClassRecall
from animal_lightning.models.probe import fit_linear_probe

ROWS = {
    "report": ["experiment=seed_report"],
    "default": [],  # python train.py's defaults with this backbone
    "finetune_gpu": ["experiment=finetune_gpu", "trainer=cpu", "data.num_workers=auto"],  # the GPU recipe on a CPU
    "finetune_cpu": ["experiment=finetune_cpu"],
    # ablations of finetune_cpu, one part each
    "finetune_cpu_random_head": ["experiment=finetune_cpu", "model.head_init=random"],
    "finetune_cpu_head_warmup": ["experiment=finetune_cpu", "model.head_init=random", "model.freeze_backbone_epochs=1"],
    "finetune_cpu_full_lr": ["experiment=finetune_cpu", "model.backbone_lr_mult=1.0"],
    "finetune_cpu_train_bn": ["experiment=finetune_cpu", "model.freeze_bn=false"],
    "finetune_cpu_ema": ["experiment=finetune_cpu", "callbacks=ema"],
    "finetune_cpu_trivial_augment": ["experiment=finetune_cpu", "data.augment.policy=trivial_augment",
                                     "data.augment.random_erasing=0.1"],
    "finetune_cpu_no_smoothing": ["experiment=finetune_cpu", "model.label_smoothing=0"],
    "finetune_cpu_lr1e-3": ["experiment=finetune_cpu", "optimizer.lr=1e-3"],
    "finetune_cpu_fixres": ["experiment=finetune_cpu", "data.augment.train_crop_ratio=0.875"],
    "finetune_cpu_crop": ["experiment=finetune_cpu", "data.resize_mode=crop"],
}
# linear probes: their evaluation resize (the training images' too: a probe sees no augmentation)
PROBES = {"probe": "squash", "probe_crop": "crop"}  # probe: finetune_cpu's and the report's preprocessing


def linear_probe(data: Path, backbone: str, image_size: int, batch_size: int, resize_mode: str) -> dict:
    """Frozen features + logistic regression, through the project's own DataModule and probe code."""
    start = time.perf_counter()
    datamodule = AnimalDataModule(data, batch_size=batch_size, num_workers="auto", resize_mode=resize_mode)
    model = AnimalClassifier(datamodule.class_names, backbone=backbone, pretrained=True, image_size=image_size,
                             resize_mode=resize_mode)
    datamodule.use_preprocess(model.preprocess)
    datamodule.setup("fit")
    extract = partial(model.probe_features, autocast=partial(torch.autocast, "cpu", torch.bfloat16))
    train = extract(datamodule.probe_dataloader("train"))
    val = extract(datamodule.probe_dataloader("val"))
    test = extract(datamodule.test_dataloader())
    features_seconds = time.perf_counter() - start
    weight, bias, info = fit_linear_probe(train, val, len(datamodule.class_names))
    logits = test[0] @ weight.T + bias
    macro = MeanClassRecall(len(datamodule.class_names))
    macro.update(logits, test[1])
    images = len(train[1]) + len(val[1]) + len(test[1])
    return {"top1": float((logits.argmax(1) == test[1]).float().mean()), "macro_accuracy": float(macro.compute()),
            "val_acc_best": info["val_acc"], "l2": info["l2"], "wall_seconds": round(time.perf_counter() - start, 1),
            "images_per_s": round(images / features_seconds, 1), "test_images": len(test[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, backbone="efficientnet_lite0", image_size=224, epochs=3)
    parser.add_argument("--rows", default="probe,report,finetune_cpu",
                        help=f"comma-separated: {', '.join(PROBES)}, {', '.join(ROWS)}")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    source = check_data(args.data)
    with tempfile.TemporaryDirectory() as scratch:
        if args.per_class:
            args.data = pilot_subset(source, args.per_class, Path(scratch))
        common, extra = common_overrides(args, pretrained=True)
        train_images = len(AnimalDataModule(args.data, check_images=False).index.train)
        log_dir = args.log_dir or Path(scratch)
        for name in args.rows.split(","):
            if name in PROBES:
                results[name] = linear_probe(args.data, args.backbone, args.image_size, args.batch_size,
                                             PROBES[name])
            else:
                results[name] = run_recipe(name, ROWS[name] + common + extra.get(name, []), log_dir)
                # the whole command's rate: training images x epochs over its wall time (start-up, checks,
                # validation and the test included)
                results[name]["images_per_s"] = round(train_images * results[name]["epochs"]
                                                      / results[name]["wall_seconds"], 1)
            print(f"{name}: {json.dumps(results[name])}", flush=True)

    report = {"benchmark": "finetune_compare", "data": str(source),
              "per_class": args.per_class, "backbone": args.backbone,
              "image_size": args.image_size, "batch_size": args.batch_size, "epochs": args.epochs, "rows": results}
    if "report" in results and "finetune_cpu" in results:  # the target: at most 0.5 (half the mistakes)
        report_errors = 1 - results["report"]["top1"]
        report["errors_vs_report"] = round((1 - results["finetune_cpu"]["top1"]) / report_errors, 3) \
            if report_errors > 0 else None
    if "probe" in results and "finetune_cpu" in results:
        report["points_over_probe"] = round(100 * (results["finetune_cpu"]["top1"] - results["probe"]["top1"]), 2)
    print(json.dumps(report, indent=2))
    parts = [f"{name} top-1 {100 * r['top1']:.1f}% macro {100 * r['macro_accuracy']:.1f}% "
             f"in {r['wall_seconds'] / 60:.1f} min" for name, r in results.items()]
    ratio = f"; finetune_cpu makes {report['errors_vs_report']}x the report's errors" \
        if report.get("errors_vs_report") is not None else ""
    print("finetune_compare: " + ", ".join(parts) + ratio)


if __name__ == "__main__":
    main()
