"""Grad-CAM: every backbone of the zoo, the predict.py overlays, and that a trained model looks at the animal."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from animal_lightning.data.synthetic import SyntheticSpec, ensure_synthetic_dataset
from animal_lightning.explain import CamRequest, explain_images, file_stem, gradcam, overlay, peak
from animal_lightning.models import AnimalClassifier
from animal_lightning.models.backbones import available, recipe_for
from animal_lightning.prediction import predict
from tests.conftest import FAST, compose_config, write_image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()


@pytest.mark.parametrize("backbone", available())
def test_gradcam_works_for_every_backbone_through_the_factorys_layer(backbone, tmp_path):
    size = max(64, recipe_for(backbone).min_input_size)
    model = AnimalClassifier(["a", "b", "c"], backbone=backbone, pretrained=False, image_size=size).eval()
    assert model.cam_layer_name == recipe_for(backbone).cam_layer  # named by the factory, not chosen here
    images = torch.randn(2, 3, size, size)
    maps = gradcam(model, images, torch.tensor([0, 2]))
    assert maps.shape == (2, size, size)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1

    paths = [write_image(tmp_path / f"in{i}.jpg", size=(size + 10, size)) for i in range(2)]
    requests = [CamRequest(0, 1, "predicted"), CamRequest(1, 2, "true")]
    rows = explain_images(model, paths, ["in0.jpg", "in1.jpg"], requests, tmp_path / "cam", batch_size=2)
    assert [r["file"] for r in rows] == ["in0.predicted-b.png", "in1.true-c.png"]
    for row in rows:
        assert_png(tmp_path / "cam" / row["file"])
        assert 0 <= row["peak_x"] < size and 0 <= row["peak_y"] < size


def test_overlay_peak_and_file_names():
    heat = torch.zeros(32, 32)
    heat[5, 20] = 1.0
    assert peak(heat) == (20, 5)
    picture = np.full((32, 32, 3), 128, dtype=np.uint8)
    image = overlay(picture, heat)
    assert image.size == (224, 224)  # small inputs are enlarged for display
    assert file_stem("sub/dir/photo one.JPG") == "sub__dir__photo_one"
    assert file_stem("-rm -rf.jpg") == "rm_-rf"  # no leading dash or dot in a written file name
    assert file_stem("blue+whale.png") == "blue+whale"


def test_predict_gradcam_writes_an_overlay_per_image_and_true_class_ones_for_mistakes(trained, tmp_path):
    test_dir = trained["root"] / "test"
    folder = tmp_path / "input"
    folder.mkdir()
    for path in sorted(test_dir.iterdir())[:8]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    cfg = compose_config("predict", tmp_path, f"ckpt_path={trained['ckpt']}", "progress=false", "num_workers=0",
                         f"input={folder}", f"labels={trained['root'] / 'test_labels.csv'}", "gradcam=true",
                         "gradcam_true=true")
    summary = predict(cfg)
    cam_dir = Path(summary["gradcam"])
    assert cam_dir == Path(cfg.output).parent / "gradcam"
    index = read_rows(cam_dir / "index.csv")
    predictions = {r["image_id"]: r for r in read_rows(Path(cfg.output))}
    labels = {r["image_id"]: r["class"] for r in read_rows(trained["root"] / "test_labels.csv")}
    predicted = [r for r in index if r["kind"] == "predicted"]
    readable = sorted(p.name for p in folder.iterdir() if p.name != "broken.jpg")
    assert sorted(r["image_id"] for r in predicted) == readable
    for row in predicted:
        assert row["class"] == predictions[row["image_id"]]["class"]
    wrong = {i for i, r in predictions.items() if r["class"] and r["class"] != labels.get(i)}
    assert {r["image_id"] for r in index if r["kind"] == "true"} == wrong
    for row in index:
        assert_png(cam_dir / row["file"])
    assert not any(p.name.startswith("broken") for p in cam_dir.iterdir())  # unreadable: its error row, no overlay


@pytest.mark.slow
def test_gradcam_peak_falls_on_the_animal_more_often_than_chance(tmp_path):
    """The demo generator knows each animal's box: a trained model's evidence should sit inside it."""
    size = 128
    spec = SyntheticSpec(num_classes=4, train_per_class=40, test_per_class=25, image_size=size, seed=3)
    root = ensure_synthetic_dataset(tmp_path / "synthetic", spec)
    cfg = compose_config("train", tmp_path, "experiment=demo", f"data.root={tmp_path / 'synthetic'}",
                         "data.num_classes=4", "data.train_per_class=40", "data.test_per_class=25",
                         f"data.image_size={size}", "data.seed=3", *FAST, f"model.image_size={size}",
                         "trainer.max_epochs=8", "data.batch_size=16")
    from animal_lightning.training import train

    metrics = train(cfg)
    assert metrics["test/acc"] > 0.8, metrics  # a model that has learned the classes
    model, _ = AnimalClassifier.from_checkpoint(metrics["best_checkpoint"])
    labels = read_rows(root / "test_labels.csv")
    paths = [root / "test" / row["image_id"] for row in labels]
    classes = {name: i for i, name in enumerate(model.class_names)}
    requests = [CamRequest(n, classes[row["class"]], "true") for n, row in enumerate(labels)]
    rows = explain_images(model, paths, [r["image_id"] for r in labels], requests, tmp_path / "cam", batch_size=16)

    scale = model.preprocess.input_size / size  # the demo squashes the whole (square) picture to the input
    inside, chance = [], []
    for row, label in zip(rows, labels, strict=True):
        x0, y0, x1, y1 = (int(label[k]) * scale for k in ("x0", "y0", "x1", "y1"))
        x, y = int(row["peak_x"]) + 0.5, int(row["peak_y"]) + 0.5
        inside.append(x0 <= x < x1 and y0 <= y < y1)
        chance.append((x1 - x0) * (y1 - y0) / model.preprocess.input_size ** 2)
    hit_rate, chance_rate = float(np.mean(inside)), float(np.mean(chance))
    print(f"Grad-CAM peak inside the animal's box: {hit_rate:.0%} of {len(rows)} images (chance {chance_rate:.0%})")
    assert hit_rate > chance_rate + 0.25 and hit_rate > 1.5 * chance_rate
