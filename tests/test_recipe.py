"""The training-recipe knobs: each composes and trains, and each does what it says."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.optim.swa_utils import AveragedModel

from animal_lightning.callbacks import EMA
from animal_lightning.data import AnimalDataModule
from animal_lightning.data.datasets import MixCollate
from animal_lightning.data.transforms import PreprocessSpec, train_transform
from animal_lightning.errors import ModelConfigError
from animal_lightning.models import AnimalClassifier
from animal_lightning.training import train
from tests.conftest import FAST, make_folder

TINY = [*FAST, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "test=false", "data.batch_size=8"]


@pytest.mark.parametrize("knobs", [
    ["data.augment.policy=randaugment"],
    ["data.augment.policy=none", "data.augment.random_erasing=0.5"],
    ["data.augment.train_crop_ratio=0.75"],
    ["data.mix.mixup_alpha=0.2"],
    ["data.mix.mixup_alpha=0.2", "data.mix.cutmix_alpha=1.0", "data.balance=sampler"],
    ["callbacks=ema"],
    ["model.backbone_lr_mult=0.1", "model.freeze_backbone_epochs=1", "trainer.gradient_clip_val=1.0"],
    ["scheduler=onecycle", "optimizer=sgd"],
    ["data.attributes=attributes", "data.mix.mixup_alpha=0.2", "callbacks=ema"],  # attribute head, soft targets
    ["data.augment.policy=trivial_augment", "data.augment.crop_scale=[0.08,1.0]", "data.resize_mode=crop"],
])
def test_each_knob_composes_and_trains(compose_cfg, copy_synthetic, knobs):
    metrics = train(compose_cfg(f"data.root={copy_synthetic()}", *TINY, *knobs))
    assert Path(metrics["best_checkpoint"]).is_file() and 0.0 <= metrics["val/acc"] <= 1.0


def test_mixed_batches_have_soft_targets_that_sum_to_one():
    images = torch.rand(8, 3, 16, 16)
    labels = torch.arange(8) % 4
    for mix in (MixCollate(4, mixup_alpha=0.4), MixCollate(4, cutmix_alpha=1.0), MixCollate(4, 0.4, 1.0)):
        mixed, soft = mix(list(zip(images, labels, strict=True)))
        assert mixed.shape == images.shape and soft.shape == (8, 4) and soft.dtype.is_floating_point
        assert torch.allclose(soft.sum(1), torch.ones(8))
        assert (soft.max(1).values < 1).all()  # every row really is a mixture
        assert not torch.equal(mixed, images)


def test_the_datamodule_mixes_only_training_batches(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 8, "b": 8})
    dm = AnimalDataModule(root, batch_size=4, num_workers=0, mix={"mixup_alpha": 0.4})
    dm.use_preprocess(PreprocessSpec(32, 36))
    dm.setup("fit")
    _, train_targets = next(iter(dm.train_dataloader()))
    _, val_targets = next(iter(dm.val_dataloader()))
    assert train_targets.shape == (4, 2) and val_targets.shape == (2,)


def test_train_crop_ratio_and_random_erasing_shape_the_training_images():
    from PIL import Image

    spec = PreprocessSpec(64, 72)
    image = Image.new("RGB", (80, 80), (200, 100, 50))
    assert train_transform(spec, train_crop_ratio=0.75)(image).shape == (3, 48, 48)
    erased = train_transform(spec, policy="none", random_erasing=1.0, hflip=False)(image)
    assert (erased == 0).all(dim=0).any()  # a rectangle set to 0 (the mean after normalisation)
    with pytest.raises(ValueError, match="data.augment.policy='autoaugment' is not one of"):
        train_transform(spec, policy="autoaugment")
    with pytest.raises(ValueError, match=r"data.augment.random_erasing=2 must be a probability"):
        train_transform(spec, random_erasing=2)


class WeightSpy(L.Callback):
    """Records conv1's weight as validation sees it, after the EMA callback has swapped its weights in."""

    def __init__(self):
        self.seen = []

    def on_validation_epoch_start(self, trainer, module):
        self.seen.append(module.net.conv1.weight.detach().clone())


def test_ema_weights_are_validated_and_saved(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 10, "b": 10})
    dm = AnimalDataModule(root, batch_size=4, num_workers=0)
    model = AnimalClassifier(dm.class_names, backbone="resnet18", pretrained=False, image_size=32,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    dm.use_preprocess(model.preprocess)
    ema, spy = EMA(decay=0.9), WeightSpy()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc", mode="max")  # as configured
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accelerator="cpu", callbacks=[ema, spy, saver],
                        default_root_dir=tmp_path)
    trainer.fit(model, dm)
    averaged = ema._average_model.module.net.conv1.weight
    assert torch.equal(spy.seen[-1], averaged)  # validation ran on the averaged weights
    assert torch.equal(model.net.conv1.weight, averaged)  # and training ends with them
    assert not torch.equal(spy.seen[0], spy.seen[-1])
    path = tmp_path / "best.ckpt"  # written at a validation's end, while EMA was running
    checkpoint = torch.load(path, weights_only=True)
    saved, raw = checkpoint["state_dict"]["net.conv1.weight"], checkpoint["current_model_state"]["net.conv1.weight"]
    assert torch.equal(saved, spy.seen[checkpoint["epoch"]])  # the weights that validation scored
    assert not torch.allclose(saved, raw)
    restored, _ = AnimalClassifier.from_checkpoint(path)  # prediction gets the averaged weights
    assert torch.equal(restored.net.conv1.weight, saved)


def average_after(updates: int, dtype: torch.dtype = torch.float32, **ema) -> float:
    """The averaged weight after a weight of 0 (where training starts) jumps to 1 and stays there."""
    module = torch.nn.Linear(1, 1, bias=False).to(dtype)
    module.register_buffer("seen", torch.tensor(False))  # a bool buffer, as some timm models have
    averaged = AveragedModel(module, use_buffers=True, multi_avg_fn=EMA(**ema).update)
    with torch.no_grad():
        module.weight.zero_()
        averaged.update_parameters(module)  # the first update copies the start
        module.weight.fill_(1.0)
        module.seen.fill_(True)
    for _ in range(updates):
        averaged.update_parameters(module)
    assert bool(averaged.module.seen) == (updates > 0)  # buffers that are not numbers to average are copied
    return float(averaged.module.weight.detach())


def test_the_ema_decay_warms_up_so_short_runs_average_their_own_weights():
    assert average_after(400, decay=0.999, warmup=0) == pytest.approx(1 - 0.999 ** 400, rel=1e-4)  # 0.33: the start
    assert average_after(400, decay=0.999) > 0.97  # the warmed-up decay has left the start behind
    assert average_after(2, decay=0.999) < average_after(20, decay=0.999) < 1  # and still averages
    # (1 + n) / (10 + n) is 2/11 at the first average, then passes 0.2: the fixed decay rules from there on
    assert average_after(5, decay=0.2) == pytest.approx(1 - (2 / 11) * 0.2 ** 4, rel=1e-4)
    # bf16 weights: the rate is not rounded to bf16 (0.999 would become 1.0 and freeze the average)
    assert 0 < average_after(1, torch.bfloat16, decay=0.999, warmup=0) < 0.01


class LastRawWeights(L.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.raw = module.net.fc.weight.detach().clone()  # before the EMA swaps its average in at the end


def ema_lag(tmp_path, ema: EMA) -> float:
    """How far the averaged weights (what validation and checkpoints get) lag the raw ones after 10 steps."""
    root = make_folder(tmp_path / "ds", {"a": 12, "b": 12})
    dm = AnimalDataModule(root, batch_size=4, num_workers=0, check_images=False)
    L.seed_everything(0)
    model = AnimalClassifier(dm.class_names, backbone="resnet18", pretrained=False, image_size=32,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    dm.use_preprocess(model.preprocess)
    spy = LastRawWeights()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, accelerator="cpu", callbacks=[ema, spy],
                        default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step == 10 and torch.equal(model.net.fc.weight, ema._average_model.module.net.fc.weight)
    return float((model.net.fc.weight - spy.raw).norm())


def test_a_short_fit_with_the_warmed_up_ema_averages_its_own_weights(tmp_path):
    fixed = ema_lag(tmp_path / "fixed", EMA(decay=0.999, warmup=0))  # stays at the first step's weights
    warmed = ema_lag(tmp_path / "warmed", EMA(decay=0.999))
    assert warmed < 0.3 * fixed  # measured: 0.05 against 0.58


def test_the_ema_callback_pickles_for_spawned_processes():
    update = pickle.loads(pickle.dumps(EMA(decay=0.99, warmup=5)))._kwargs["multi_avg_fn"]
    assert update.rate(1) == pytest.approx(2 / 6) and update.rate(10**6) == 0.99


@pytest.mark.parametrize("bad, message", [
    ("callbacks.ema.decay=1.5", r"^callbacks.ema.decay=1.5 must be in \[0, 1\] \(e.g. 0.998\)$"),
    ("callbacks.ema.warmup=-1", r"^callbacks.ema.warmup=-1 must be >= 0 \(e.g. 10; 0: a fixed decay\)$"),
])
def test_bad_ema_settings_are_one_line(compose_cfg, copy_synthetic, bad, message):
    with pytest.raises(ModelConfigError, match=message):  # not a Hydra traceback
        train(compose_cfg(f"data.root={copy_synthetic()}", *TINY, "callbacks=ema", bad))


def test_lr_finder_runs_and_its_suggestion_is_used(compose_cfg, copy_synthetic):
    cfg = compose_cfg(f"data.root={copy_synthetic()}", *TINY, "trainer.limit_train_batches=1.0", "data.batch_size=4",
                      "tune.lr_find=true", "tune.lr_find_steps=24", "scheduler=none")
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert (run / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    state = torch.load(Path(metrics["best_checkpoint"]), weights_only=True)["optimizer_states"][0]
    lrs = {group["lr"] for group in state["param_groups"]}
    assert len(lrs) == 1 and lrs != {1e-3}  # trained with the finder's suggestion, not the config's 1e-3


def test_batch_size_finder_needs_a_gpu(compose_cfg, copy_synthetic):
    from animal_lightning.errors import ModelConfigError

    with pytest.raises(ModelConfigError, match="tune.batch_size=true needs a GPU"):
        train(compose_cfg(f"data.root={copy_synthetic()}", *TINY, "tune.batch_size=true", "trainer=cpu"))


def test_the_test_phase_scores_the_averaged_weights(compose_cfg, copy_synthetic, monkeypatch):
    tested = []
    monkeypatch.setattr(AnimalClassifier, "on_test_epoch_start",
                        lambda self: tested.append(self.net.conv1.weight.detach().clone()), raising=False)
    cfg = compose_cfg(f"data.root={copy_synthetic()}", *TINY, "test=true", "callbacks=ema",
                      "callbacks.ema.decay=0.5", "optimizer.lr=0.05")
    metrics = train(cfg)
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=True)
    averaged, raw = checkpoint["state_dict"]["net.conv1.weight"], checkpoint["current_model_state"]["net.conv1.weight"]
    assert not torch.allclose(averaged, raw)
    assert len(tested) == 1 and torch.equal(tested[0], averaged)  # not the raw weights the callback would restore


def test_the_training_crop_never_goes_below_the_backbones_minimum():
    from PIL import Image

    from animal_lightning.models import preprocess_spec

    image = Image.new("RGB", (400, 360), (120, 80, 40))
    inception = preprocess_spec("inception_v3")  # its auxiliary classifier fails below 299 px
    assert train_transform(inception, train_crop_ratio=0.875)(image).shape == (3, 299, 299)
    assert train_transform(preprocess_spec("resnet50"), train_crop_ratio=0.875)(image).shape == (3, 196, 196)
