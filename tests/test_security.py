"""Untrusted files: no checkpoint loads code, a foreign checkpoint is named, CSV output stays inert text."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from animal_lightning.models import AnimalClassifier
from animal_lightning.reports import spreadsheet_safe
from tests.conftest import FAST, PROJECT, PickleBomb, make_folder, read_rows, write_image


def run_script(script: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(PROJECT / script), *overrides], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def booby_trapped(trained, tmp_path) -> Path:
    """The shared run's checkpoint with a pickled object that writes ./PWNED when unpickled."""
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    checkpoint["extra"] = PickleBomb()
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    torch.save(checkpoint, path)
    return path


@pytest.mark.slow  # runs train.py or predict.py, or trains twice: make test-all
def test_resuming_from_a_booby_trapped_checkpoint_is_refused_and_runs_nothing(trained, booby_trapped, tmp_path):
    result = run_script("train.py", f"data.root={trained['root'].parent}", "data=synthetic", "data.num_classes=4",
                        "data.train_per_class=30", "data.test_per_class=6", "data.image_size=32", "data.seed=1",
                        *FAST, f"ckpt_path={booby_trapped}", f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "holds pickled objects (exec) that safe loading refuses" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "PWNED").exists()


def test_lightnings_own_loading_path_refuses_the_payload_too(booby_trapped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AnimalClassifier.load_from_checkpoint(booby_trapped, weights_only=True)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.slow  # train.py runs for real
@pytest.mark.parametrize("override, message", [
    ("model=resnet50", "holds a resnet18 and this run builds a resnet50: pass model=... for resnet18 to resume it"),
    ("data.root={other}", "was trained on 4 classes (blue_plain_angular, green_spotted_boxy, purple_striped_round, "
                          "yellow_patched_long) and this run's data has 3 (ant, bee, cow): resume with the data it "
                          "was trained on"),
])
def test_resuming_a_checkpoint_of_other_classes_or_backbone_says_which(trained, tmp_path, override, message):
    other = make_folder(tmp_path / "other", {"ant": 3, "bee": 3, "cow": 3})
    data = [f"data.root={trained['root'].parent}", "data=synthetic", "data.num_classes=4", "data.train_per_class=30",
            "data.test_per_class=6", "data.image_size=32", "data.seed=1"]
    if override.startswith("data.root"):
        data = [override.format(other=other)]
    fast = [f for f in FAST if not (override.startswith("model=") and f == "model=resnet18")]
    result = run_script("train.py", *data, *fast, override if override.startswith("model=") else "model.image_size=32",
                        f"ckpt_path={trained['ckpt']}", f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: checkpoint {trained['ckpt']} " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # runs train.py or predict.py, or trains twice: make test-all
def test_image_ids_that_spreadsheets_would_evaluate_are_written_as_text(trained, tmp_path):
    folder = tmp_path / "test"
    names = ["=1+2.jpg", "+sum.jpg", "-cat.jpg", "@cmd.jpg", "ok.jpg"]
    for name in names:
        write_image(folder / name)
    output = tmp_path / "out" / "predictions.csv"
    result = run_script("predict.py", f"ckpt_path={trained['ckpt']}", f"input={folder}", f"output={output}",
                        "num_workers=0", "progress=false", f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ids = [row["image_id"] for row in read_rows(output)]
    assert ids == ["'+sum.jpg", "'-cat.jpg", "'=1+2.jpg", "'@cmd.jpg", "ok.jpg"]
    # the submission is for graders, not spreadsheets: its ids are the file names exactly
    assert [row["image_id"] for row in read_rows(output.with_name("submission.csv"))] == sorted(names)


@pytest.mark.parametrize("value, expected", [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("-cat.jpg", "'-cat.jpg"), ("@SUM(A1)", "'@SUM(A1)"),
    ("\tx", "'\tx"), ("-0.25", "-0.25"), ("+3", "+3"), ("zebra", "zebra"), (-0.25, -0.25), ("", ""),
])
def test_spreadsheet_safe_quotes_formulas_and_leaves_numbers(value, expected):
    assert spreadsheet_safe(value) == expected


@pytest.mark.slow  # runs train.py or predict.py, or trains twice: make test-all
def test_training_asks_lightning_for_safe_loading_when_it_resumes_and_tests(compose_cfg, synthetic_root,
                                                                            monkeypatch):
    import lightning.pytorch as L

    from animal_lightning.training import train

    asked = {}
    for name in ("fit", "test"):
        original = getattr(L.Trainer, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            asked[_name] = kwargs.get("weights_only")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(L.Trainer, name, spy)
    train(compose_cfg("data=synthetic", f"data.root={synthetic_root}", "data.num_classes=4",
                      "data.train_per_class=30", "data.test_per_class=8", "data.image_size=32", *FAST, "debug=fdr"))
    assert asked == {"fit": True, "test": True}  # Lightning's own torch.load of the checkpoint refuses pickles


def test_resuming_a_checkpoint_of_another_model_shape_names_the_first_difference(tmp_path):
    from animal_lightning.checkpoints import check_resumable
    from animal_lightning.errors import CheckpointError

    plain = AnimalClassifier(["a", "b"], backbone="resnet18", pretrained=False, image_size=32)
    path = tmp_path / "plain.ckpt"
    payload = {"state_dict": plain.state_dict(), "hyper_parameters": dict(plain.hparams)}
    plain.on_save_checkpoint(payload)
    torch.save(payload, path)
    check_resumable(path, plain)  # the same model: fine
    table = {"predicates": ["p", "q", "r"], "seen": ["a", "b"], "unseen": ["c"],
             "matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "source": "attrs/classes.txt"}
    with_attributes = AnimalClassifier(["a", "b"], backbone="resnet18", pretrained=False, image_size=32,
                                       attributes=table)
    with pytest.raises(CheckpointError, match=r"does not fit this run's model \(attribute.* is not in the "
                                              r"checkpoint; \d+ difference\(s\)\): resume with the settings"):
        check_resumable(path, with_attributes)
