"""predict.py engine=compiled|int8: the same answers as fp32 within a stated tolerance, a cache that is reused,
invalidated and never trusted when damaged, and a clear refusal or fallback where accuracy or a backbone fails."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from animal_lightning.engines import EngineSettings, prepare_engine
from animal_lightning.errors import DataError, ModelConfigError
from animal_lightning.models import AnimalClassifier
from animal_lightning.prediction import predict
from tests.conftest import PROJECT, compose_config, make_folder, read_rows

# What each engine may change on the demo test folder (24 images of a weak 4-class model at 32 px, whose
# answers often have small margins): compiled (bf16 graph) at most 1 class, int8 at most 2; probabilities by
# at most these amounts; and on its 16 validation images (the calibration), at most 2 answers (0.85).
TOLERANCE = {"compiled": (1, 0.05), "int8": (2, 0.15)}


def run_predict(checkpoint: Path, tmp_path: Path, name: str, *overrides: str) -> tuple[dict, list[dict]]:
    workdir = tmp_path / name
    cfg = compose_config("predict", workdir, f"ckpt_path={checkpoint}", "progress=false", "num_workers=0",
                         "accelerator=cpu", f"engine_cache={tmp_path / 'cache'}", *overrides)
    summary = predict(cfg)
    return summary, read_rows(workdir / "run" / "predictions.csv")


def untrained_checkpoint(path: Path, backbone: str = "resnet18", size: int = 32, fragile: bool = False) -> Path:
    """A model saved without a Trainer, as an older version saved them: no validation images recorded.

    fragile: its classes differ by far less than int8 (or bf16) can resolve: every head row is one shared row
    plus a 1e-4 change, so fp32 answers vary from image to image while a quantised head cannot tell them apart.
    """
    model = AnimalClassifier([f"class_{i}" for i in range(10)], backbone=backbone, pretrained=False, image_size=size)
    if fragile:
        head = model.class_head
        with torch.no_grad():
            shared = head.weight[:1].clone()
            head.weight.copy_(shared + 1e-4 * shared.abs().mean() * torch.randn_like(head.weight))
            head.bias.zero_()
    payload = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(payload)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("engine", ["compiled", "int8"])
def test_each_engine_answers_as_fp32_does_within_the_tolerance(trained, tmp_path, engine, capsys):
    test = [f"input={trained['root'] / 'test'}", f"labels={trained['root'] / 'test_labels.csv'}"]
    fp32, reference = run_predict(trained["ckpt"], tmp_path, "fp32", *test, "precision=32-true")
    summary, rows = run_predict(trained["ckpt"], tmp_path, engine, *test, f"engine={engine}", "min_agreement=0.85")
    out = capsys.readouterr().out
    assert f"engine={engine} (" in out and "agreement with fp32" in out and "built in" in out
    assert list(rows[0]) == list(reference[0])  # the same columns, open-set flag included
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in reference]
    changed, largest = TOLERANCE[engine]
    assert sum(a["class"] != b["class"] for a, b in zip(rows, reference, strict=True)) <= changed
    assert max(abs(float(a["confidence"]) - float(b["confidence"])) for a, b in zip(rows, reference, strict=True)) \
        <= largest
    assert all(r["open_set"] in ("known", "unknown") for r in rows)
    assert abs(summary["accuracy"] - fp32["accuracy"]) <= changed / len(rows) + 1e-9
    record = json.loads(next((tmp_path / "cache").glob(f"{engine}-*/engine.json")).read_text())
    assert record["report"]["images"] == 16 and record["report"]["agreement"] >= 0.85  # all 16 validation images
    assert record["report"]["source"].startswith("validation split of")  # the run's own validation images


def test_the_checkpoint_records_its_validation_images(trained):
    checkpoint = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)["animal_lightning"]
    recorded = checkpoint["val_images"]
    assert len(recorded) == 16 and all(not Path(p).is_absolute() for p in recorded)  # 15% of 4 x 30, rounded
    assert all((Path(checkpoint["data_root"]) / p).is_file() for p in recorded)
    assert all(p.startswith("train/") for p in recorded)  # a split of train/, none of test/


def test_the_cache_is_reused_then_invalidated_by_a_changed_checkpoint(trained, tmp_path):
    checkpoint = tmp_path / "copy" / "best.ckpt"
    checkpoint.parent.mkdir()
    shutil.copy(trained["ckpt"], checkpoint)
    model, meta = AnimalClassifier.from_checkpoint(checkpoint)
    first = prepare_engine(model, checkpoint, meta, EngineSettings("int8"))
    assert not first.loaded and first.folder.parent == tmp_path / "copy" / "best.engines"  # beside the checkpoint
    again = prepare_engine(model, checkpoint, meta, EngineSettings("int8"))
    assert again.loaded and again.folder == first.folder and again.report == first.report
    images = torch.randn(3, 3, 32, 32)
    assert torch.equal(first(images)["logits"], again(images)["logits"])

    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)  # the same model, trained a bit more
    name = next(k for k in payload["state_dict"] if k.endswith("fc.bias"))
    payload["state_dict"][name] += 1.0
    torch.save(payload, checkpoint)
    model, meta = AnimalClassifier.from_checkpoint(checkpoint)
    changed = prepare_engine(model, checkpoint, meta, EngineSettings("int8"))
    assert not changed.loaded and changed.folder != first.folder
    assert torch.allclose(changed(images)["logits"], model.network_outputs(images)["logits"], atol=0.5)


@pytest.mark.parametrize("damage", ["model.bin", "model.xml", "engine.json"])
def test_a_damaged_cache_is_rebuilt_not_trusted(trained, tmp_path, damage, caplog):
    model, meta = AnimalClassifier.from_checkpoint(trained["ckpt"])
    settings = EngineSettings("compiled", cache_dir=str(tmp_path / "cache"))
    built = prepare_engine(model, trained["ckpt"], meta, settings)
    target = built.folder / damage
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2] + b"\x00garbage")
    rebuilt = prepare_engine(model, trained["ckpt"], meta, settings)
    assert not rebuilt.loaded and f"engine cache {built.folder} is damaged" in caplog.text
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(rebuilt(images)["logits"], built(images)["logits"])
    assert prepare_engine(model, trained["ckpt"], meta, settings).loaded  # whole again


def test_below_min_agreement_int8_is_refused_naming_the_fallback(tmp_path):
    checkpoint = untrained_checkpoint(tmp_path / "fragile.ckpt", fragile=True)
    photos = make_folder(tmp_path / "photos", {"a": 20, "b": 20})
    model, meta = AnimalClassifier.from_checkpoint(checkpoint)
    settings = EngineSettings("int8", calibration=str(photos), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelConfigError) as refused:
        prepare_engine(model, checkpoint, meta, settings)
    message = str(refused.value)
    assert "below min_agreement=0.99" in message and "engine=compiled" in message and "\n" not in message
    settings.min_agreement = float(re.search(r"accept it with min_agreement=([0-9.]+) ", message).group(1))
    assert prepare_engine(model, checkpoint, meta, settings).loaded  # as suggested: loaded, not built again


def test_calibration_needs_recorded_validation_images_or_a_folder(tmp_path):
    checkpoint = untrained_checkpoint(tmp_path / "old.ckpt")
    command = [sys.executable, str(PROJECT / "predict.py"), f"ckpt_path={checkpoint}", "export=int8",
               f"paths.root_dir={tmp_path}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: the checkpoint records no validation images to calibrate engine=int8 on (it was saved by an older "
        "version): pass calibration=<folder of images>"]
    missing = tmp_path / "nowhere"
    model, meta = AnimalClassifier.from_checkpoint(checkpoint)
    with pytest.raises(DataError, match=f"calibration={missing} is not a folder"):
        prepare_engine(model, checkpoint, meta, EngineSettings("int8", calibration=str(missing)))
    with pytest.raises(ModelConfigError, match="engine='fast' is not one of: eager, compiled, int8"):
        prepare_engine(model, checkpoint, meta, EngineSettings("fast"))
    moved = dict(meta, val_images=["train/a/1.jpg"], data_root=str(missing))
    with pytest.raises(DataError, match=f"validation images are in {missing} any more"):
        prepare_engine(model, checkpoint, moved, EngineSettings("int8"))


def test_export_builds_the_engine_once_and_prediction_loads_it(trained, tmp_path, capsys):
    cfg = compose_config("predict", tmp_path / "export", f"ckpt_path={trained['ckpt']}", "export=int8",
                         f"engine_cache={tmp_path / 'cache'}")
    exported = predict(cfg)
    assert Path(exported["exported"][0]).is_dir() and not (tmp_path / "export" / "run" / "predictions.csv").exists()
    assert "built in" in capsys.readouterr().out
    run_predict(trained["ckpt"], tmp_path, "again", f"input={trained['root'] / 'test'}", "engine=int8")
    assert f"loaded from {exported['exported'][0]}" in capsys.readouterr().out


class _DataDependent(torch.nn.Module):
    """A network whose path depends on the pixel values: torch.export cannot trace it into one graph."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images) if images.mean() > 0 else -self.net(images)


def test_a_network_that_cannot_be_converted_falls_back_to_eager_with_a_warning(trained, tmp_path, caplog):
    model, meta = AnimalClassifier.from_checkpoint(trained["ckpt"])
    model.net = _DataDependent(model.net)
    engine = prepare_engine(model, trained["ckpt"], meta, EngineSettings("int8", cache_dir=str(tmp_path / "cache")))
    assert engine is None
    warning = next(r.getMessage() for r in caplog.records if r.name == "animal_lightning.engines")
    assert warning.startswith("engine=int8 cannot convert resnet18 (") and "predicting with engine=eager instead" \
        in warning and "\n" not in warning
    images = torch.randn(2, 3, 32, 32)
    assert model.outputs(images, engine=engine)["probabilities"].shape == (2, 4)  # eager still answers


def test_the_calibration_moves_with_the_engines_scores(trained):
    from animal_lightning.engines import recalibrate

    model, _ = AnimalClassifier.from_checkpoint(trained["ckpt"])
    scores = torch.randn(200, 3)
    moved = recalibrate(model, {"scores": scores}, {"scores": scores + torch.tensor([0.1, -2.0, 0.0])})
    for i, name in enumerate(["msp", "maxlogit", "energy"]):
        shift = [0.1, -2.0, 0.0][i]
        assert moved["score_quantiles"][name] == pytest.approx(
            [v + shift for v in model.calibration["score_quantiles"][name]], abs=1e-6)
    assert moved["images"] == model.calibration["images"]


def test_an_unwritable_cache_folder_is_one_clear_line(trained, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would go")
    model, meta = AnimalClassifier.from_checkpoint(trained["ckpt"])
    with pytest.raises(ModelConfigError, match=f"cannot keep the engine cache in {blocked / 'inner'} .*engine_cache="):
        prepare_engine(model, trained["ckpt"], meta, EngineSettings("compiled", cache_dir=str(blocked / "inner")))



def test_one_calibration_image_still_gives_an_engine_for_any_batch(trained, tmp_path):
    model, meta = AnimalClassifier.from_checkpoint(trained["ckpt"])
    engine = prepare_engine(model, trained["ckpt"], meta, EngineSettings("compiled", calibration_images=1,
                                                                         cache_dir=str(tmp_path / "cache")))
    assert engine is not None and engine.report["images"] == 1
    for size in (1, 5):
        assert engine(torch.randn(size, 3, 32, 32))["logits"].shape == (size, 4)
