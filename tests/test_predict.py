"""predict.py and the prediction module, on a tiny checkpoint trained here from the demo generator."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from animal_lightning.checkpoints import resolve_checkpoint
from animal_lightning.errors import CheckpointError, DataError
from animal_lightning.models import AnimalClassifier
from animal_lightning.prediction import predict
from tests.conftest import PROJECT, PickleBomb, compose_config, make_folder, read_rows, write_image


def run_predict(trained, tmp_path, *overrides: str) -> dict:
    cfg = compose_config("predict", tmp_path, f"ckpt_path={trained['ckpt']}", "progress=false",
                         "num_workers=0", *overrides)
    return predict(cfg)



def labelled_copy(trained, tmp_path: Path) -> Path:
    """The demo test folder rearranged into class sub-folders, plus one folder of an unseen animal."""
    labels = {r["image_id"]: r["class"] for r in read_rows(trained["root"] / "test_labels.csv")}
    target = tmp_path / "labelled"
    for image_id, name in labels.items():
        (target / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(trained["root"] / "test" / image_id, target / name / image_id)
    write_image(target / "horse" / "h1.jpg")
    return target


def test_folder_predictions_rows_columns_order_and_probabilities(trained, tmp_path):
    summary = run_predict(trained, tmp_path, f"input={trained['root'] / 'test'}", "topk=4")
    rows = read_rows(tmp_path / "run" / "predictions.csv")
    images = sorted(p.name for p in (trained["root"] / "test").iterdir())
    assert summary["images"] == len(rows) == len(images) == 24
    assert [r["image_id"] for r in rows] == images  # sorted by image_id
    assert list(rows[0])[:3] == ["image_id", "class", "confidence"]
    assert list(rows[0])[-1] == "error" and "prob_4" in rows[0]
    classes = AnimalClassifier.from_checkpoint(trained["ckpt"])[0].class_names
    for row in rows:
        probs = [float(row[f"prob_{j}"]) for j in range(1, 5)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)  # all 4 classes: the full distribution
        assert probs == sorted(probs, reverse=True)
        assert row["class"] == row["class_1"] in classes and float(row["confidence"]) == probs[0]
        assert row["error"] == ""
    submission = read_rows(tmp_path / "run" / "submission.csv")
    assert list(submission[0]) == ["image_id", "class"]
    assert [(r["image_id"], r["class"]) for r in submission] == [(r["image_id"], r["class"]) for r in rows]


def test_labelled_folder_is_scored_like_an_independent_count(trained, tmp_path):
    folder = labelled_copy(trained, tmp_path)
    summary = run_predict(trained, tmp_path, f"input={folder}", "topk=4")
    rows = read_rows(tmp_path / "run" / "predictions.csv")
    assert len(rows) == 25 and rows[0]["image_id"].count("/") == 1  # image_id = class/file
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    scored = [r for r in rows if r["label"] != "horse"]
    accuracy = sum(r["class"] == r["label"] for r in scored) / len(scored)
    top4 = sum(r["label"] in {r[f"class_{j}"] for j in range(1, 5)} for r in scored) / len(scored)
    recalls = {}
    for r in scored:
        recalls.setdefault(r["label"], []).append(r["class"] == r["label"])
    macro = sum(sum(v) / len(v) for v in recalls.values()) / len(recalls)
    assert metrics["images_scored"] == 24 == summary["images_scored"]
    assert metrics["accuracy"] == pytest.approx(accuracy) and summary["accuracy"] == pytest.approx(accuracy)
    assert metrics["top5_accuracy"] == pytest.approx(top4) == 1.0  # 4 classes: top-5 holds every class
    assert metrics["macro_accuracy"] == pytest.approx(macro)
    assert metrics["unknown_labels"] == {"horse": 1}
    per_class = read_rows(tmp_path / "run" / "per_class.csv")
    assert sum(int(r["support"]) for r in per_class) == 24
    assert sum(int(r["correct"]) for r in per_class) == round(accuracy * 24)


def test_labels_csv_scores_a_flat_folder(trained, tmp_path):
    summary = run_predict(trained, tmp_path, f"input={trained['root'] / 'test'}",
                          f"labels={trained['root'] / 'test_labels.csv'}")
    rows = read_rows(tmp_path / "run" / "predictions.csv")
    assert summary["images_scored"] == 24
    assert summary["accuracy"] == pytest.approx(sum(r["class"] == r["label"] for r in rows) / 24)
    # trained for real: far above chance (0.25). The fixture's test accuracy measured 0.625 to 0.79 over training
    # seeds 42, 1, 2, 3 in bf16 and 42, 1 in fp32 (2-core AMD EPYC, issue 17); 0.5 is 12 of the 24 images.
    assert summary["accuracy"] > 0.5


def test_bad_images_get_error_rows_and_a_count(trained, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in sorted(os.listdir(trained["root"] / "test"))[:5]:
        shutil.copy(trained["root"] / "test" / name, folder / name)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    data = (folder / sorted(os.listdir(folder))[0]).read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    summary = run_predict(trained, tmp_path, f"input={folder}")
    rows = {r["image_id"]: r for r in read_rows(tmp_path / "run" / "predictions.csv")}
    assert len(rows) == 8 and summary["unreadable"] == 3
    for bad in ("empty.jpg", "notes.jpg", "truncated.jpg"):
        assert rows[bad]["class"] == "" and rows[bad]["confidence"] == "" and rows[bad]["error"]
    assert "truncated" in rows["truncated.jpg"]["error"].lower()
    assert sum(1 for r in rows.values() if r["class"]) == 5
    assert "8 predictions, 3 unreadable image(s)" in capsys.readouterr().out


def test_single_image_and_list_file_inputs(trained, tmp_path):
    test_dir = trained["root"] / "test"
    one = sorted(test_dir.iterdir())[3]
    run_predict(trained, tmp_path, f"input={one}", "format=json")
    records = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert [r["image_id"] for r in records] == [one.name] and records[0]["class"]

    listing = tmp_path / "list.txt"
    listing.write_text(f"# images to check\n{sorted(test_dir.iterdir())[1]}\n\n../{test_dir.name}/0000.jpg\n")
    shutil.copytree(test_dir, tmp_path.parent / test_dir.name, dirs_exist_ok=True)
    summary = run_predict(trained, tmp_path, f"input={listing}")
    rows = read_rows(tmp_path / "run" / "predictions.csv")
    assert summary["images"] == 2 and all(r["class"] and not r["error"] for r in rows)


def test_recursive_folder_uses_relative_paths(trained, tmp_path):
    folder = tmp_path / "nested"
    source = sorted((trained["root"] / "test").iterdir())
    for i, path in enumerate(source[:4]):
        target = folder / ("a" if i % 2 else "b") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    with pytest.raises(DataError, match="recursive=true"):
        run_predict(trained, tmp_path, f"input={folder}")
    run_predict(trained, tmp_path, f"input={folder}", "recursive=true")
    ids = [r["image_id"] for r in read_rows(tmp_path / "run" / "predictions.csv")]
    assert ids == sorted(ids) and all(i.startswith(("a/", "b/")) for i in ids) and len(ids) == 4


def test_hflip_tta_averages_the_image_and_its_mirror(trained, tmp_path):
    model, _ = AnimalClassifier.from_checkpoint(trained["ckpt"])
    images = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        expected = (torch.softmax(model(images), 1) + torch.softmax(model(images.flip(-1)), 1)) / 2
        assert torch.allclose(model.outputs(images, tta="hflip")["probabilities"], expected, atol=1e-6)
        plain = model.outputs(images)["probabilities"]
        assert not torch.allclose(plain, expected, atol=1e-3)
        # predict_step (what a plain trainer.predict(model) runs) is outputs() without augmentation
        assert torch.equal(model.predict_step((images, ["", "", ""]), 0)["probabilities"], plain)
    with pytest.raises(ValueError, match="tta='vflip' is not one of"):
        model.outputs(images, tta="vflip")

    def probabilities(*extra: str) -> list[dict]:
        run_predict(trained, tmp_path, f"input={trained['root'] / 'test'}", "topk=4", *extra)
        return [{r[f"class_{j}"]: float(r[f"prob_{j}"]) for j in range(1, 5)}
                for r in read_rows(tmp_path / "run" / "predictions.csv")]

    with_tta, without = probabilities("tta=hflip"), probabilities()
    assert all(sum(p.values()) == pytest.approx(1.0, abs=1e-4) for p in with_tta)
    assert max(abs(a[c] - b[c]) for a, b in zip(with_tta, without, strict=True) for c in a) > 1e-3  # tta reached it


def test_foreign_damaged_and_booby_trapped_checkpoints_are_refused(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes.ckpt is damaged or not a PyTorch checkpoint"):
        AnimalClassifier.from_checkpoint(text)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(trained["ckpt"].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="damaged or not a PyTorch checkpoint"):
        AnimalClassifier.from_checkpoint(cut)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match="is not an animal-lightning checkpoint"):
        AnimalClassifier.from_checkpoint(foreign)
    evil = tmp_path / "evil.ckpt"
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    checkpoint["extra"] = PickleBomb()
    torch.save(checkpoint, evil)
    with pytest.raises(CheckpointError, match=r"holds pickled objects \(.*exec\) that safe loading refuses"):
        AnimalClassifier.from_checkpoint(evil)
    with pytest.raises(CheckpointError, match="not found"):
        AnimalClassifier.from_checkpoint(tmp_path / "missing.ckpt")
    assert not (tmp_path / "PWNED").exists()


def test_best_and_last_resolve_to_the_newest_run(tmp_path):
    runs = tmp_path / "logs" / "train" / "runs"
    for stamp, mtime in (("2026-01-01_00-00-00", 1000), ("2026-01-02_00-00-00", 2000)):
        for name in ("best", "last"):
            path = runs / stamp / "checkpoints" / f"{name}.ckpt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            os.utime(path, (mtime, mtime))
    newest = (runs / "2026-01-02_00-00-00" / "checkpoints" / "best.ckpt").resolve()
    assert resolve_checkpoint("best", tmp_path / "logs") == newest
    assert resolve_checkpoint(None, tmp_path / "logs").name == "best.ckpt"
    assert resolve_checkpoint("last", tmp_path / "logs").name == "last.ckpt"
    with pytest.raises(CheckpointError, match="no best.ckpt under .*train first"):
        resolve_checkpoint("best", tmp_path / "elsewhere")


def _predict_py(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(PROJECT / "predict.py"), "num_workers=0", "progress=false",
                           *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # train.py or predict.py run for real, several seconds each
def test_predict_py_with_no_arguments_uses_the_newest_run(trained, tmp_path):
    run = tmp_path / "logs" / "train" / "runs" / "2026-11-28_00-00-00" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copy(trained["ckpt"], run / "best.ckpt")
    result = _predict_py(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Checkpoint: {(run / 'best.ckpt').resolve()}" in result.stdout
    assert "Scored 24 labelled images: accuracy" in result.stdout  # the demo's labels came along
    outputs = list((tmp_path / "logs" / "predict" / "runs").glob("*/predictions.csv"))
    assert len(outputs) == 1 and len(read_rows(outputs[0])) == 24

    missing = _predict_py(tmp_path, f"input={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"error: input {tmp_path / 'nowhere'} does not exist" in missing.stderr


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(trained, tmp_path, fmt):
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(trained["ckpt"], ckpt)
    summary = run_predict(trained, tmp_path, f"ckpt_path={ckpt}", f"export={fmt}")
    exported, sidecar = map(Path, summary["exported"])
    assert exported.parent == tmp_path and json.loads(sidecar.read_text())["class_names"]
    model, _ = AnimalClassifier.from_checkpoint(ckpt)
    images = torch.randn(3, 3, 32, 32)  # another batch size than the export's example
    with torch.inference_mode():
        expected = torch.softmax(model.float()(images), dim=1).numpy()
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
        got = session.run(["probabilities"], {"images": images.numpy()})[0]
    else:
        got = torch.jit.load(str(exported))(images).detach().numpy()
    assert got.shape == (3, 4)
    assert abs(got - expected).max() < 1e-4


def test_unusable_inputs_are_clear_errors(trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images .* in .*empty"):
        run_predict(trained, tmp_path, f"input={empty}")
    make_folder(tmp_path / "x", {"a": 1})
    with pytest.raises(DataError, match="tta='vflip' is not one of"):
        run_predict(trained, tmp_path, f"input={tmp_path / 'x' / 'train' / 'a'}", "tta=vflip")


def test_prediction_resizes_images_the_way_training_evaluated_them(trained, tmp_path):
    from animal_lightning.data.datasets import ImageFiles
    from animal_lightning.data.images import load_rgb
    from animal_lightning.data.transforms import eval_transform

    model, _ = AnimalClassifier.from_checkpoint(trained["ckpt"])
    assert model.preprocess.resize_mode == "squash"  # data.resize_mode of the training run, kept in the checkpoint
    path = write_image(tmp_path / "wide.jpg", size=(90, 30))
    tensor, error = ImageFiles([path], model.preprocess)[0]
    assert error == "" and torch.equal(tensor, eval_transform(model.preprocess, "squash")(load_rgb(path)))
    assert not torch.equal(tensor, eval_transform(model.preprocess, "crop")(load_rgb(path)))


def test_lightnings_own_loader_restores_the_preprocessing_too(trained):
    model = AnimalClassifier.load_from_checkpoint(trained["ckpt"], weights_only=True)
    assert model.preprocess == AnimalClassifier.from_checkpoint(trained["ckpt"])[0].preprocess
    assert model.preprocess.resize_mode == "squash"


def test_a_checkpoint_from_before_resize_mode_was_a_model_argument_keeps_its_preprocessing(trained, tmp_path):
    checkpoint = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    del checkpoint["hyper_parameters"]["resize_mode"]  # as train.py wrote them before issue 17
    assert checkpoint["animal_lightning"]["preprocess"]["resize_mode"] == "squash"
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    calibration = checkpoint["animal_lightning"]["calibration"]
    ours = AnimalClassifier.from_checkpoint(old)[0]
    lightnings = AnimalClassifier.load_from_checkpoint(old, weights_only=True)
    for model in (ours, lightnings):
        assert model.preprocess.resize_mode == "squash" and model.calibration == calibration


def test_gathered_predictions_go_back_in_input_order_and_a_gap_is_an_error():
    from animal_lightning.prediction import _Collect

    collect = _Collect(4)
    # two processes' shares, interleaved as Lightning's unrepeated sampler deals them
    collect.parts = [([1, 3], {"probabilities": torch.tensor([[1.0], [3.0]])}, ["", "bad.jpg: truncated"]),
                     ([0, 2], {"probabilities": torch.tensor([[0.0], [2.0]])}, ["", ""])]
    collect.on_predict_epoch_end(None, None)
    assert collect.outputs["probabilities"].flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert collect.errors == ["", "", "", "bad.jpg: truncated"]
    collect.parts = [([0, 1, 1], {"probabilities": torch.zeros(3, 1)}, ["", "", ""])]
    with pytest.raises(RuntimeError, match="covered 3 images \\(2 distinct\\) instead of each of the 4 exactly once"):
        collect.on_predict_epoch_end(None, None)


def test_fewer_images_than_ddp_processes_is_refused_before_starting_them(trained, tmp_path):
    from animal_lightning.prediction import predict_outputs

    model, _ = AnimalClassifier.from_checkpoint(trained["ckpt"])
    one = sorted((trained["root"] / "test").glob("*.jpg"))[:1]
    with pytest.raises(DataError, match="1 images cannot be shared by 2 processes: predict them with devices=1"):
        predict_outputs(model, one, accelerator="cpu", devices=2, num_workers=0, progress=False)
