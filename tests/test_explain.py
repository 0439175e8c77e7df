"""Grad-CAM: every backbone of the zoo, the predict.py overlays, and that a trained model looks at the animal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from animal_lightning.data.synthetic import SyntheticSpec, ensure_synthetic_dataset
from animal_lightning.explain import CamRequest, cam_cells, explain_images, gradcam, overlay, peak, safe_name
from animal_lightning.models import AnimalClassifier
from animal_lightning.models.backbones import RECIPES, available, recipe_for
from animal_lightning.prediction import predict
from tests.conftest import FAST, assert_png, compose_config, read_rows, write_image

# The input size each backbone is explained at, and the side of its last feature map there: Grad-CAM's layer
# must be the last spatial one (stride 32 for ResNets, 16 before VGG's and ZFNet's last pooling, ViT's 16 px
# patches), or the heatmap is either blurred to nothing or not about the class.
CAM_GRID = {"resnet18": (64, 2), "resnet50": (64, 2), "resnet101": (64, 2), "vgg16": (64, 4), "zfnet": (64, 4),
            "convnext_tiny": (64, 2), "efficientnet_b0": (64, 2), "vit_b_16": (64, 4), "inception_v3": (299, 8),
            "inception_v4": (75, 1), "efficientnet_lite0": (64, 2), "efficientnet_lite1": (64, 2),
            "efficientnet_lite2": (64, 2)}


def test_every_backbone_has_a_cam_layer_check():
    assert set(CAM_GRID) == set(available())


@pytest.mark.parametrize("backbone", available())
def test_gradcam_works_for_every_backbone_through_the_factorys_layer(backbone, tmp_path):
    size, side = CAM_GRID[backbone]
    model = AnimalClassifier(["a", "b", "c"], backbone=backbone, pretrained=False, image_size=size).eval()
    if backbone in RECIPES:
        assert model.cam_layer_name == recipe_for(backbone).cam_layer  # named by the factory, not chosen here
    images = torch.randn(2, 3, size, size)
    assert cam_cells(model, images, torch.tensor([0, 2])).shape == (2, side, side)
    maps = gradcam(model, images, torch.tensor([0, 2]))
    assert maps.shape == (2, size, size)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1

    paths = [write_image(tmp_path / f"in{i}.jpg", size=(size + 10, size)) for i in range(2)]
    requests = [CamRequest(0, 1, "predicted"), CamRequest(1, 2, "true")]
    rows = explain_images(model, paths, ["in0.jpg", "in1.jpg"], requests, tmp_path / "cam", batch_size=2)
    assert [r["file"] for r in rows] == ["in0.jpg.predicted-b.png", "in1.jpg.true-c.png"]
    for row in rows:
        assert_png(tmp_path / "cam" / row["file"])
        assert 0 <= row["peak_x"] < size and 0 <= row["peak_y"] < size


def test_overlay_peak_and_file_names():
    cells = torch.zeros(4, 4)
    cells[1, 3] = 1.0
    assert peak(cells, (32, 32)) == (28, 12)  # the centre of row 1, column 3 of 8 px cells
    cells = torch.zeros(2, 2)
    cells[0, 0] = 1.0
    assert peak(cells, (64, 64)) == (16, 16)  # a border cell's centre, not pixel 0
    picture = np.full((32, 32, 3), 128, dtype=np.uint8)
    image = overlay(picture, torch.rand(32, 32))
    assert image.size == (224, 224)  # small inputs are enlarged for display
    assert safe_name("sub/dir/photo one.JPG") == "sub__dir__photo_one.JPG"
    assert safe_name("-rm -rf.jpg") == "rm_-rf.jpg"  # no leading dash or dot in a written file name
    assert safe_name("blue+whale") == "blue+whale"


def test_image_ids_that_clean_up_alike_get_separate_files(tmp_path):
    model = AnimalClassifier(["cat.big", "cat.small"], backbone="resnet18", pretrained=False, image_size=32)
    ids = ["photo 1.jpg", "photo_1.jpg", "a/b.jpg", "a__b.jpg"]
    paths = [write_image(tmp_path / f"{i}.png", size=(32, 32), seed=i) for i in range(len(ids))]
    requests = [CamRequest(n, c, "predicted") for n in range(len(ids)) for c in (0, 1)]
    rows = explain_images(model, paths, ids, requests, tmp_path / "cam")
    files = [row["file"] for row in rows]
    assert len(set(files)) == len(rows) == 8  # nothing overwritten
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == sorted(files)
    assert "photo_1.jpg.predicted-cat.big.png" in files and "photo_1.jpg.predicted-cat.big-2.png" in files


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
    # a model that has learned the classes: 0.92 to 0.97 over training seeds 42, 1, 2 (bf16, 2-core AMD, issue 17)
    assert metrics["test/acc"] > 0.8, metrics
    model, _ = AnimalClassifier.from_checkpoint(metrics["best_checkpoint"])
    labels = read_rows(root / "test_labels.csv")
    paths = [root / "test" / row["image_id"] for row in labels]
    classes = {name: i for i, name in enumerate(model.class_names)}
    requests = [CamRequest(n, classes[row["class"]], "true") for n, row in enumerate(labels)]
    rows = explain_images(model, paths, [r["image_id"] for r in labels], requests, tmp_path / "cam", batch_size=16)

    scale = model.preprocess.input_size / size  # the demo squashes the whole (square) picture to the input
    side = cam_cells(model, torch.zeros(1, 3, size, size), torch.tensor([0])).shape[-1]  # 4 x 4 at 128 px
    centres = [(i + 0.5) * size / side for i in range(side)]  # where a peak can be (peak(): a cell's centre)
    inside, chance = [], []
    for row, label in zip(rows, labels, strict=True):
        x0, y0, x1, y1 = (int(label[k]) * scale for k in ("x0", "y0", "x1", "y1"))
        x, y = int(row["peak_x"]) + 0.5, int(row["peak_y"]) + 0.5
        inside.append(x0 <= x < x1 and y0 <= y < y1)
        area = (x1 - x0) * (y1 - y0) / model.preprocess.input_size ** 2
        cells = np.mean([x0 <= cx < x1 and y0 <= cy < y1 for cx in centres for cy in centres])
        chance.append(max(area, cells))  # a random point, or a random cell: the likelier of the two
    hit_rate, chance_rate = float(np.mean(inside)), float(np.mean(chance))
    print(f"Grad-CAM peak inside the animal's box: {hit_rate:.0%} of {len(rows)} images (chance {chance_rate:.0%})")
    # measured 45%, 66% and 54% (chance 14%) with training seeds 42, 1, 2 (issue 17): the bar is 34%
    assert hit_rate > 2 * chance_rate and hit_rate > chance_rate + 0.2
