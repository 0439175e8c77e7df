"""The main job end to end: train.py as users run it, resume, and a short real training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from torch import nn

from animal_lightning.errors import ModelConfigError
from animal_lightning.training import build_model, build_trainer, instantiate_group, train
from tests.conftest import FAST, PROJECT, make_folder


def run_train(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("ANIMAL_DATA_DIR", None)
    return subprocess.run([sys.executable, str(PROJECT / "train.py"), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def only_run_dir(log_dir: Path) -> Path:
    runs = sorted((log_dir / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow  # train.py or predict.py run for real, several seconds each
def test_train_py_fdr_leaves_checkpoint_events_and_metrics(tmp_path, synthetic_root):
    result = run_train("data=synthetic", f"data.root={synthetic_root}", "data.num_classes=4",
                       "data.train_per_class=30", "data.test_per_class=8", "data.image_size=32",
                       *FAST, "debug=fdr", f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run_dir(tmp_path / "logs")
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / ".hydra" / "config.yaml").is_file()  # the composed config, for reproducing the run
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["val"]) >= {"val/acc", "val/acc_top5", "val/acc_macro", "val/f1_macro", "val/acc_best",
                                   "val/loss"}
    assert set(metrics["test"]) >= {"test/acc", "test/acc_top5", "test/acc_macro", "test/f1_macro", "test/loss"}
    assert metrics["best_checkpoint"] == str(run / "checkpoints" / "best.ckpt")
    assert len(metrics["class_names"]) == 4 and "test_labels.csv" in metrics["test_source"]
    assert "Best checkpoint:" in result.stdout and "test/acc" in result.stdout
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["animal_lightning"]["class_names"] == metrics["class_names"]
    assert checkpoint["animal_lightning"]["preprocess"]["input_size"] == 32


NOISE = ("Tip:", "litlogger", "already configured with model summary", "was configured so 100%",
         "is not supported by the model summary", "LeafSpec", "to estimate number of stepping batches")


def test_a_run_prints_our_lines_and_lightnings_progress_but_no_noise(tmp_path, synthetic_root):
    """What a user sees: no tip, advert or warning they cannot act on, a model summary with real FLOPs, and
    TensorBoard's HParams results as one point each (no placeholder 0 drawn first)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # warnings shown, as for a user
    common = [f"paths.log_dir={tmp_path / 'logs'}", f"paths.root_dir={tmp_path}"]
    train = subprocess.run([sys.executable, str(PROJECT / "train.py"), "data=synthetic", f"data.root={synthetic_root}",
                            "data.num_classes=4", "data.train_per_class=30", "data.test_per_class=8",
                            "data.image_size=32", "model=resnet18", "model.pretrained=false", "model.image_size=32",
                            "data.num_workers=0", "callbacks.progress_bar=null", "trainer.max_epochs=1", *common],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    predict = subprocess.run([sys.executable, str(PROJECT / "predict.py"), "num_workers=0", "progress=false", *common],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert predict.returncode == 0, predict.stderr[-3000:]
    for result in (train, predict):
        shown = result.stdout + result.stderr
        assert not [line for line in shown.splitlines() if any(noise in line for noise in NOISE)]
    assert "Results" in train.stdout and "Scored 32 labelled images" in predict.stdout
    summary = next(line for line in train.stdout.splitlines() if line.startswith("Total FLOPs"))
    assert summary.split(":")[1].strip() not in ("0", "")  # the summary ran the network once to count them

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    run = only_run_dir(tmp_path / "logs")
    points: dict[str, list] = {}
    for events in (run / "tensorboard").glob("events.out.tfevents*"):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.tag.startswith("hp/"):
                    points.setdefault(value.tag, []).append(value.tensor.float_val[0] if value.tensor.float_val
                                                            else value.simple_value)
    metrics = json.loads((run / "metrics.json").read_text())
    assert points["hp/val_acc_best"] == [pytest.approx(metrics["val"]["val/acc_best"], abs=1e-6)]
    assert points["hp/test_acc"] == [pytest.approx(metrics["test"]["test/acc"], abs=1e-6)]
    assert len(points["hp/test_acc_macro"]) == 1


@pytest.mark.parametrize("override, message", [
    ("data.root={tmp}/missing", "error: data root {tmp}/missing does not exist"),
    # each case starts train.py (about 5 s of imports): the fast lane keeps two, make test-all runs all
    pytest.param("model=resnet18", "error: class folder {tmp}/ds/train/b has no usable image", marks=pytest.mark.slow),
    pytest.param("model.weights_path={tmp}/w.pth",
                 "error: weights file {tmp}/w.pth not found: model.weights_path should be", marks=pytest.mark.slow),
    ("data.balance=oversample", "error: data.balance='oversample' is not one of: none, sampler, loss_weights"),
])
def test_train_py_bad_input_is_one_line_not_a_traceback(tmp_path, override, message):
    make_folder(tmp_path / "ds", {"a": 3})
    if "weights_path" not in override and "balance" not in override:
        (tmp_path / "ds" / "train" / "b").mkdir()
    else:
        make_folder(tmp_path / "ds", {"b": 3})
    result = run_train(f"data.root={tmp_path / 'ds'}", override.format(tmp=tmp_path), *FAST,
                       f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert result.returncode == 2
    assert message.format(tmp=tmp_path) in result.stderr and "Traceback" not in result.stderr
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


@pytest.mark.slow  # train.py or predict.py run for real, several seconds each
def test_resume_from_last_checkpoint_continues_at_the_next_epoch(compose_cfg, copy_synthetic, tmp_path):
    root = copy_synthetic()
    common = [f"data.root={root}", *FAST, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
              "trainer.num_sanity_val_steps=0", "test=false"]
    first = train(compose_cfg(*common, "trainer.max_epochs=1"))
    run = Path(first["best_checkpoint"]).parent.parent
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 0
    assert saved["state_dict"]["val_acc_best.max_value"] == pytest.approx(first["val/acc_best"])

    cfg = compose_cfg(*common, "trainer.max_epochs=2", f"ckpt_path={last}")
    cfg.paths.output_dir = str(tmp_path / "new-hydra-folder")
    second = train(cfg)
    # the resumed run continues in the checkpoint's run folder, so best.ckpt and the best score carry over
    resumed = torch.load(last, weights_only=True)
    # one more epoch of 2 steps after the first, not two: 2 epochs completed, 4 optimizer steps in all
    assert resumed["global_step"] == 4
    # saved during the second epoch (index 1); whether its loop counter already counts that epoch as
    # completed depends on whether val/acc improved (best and last are then written at validation end)
    assert resumed["epoch"] == 1
    assert resumed["loops"]["fit_loop"]["epoch_progress"]["total"]["processed"] == 2
    assert second["val/acc_best"] >= first["val/acc_best"]
    assert Path(second["best_checkpoint"]).parent == run / "checkpoints"
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["epochs_completed"] == 2 and not (tmp_path / "new-hydra-folder" / "checkpoints").exists()


def test_resume_from_a_missing_checkpoint_is_a_clear_error(compose_cfg, tmp_path):
    with pytest.raises(ModelConfigError, match=r"ckpt_path=.*nope.ckpt not found"):
        train(compose_cfg(f"ckpt_path={tmp_path / 'nope.ckpt'}", *FAST))


def test_short_real_training_clearly_beats_chance(trained):
    """experiment=demo for 8 epochs on 4 classes (chance: 0.25); the test images were never used in training
    or model selection (they are the generator's unlabelled test folder, scored with its labels CSV)."""
    metrics = json.loads((trained["ckpt"].parent.parent / "metrics.json").read_text())
    assert "test_labels.csv" in metrics["test_source"]
    assert metrics["test"]["test/acc"] >= 0.6, metrics


@pytest.mark.parametrize("group, option", [
    ("optimizer", "adamw"), ("optimizer", "sgd"),
    ("scheduler", "cosine"), ("scheduler", "cyclic"), ("scheduler", "onecycle"), ("scheduler", "none"),
    ("trainer", "default"), ("trainer", "cpu"), ("trainer", "gpu"),
    ("logger", "tensorboard"), ("logger", "csv"), ("logger", "many"),
    ("callbacks", "default"), ("callbacks", "early_stopping"), ("callbacks", "none"),
    ("experiment", "seed_report"), ("experiment", "demo"), ("experiment", "finetune_gpu"),
    ("experiment", "finetune_cpu"),
    ("experiment", "scratch_cpu"), ("experiment", "demo_zeroshot"), ("callbacks", "ema"),
    ("debug", "fdr"), ("debug", "overfit"), ("debug", "limit"),
    ("data", "animals"), ("data", "synthetic"),
])
def test_every_config_option_composes_and_instantiates(compose_cfg, tmp_path, group, option):
    """Everything train() builds, built for each option: data, model, optimizer, schedule, callbacks, loggers,
    and the Trainer itself where this machine can host it (not trainer=gpu without a GPU)."""
    cfg = compose_cfg(f"{group}={option}", f"data.root={tmp_path}", "model.pretrained=false")
    callbacks = instantiate_group(cfg.get("callbacks"), L.Callback)
    loggers = instantiate_group(cfg.get("logger"), Logger)
    if group in ("callbacks", "logger"):
        assert len(callbacks if group == "callbacks" else loggers) == len(cfg[group] or {})
    dm = instantiate(cfg.data)
    assert dm.batch_size == cfg.data.batch_size
    model = instantiate(cfg.model, class_names=["a", "b", "c"], optimizer=instantiate(cfg.optimizer),
                        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None)
    optimizer = model.optimizer_factory(params=[nn.Parameter(torch.zeros(2))])
    if model.scheduler_factory is not None:
        scheduler = model.scheduler_factory(optimizer=optimizer, total_steps=20, steps_per_epoch=5)
        optimizer.step()
        scheduler.step()
    if cfg.trainer.accelerator != "gpu" or torch.cuda.is_available():
        trainer = build_trainer(cfg, callbacks, loggers)
        assert trainer.max_epochs == cfg.trainer.max_epochs


def test_loss_weights_reach_the_model(compose_cfg, tmp_path):
    root = make_folder(tmp_path / "ds", {"big": 12, "small": 4})
    cfg = compose_cfg(f"data.root={root}", "data.balance=loss_weights", *FAST)
    model = build_model(cfg, instantiate(cfg.data))
    assert model.class_weights is not None and model.class_weights[1] > model.class_weights[0]
    assert model.hparams.class_weights == pytest.approx(model.class_weights.tolist())


@pytest.mark.parametrize("script, text", [
    ("train.py", "train an image classifier on a folder of photos"),
    pytest.param("predict.py", "predict images with a trained checkpoint", marks=pytest.mark.slow),  # 1 is enough
])
def test_help_describes_each_entry_point(tmp_path, script, text):
    result = subprocess.run([sys.executable, str(PROJECT / script), "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and text in result.stdout
    assert "== Configuration groups ==" in result.stdout
