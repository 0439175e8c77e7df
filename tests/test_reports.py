"""Confusion matrix, per-class table, confused pairs and image grids: numbers, files and TensorBoard images."""

from __future__ import annotations

import csv
import glob
import itertools
from collections import Counter
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from animal_lightning import reports
from animal_lightning.callbacks import AugmentationSamples, EvaluationReport, _label
from animal_lightning.data.transforms import PreprocessSpec
from animal_lightning.models import AnimalClassifier
from tests.conftest import FAST, assert_png, read_rows


def read_confusion(path: Path) -> tuple[list[str], torch.Tensor]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    names = rows[0][1:]
    assert [row[0] for row in rows[1:]] == names  # rows and columns in the same class order
    return names, torch.tensor([[int(v) for v in row[1:]] for row in rows[1:]])



def test_confusion_counts_match_an_independent_count():
    rng = np.random.default_rng(0)
    targets, predicted = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    confusion = reports.confusion_matrix(torch.tensor(targets), torch.tensor(predicted), 7)
    pairs = Counter(zip(targets.tolist(), predicted.tolist(), strict=True))
    assert int(confusion.sum()) == 500
    for t, p in itertools.product(range(7), range(7)):
        assert int(confusion[t, p]) == pairs[(t, p)]
    with pytest.raises(ValueError, match="3 targets but 2 predictions"):
        reports.confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), 3)


def test_per_class_table_precision_recall_f1_and_undefined_cases():
    # true a: 3 right, 1 as b; true b: 2 right; true c: none (c never occurs), predicted once for a b
    confusion = torch.tensor([[3, 1, 0], [0, 2, 1], [0, 0, 0]])
    table = {row["class"]: row for row in reports.per_class_table(confusion, ["a", "b", "c"])}
    assert table["a"] == {"class": "a", "support": 4, "predicted": 3, "correct": 3, "precision": 1.0,
                          "recall": 0.75, "f1": round(2 * 0.75 / 1.75, 6)}
    assert table["b"]["precision"] == pytest.approx(2 / 3, abs=1e-6) and table["b"]["recall"] == pytest.approx(2 / 3)
    assert table["c"]["recall"] is None and table["c"]["precision"] == 0.0 and table["c"]["f1"] is None


def test_confused_pairs_are_ranked_and_printed_as_arrows():
    confusion = torch.tensor([[5, 2, 0], [7, 1, 3], [0, 0, 4]])
    pairs = reports.confused_pairs(confusion, ["siamese+cat", "persian+cat", "dog"], top=2)
    assert pairs == [{"true": "persian+cat", "predicted": "siamese+cat", "count": 7},
                     {"true": "persian+cat", "predicted": "dog", "count": 3}]
    assert reports.format_pairs(pairs).splitlines()[0] == "persian+cat -> siamese+cat: 7"
    assert reports.confused_pairs(torch.eye(3, dtype=torch.long), ["a", "b", "c"]) == []
    assert reports.format_pairs([]) == "no class was confused with another"


@pytest.mark.parametrize("num_classes", [12, 40, 101])
def test_confusion_plot_labels_every_shown_class_without_overlap(num_classes):
    rng = np.random.default_rng(num_classes)
    torch.manual_seed(num_classes)
    names = [f"class_{i:03d}_{'long' * (i % 3)}" for i in range(num_classes)]
    targets = torch.tensor(rng.integers(0, num_classes, 2000))
    predicted = torch.where(torch.rand(2000) < 0.6, targets, torch.tensor(rng.integers(0, num_classes, 2000)))
    confusion = reports.confusion_matrix(targets, predicted, num_classes)
    figure = reports.confusion_figure(confusion, names)
    figure.canvas.draw()
    axes = figure.axes[0]
    shown = min(num_classes, reports.MAX_PLOTTED_CLASSES)
    for ticks, horizontal in ((axes.get_xticklabels(), True), (axes.get_yticklabels(), False)):
        assert len(ticks) == shown and all(t.get_text() in names for t in ticks)
        boxes = sorted((t.get_window_extent() for t in ticks), key=lambda b: b.x0 if horizontal else b.y0)
        for a, b in itertools.pairwise(boxes):  # neighbouring labels do not overlap
            assert (a.x1 <= b.x0 + 0.5) if horizontal else (a.y1 <= b.y0 + 0.5)
    assert axes.images[0].get_clim() == (0.0, 1.0)  # normalised colour scale
    if num_classes > reports.MAX_PLOTTED_CLASSES:  # the shown classes are those with the most errors
        off = confusion.clone().fill_diagonal_(0)
        errors = (off.sum(0) + off.sum(1)).tolist()
        shown_errors = sorted(errors[names.index(t.get_text())] for t in axes.get_yticklabels())
        assert min(shown_errors) >= sorted(errors, reverse=True)[shown - 1]


def test_images_are_denormalised_back_to_their_pixels():
    spec = PreprocessSpec(8, 8)
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    normalised = (pixels.float() / 255 - mean) / std
    back = reports.to_uint8_images(normalised, spec)
    assert back.shape == (2, 8, 8, 3) and back.dtype == np.uint8
    assert np.abs(back.astype(int) - pixels.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1


def test_soft_targets_are_captioned_with_their_two_classes():
    names = ["zebra", "lion", "cat"]
    assert _label(torch.tensor(1), names) == "lion"
    assert _label(torch.tensor([0.7, 0.0, 0.3]), names) == "zebra 70%\ncat 30%"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="every_n_epochs=0 must be at least 1"):
        EvaluationReport(every_n_epochs=0)


def test_test_phase_files_match_an_independent_count(trained, tmp_path):
    """The report callback, run by a Trainer's test loop in fp32, against a plain loop over the same images."""
    model, _ = AnimalClassifier.from_checkpoint(trained["ckpt"])
    datamodule = instantiate(trained["cfg"].data)
    datamodule.use_preprocess(model.preprocess)
    report = EvaluationReport(output_dir=str(tmp_path / "out"), worst_images=6)
    trainer = L.Trainer(accelerator="cpu", precision="32-true", callbacks=[report], enable_progress_bar=False,
                        enable_model_summary=False, logger=TensorBoardLogger(str(tmp_path / "tb")))
    trainer.test(model, datamodule=datamodule)

    pairs: Counter = Counter()
    with torch.no_grad():
        for images, targets in datamodule.test_dataloader():
            pairs.update(zip(targets.tolist(), model(images).argmax(1).tolist(), strict=True))
    out = tmp_path / "out"
    names, confusion = read_confusion(out / "confusion_matrix.csv")
    assert names == model.class_names
    assert int(confusion.sum()) == sum(pairs.values()) == len(datamodule.test_dataloader().dataset)
    assert {(t, p): int(confusion[t, p]) for t in range(len(names)) for p in range(len(names))
            if confusion[t, p]} == dict(pairs)

    table = read_rows(out / "per_class.csv")
    for c, row in enumerate(table):
        assert row["class"] == names[c]
        assert int(row["support"]) == sum(n for (t, _), n in pairs.items() if t == c)
        assert int(row["correct"]) == pairs[(c, c)]
        chosen = sum(n for (_, p), n in pairs.items() if p == c)
        support, correct = int(row["support"]), pairs[(c, c)]
        if chosen:
            assert float(row["precision"]) == pytest.approx(correct / chosen, abs=1e-6)
        if support:
            assert float(row["recall"]) == pytest.approx(correct / support, abs=1e-6)
        if chosen and support:
            precision, recall = correct / chosen, correct / support
            f1 = 2 * precision * recall / (precision + recall) if correct else 0.0
            assert float(row["f1"]) == pytest.approx(f1, abs=1e-6)
    listed = read_rows(out / "confused_pairs.csv")
    off = sorted(((-n, t, p) for (t, p), n in pairs.items() if t != p))  # most first, ties in class order
    assert [(r["true"], r["predicted"], int(r["count"])) for r in listed] == \
        [(names[t], names[p], -n) for n, t, p in off][:10]
    assert_png(out / "confusion_matrix.png")
    mistakes = sum(n for (t, p), n in pairs.items() if t != p)
    assert (out / "misclassified.png").exists() == (mistakes > 0)
    if mistakes:
        assert_png(out / "misclassified.png")
    # the test accuracy the model logged is the matrix's diagonal
    assert trainer.callback_metrics["test/acc"].item() == pytest.approx(float(confusion.trace() / confusion.sum()))


def tensorboard_images(folder: Path) -> dict[str, int]:
    counts: Counter = Counter()
    for path in glob.glob(str(folder / "**" / "events.out.tfevents*"), recursive=True):
        events = EventAccumulator(path, size_guidance={"images": 0})
        events.Reload()
        for tag in events.Tags()["images"]:
            counts[tag] += len(events.Images(tag))
    return dict(counts)


def test_a_training_run_shows_its_confusion_mistakes_and_samples(trained):
    """The shared demo run (8 epochs): TensorBoard images per validation, files at test."""
    run = trained["work"] / "run"
    images = tensorboard_images(run / "tensorboard")
    epochs = trained["cfg"].trainer.max_epochs
    assert images["val/confusion_matrix"] == epochs  # one per validation, none for the sanity check
    assert images["test/confusion_matrix"] == 1
    assert images["train/augmented_samples"] == 1
    for name in ("confusion_matrix.png", "augmented_samples.png"):
        assert_png(run / name)
    names, confusion = read_confusion(run / "confusion_matrix.csv")
    labels = read_rows(trained["root"] / "test_labels.csv")
    assert int(confusion.sum()) == len(labels)
    assert float(confusion.trace() / confusion.sum()) == pytest.approx(trained["metrics"]["test/acc"], abs=1e-6)


def test_mixed_batches_are_shown_with_both_labels(compose_cfg, synthetic_root, tmp_path):
    from animal_lightning.training import train

    cfg = compose_cfg("experiment=demo", f"data.root={synthetic_root}", "data.num_classes=4",
                      "data.train_per_class=30", "data.test_per_class=8", "data.image_size=32", *FAST,
                      "data.mix.mixup_alpha=0.4", "data.mix.cutmix_alpha=1.0", "trainer.max_epochs=1",
                      "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false",
                      "callbacks.augmentation_samples.count=8", "logger=csv")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    assert_png(run / "augmented_samples.png")  # written without TensorBoard too
    assert not (run / "confusion_matrix.png").exists()  # no test phase, no test files


def test_callbacks_are_in_the_default_group_and_can_be_turned_off(compose_cfg):
    cfg = compose_cfg()
    assert cfg.callbacks.evaluation_report._target_ == "animal_lightning.callbacks.EvaluationReport"
    assert cfg.callbacks.augmentation_samples._target_ == "animal_lightning.callbacks.AugmentationSamples"
    assert compose_cfg("callbacks.evaluation_report=null").callbacks.evaluation_report is None
    assert isinstance(instantiate(cfg.callbacks.augmentation_samples), AugmentationSamples)
