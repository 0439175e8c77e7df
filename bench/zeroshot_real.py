"""Naming animals and objects without training photos, on real photos: ImageNet knowledge and attributes.

1. Caltech-101 (../shared/data/caltech101): 12 classes whose names are ImageNet-1k classes or
   hypernyms of them are held out as zero-shot candidates (data.unseen_classes), 4 more with no
   ImageNet match are held out as novel (no name can be given: open set only), and
   `python train.py experiment=finetune_cpu` (the packaged EfficientNet-Lite0 ImageNet weights)
   trains on the other 85. The test split of all 101 classes goes into one flat test/ folder.
2. AwA2 animals in Caltech-101: beaver, dalmatian, elephant and leopard are seen; dolphin, giant
   panda and rhinoceros are unseen, with their AwA2 attribute rows (../shared/data/awa2). Both sources
   apply: giant panda is an ImageNet class, dolphin a hypernym of one (killer whale), rhinoceros has
   attributes alone.

Each trained checkpoint predicts its test folder once; the zero-shot decisions are then made with each
source setting (both, imagenet, attributes) from the same outputs, and reported per-class (Xian et
al.): seen, unseen, H; the closed-set macro accuracy of the seen test images (the classifier alone);
AUROC seen vs novel; and the generalized figures at other values of model.zero_shot_keep. For part 1
the ImageNet evidence is also taken from a frozen copy of the pretrained network (not the fine-tuned
features), recalibrated on the validation split, to measure what fine-tuning drift costs.

Prints JSON, then a summary table.

    python bench/zeroshot_real.py [--part caltech|awa2|both] [--epochs 3] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from animal_lightning.compat import cpu_has_amx, cpu_has_avx512_bf16
from animal_lightning.data import AnimalDataModule
from animal_lightning.models import AnimalClassifier, openset
from animal_lightning.prediction import collect_inputs, decide, open_set_scores, predict_outputs, score

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared" / "data"
CALTECH = SHARED / "caltech101"
AWA2 = SHARED / "awa2" / "attributes"
NAMED = ["dalmatian", "panda", "llama", "hedgehog", "flamingo", "kangaroo", "starfish", "strawberry", "pizza",
         "umbrella", "crab", "scorpion"]  # Caltech classes with an ImageNet-1k match (exact, synonym or hypernym)
NOVEL = ["emu", "ibis", "sea_horse", "brontosaurus"]  # no ImageNet-1k match, no attributes: open set only
AWA2_SEEN = {"beaver": "beaver", "dalmatian": "dalmatian", "elephant": "elephant", "Leopards": "leopard"}
AWA2_UNSEEN = {"dolphin": "dolphin", "panda": "giant+panda", "rhino": "rhinoceros"}


def build_root(folder: Path, seen: dict[str, str], held_out: dict[str, str]) -> Path:
    """train/<name>/ for the seen classes; one flat test/ of every class's test photos with test_labels.csv
    (symbolic links: nothing copied). Keys are Caltech folder names, values the class names used."""
    labels = ["image_id,class"]
    for caltech, name in {**seen, **held_out}.items():
        if caltech in seen:
            (folder / "train" / name).mkdir(parents=True, exist_ok=True)
            for photo in sorted((CALTECH / "train" / caltech).iterdir()):
                (folder / "train" / name / photo.name).symlink_to(photo)
        (folder / "test").mkdir(parents=True, exist_ok=True)
        for photo in sorted((CALTECH / "test" / caltech).iterdir()):
            image_id = f"{caltech}__{photo.name}"
            (folder / "test" / image_id).symlink_to(photo)
            labels.append(f"{image_id},{name}")
    (folder / "test_labels.csv").write_text("\n".join(labels) + "\n")
    return folder


def write_attribute_subset(folder: Path, classes: list[str]) -> Path:
    """The AwA2 files restricted to `classes` (their rows, in AwA2's order)."""
    names = [line.split()[-1] for line in (AWA2 / "classes.txt").read_text().splitlines() if line.strip()]
    rows = [line for line in (AWA2 / "predicate-matrix-continuous.txt").read_text().splitlines() if line.strip()]
    keep = [i for i, name in enumerate(names) if name in classes]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("".join(f"{n + 1}\t{names[i]}\n" for n, i in enumerate(keep)))
    (folder / "predicates.txt").write_text((AWA2 / "predicates.txt").read_text())
    (folder / "predicate-matrix-continuous.txt").write_text("".join(rows[i] + "\n" for i in keep))
    return folder


def train(root: Path, log_dir: Path, epochs: int, overrides: list[str]) -> dict:
    command = [sys.executable, str(PROJECT / "train.py"), "experiment=finetune_cpu", f"data.root={root}",
               "data.test_labels=test_labels.csv", f"trainer.max_epochs={epochs}", f"paths.log_dir={log_dir}",
               "callbacks.progress_bar=null", "callbacks.model_summary=null", *overrides]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise SystemExit(f"training failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    metrics = json.loads(next(log_dir.glob("train/runs/*/metrics.json")).read_text())
    metrics["wall_seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def figures(model: AnimalClassifier, inputs, outputs: dict, errors: list[str], **decide_kwargs) -> dict:
    decisions = decide(model, outputs, **decide_kwargs)
    result = open_set_scores(inputs, decisions, errors, len(model.class_names))
    zero_shot = result.get("zero_shot", {})
    return {"acc_seen": zero_shot.get("acc_seen"), "acc_unseen": zero_shot.get("acc_unseen"), "H": zero_shot.get("H"),
            "acc_zsl": zero_shot.get("acc_zsl"), "seen_penalty": zero_shot.get("seen_penalty"),
            "auroc_msp": result["open_set"]["auroc"], "per_class": zero_shot.get("per_class")}


def frozen_copy_outputs(model: AnimalClassifier, paths: list[Path]) -> torch.Tensor:
    """The unseen classes' ImageNet evidence from the pretrained network as it was before fine-tuning."""
    h = model.hparams
    fresh = AnimalClassifier(model.class_names, backbone=h.backbone, pretrained=True, image_size=h.image_size,
                             attributes=h.attributes, unseen_classes=h.unseen_classes, imagenet_map=h.imagenet_map,
                             resize_mode=h.resize_mode, imagenet_knowledge="copy").eval()
    outputs, _ = predict_outputs(fresh, paths, num_workers=1, progress=False)
    return outputs["imagenet"]


def evaluate(metrics: dict, root: Path, frozen_copy: bool) -> dict:
    model, meta = AnimalClassifier.from_checkpoint(metrics["best_checkpoint"])
    inputs = collect_inputs(root / "test", model.all_class_names, labels_csv=root / "test_labels.csv")
    start = time.perf_counter()
    outputs, errors = predict_outputs(model, inputs.paths, num_workers=1, progress=False)
    seconds = time.perf_counter() - start
    closed = score(inputs, model.class_names, outputs["probabilities"], errors)
    result = {"seen_classes": len(model.class_names), "unseen_classes": model.unseen_class_names,
              "test_images": len(inputs.paths), "predict_images_per_s": round(len(inputs.paths) / seconds, 1),
              "closed_set": {"accuracy": closed["accuracy"], "macro_accuracy": closed["macro_accuracy"]},
              "checkpoint_mb": round(Path(metrics["best_checkpoint"]).stat().st_size / 2**20, 1),
              "imagenet_map": metrics.get("zero_shot", {}).get("imagenet_map"),
              "test_phase": {k: v for k, v in metrics["test"].items() if k.split("/")[-1] in
                             ("acc", "acc_macro", "acc_seen", "acc_unseen", "H", "acc_zsl", "auroc_unknown")},
              "sources": {mode: figures(model, inputs, outputs, errors, sources=mode)
                          for mode in model.zero_shot_modes},
              # the seen-class penalty at other shares of validation images kept seen (model.zero_shot_keep)
              "zero_shot_keep": {keep: {k: v for k, v in figures(model, inputs, outputs, errors,
                                                                 zero_shot_keep=keep).items() if k != "per_class"}
                                 for keep in (0.9, 0.95, 0.97, 0.98, 0.99)}}
    if frozen_copy:
        data = AnimalDataModule(root, num_workers=0, test_labels="test_labels.csv", check_images=False)
        val_paths = [Path(p) for p, _ in data.index.val]
        val_outputs, _ = predict_outputs(model, val_paths, num_workers=1, progress=False)
        start = time.perf_counter()
        val_outputs["imagenet"] = frozen_copy_outputs(model, val_paths)
        outputs = {**outputs, "imagenet": frozen_copy_outputs(model, inputs.paths)}
        copy_seconds = time.perf_counter() - start
        mode = "imagenet"
        margins = openset.stacking_margin(model.zero_shot_scores(val_outputs, mode)[0], len(model.class_names))
        penalty = openset.value_at(openset.quantile_table(margins), 1.0 - model.hparams.zero_shot_keep)
        result["frozen_copy"] = {**figures(model, inputs, outputs, errors, sources=mode, penalty=penalty),
                                 "extra_forward_images_per_s": round((len(val_paths) + len(inputs.paths))
                                                                     / copy_seconds, 1)}
    return result


def summary_rows(name: str, result: dict) -> list[str]:
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    rows = []
    closed = pct(result["closed_set"]["macro_accuracy"])
    for mode, values in result["sources"].items():
        rows.append(f"| {name} | {mode} | {pct(values['acc_seen'])} | {pct(values['acc_unseen'])} | "
                    f"{pct(values['H'])} | {closed} | {pct(values['auroc_msp'])} |")
    if "frozen_copy" in result:
        values = result["frozen_copy"]
        rows.append(f"| {name} | imagenet, frozen copy of the pretrained network | {pct(values['acc_seen'])} | "
                    f"{pct(values['acc_unseen'])} | {pct(values['H'])} | {closed} | {pct(values['auroc_msp'])} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["caltech", "awa2", "both"], default="both")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--awa2-epochs", type=int, default=5)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra train.py override")
    args = parser.parse_args()
    if not CALTECH.is_dir():
        raise SystemExit(f"{CALTECH} not found: this benchmark needs the shared Caltech-101 photos")
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.log_dir or Path(scratch)
        results: dict = {"cpu": platform.processor() or platform.machine(), "amx": cpu_has_amx(),
                         "avx512_bf16": cpu_has_avx512_bf16(), "torch_threads": torch.get_num_threads()}
        table = ["| data | unseen named by | seen | unseen | H | closed-set (seen, macro) | AUROC msp |",
                 "|---|---|---|---|---|---|---|"]
        if args.part in ("caltech", "both"):
            classes = sorted(p.name for p in (CALTECH / "train").iterdir() if p.is_dir())
            seen = {c: c for c in classes if c not in NAMED + NOVEL}
            root = build_root(work / "caltech_data", seen, {c: c for c in NAMED + NOVEL})
            metrics = train(root, work / "caltech_runs", args.epochs,
                            [f"data.unseen_classes=[{','.join(NAMED)}]", *args.set])
            results["caltech"] = {"train_wall_s": metrics["wall_seconds"], **evaluate(metrics, root, True)}
            table += summary_rows("Caltech-101, 85 seen + 12 named + 4 novel", results["caltech"])
        if args.part in ("awa2", "both"):
            root = build_root(work / "awa2_data", AWA2_SEEN, AWA2_UNSEEN)
            attributes = write_attribute_subset(work / "awa2_attributes", [*AWA2_SEEN.values(),
                                                                          *AWA2_UNSEEN.values()])
            metrics = train(root, work / "awa2_runs", args.awa2_epochs, [f"data.attributes={attributes}", *args.set])
            results["awa2"] = {"train_wall_s": metrics["wall_seconds"], **evaluate(metrics, root, False)}
            table += summary_rows("AwA2 animals in Caltech-101, 4 seen + 3 unseen", results["awa2"])
        print(json.dumps(results, indent=1))
        print("\n".join(table))


if __name__ == "__main__":
    main()
