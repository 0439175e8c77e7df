"""model.head_init=probe: the new head starts as a linear probe of the pretrained features (LP-FT)."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as L
import pytest
import torch

from animal_lightning.data import AnimalDataModule
from animal_lightning.errors import ModelConfigError
from animal_lightning.models import AnimalClassifier
from animal_lightning.models.probe import L2_GRID, fit_attribute_probe, fit_linear_probe


def clusters(n: int, generator: torch.Generator, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, len(centres), (n,), generator=generator)
    # far from zero and on a large scale: the fit standardises, the returned head must undo that
    return 50 + 10 * centres[labels] + 8 * torch.randn(n, centres.shape[1], generator=generator), labels


def test_the_probe_separates_classes_and_works_on_raw_features():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=generator)
    train, val = clusters(400, generator, centres), clusters(200, generator, centres)
    weight, bias, info = fit_linear_probe(train, val, 5)
    assert weight.shape == (5, 32) and bias.shape == (5,)
    assert info["l2"] in L2_GRID and info["train_acc"] > 0.95
    raw = float(((val[0] @ weight.T + bias).argmax(1) == val[1]).float().mean())
    assert raw == pytest.approx(info["val_acc"]) and raw > 0.9  # the folded head gives the fit's answers


def test_without_validation_images_the_default_penalty_is_used():
    generator = torch.Generator().manual_seed(1)
    train = clusters(100, generator, torch.randn(3, 8, generator=generator))
    _, _, info = fit_linear_probe(train, None, 3)
    assert info["l2"] == 1e-3 and info["val_acc"] != info["val_acc"]  # NaN: nothing to choose on


def test_the_attribute_probe_predicts_each_classes_attributes():
    generator = torch.Generator().manual_seed(2)
    centres = torch.randn(4, 16, generator=generator)
    features, labels = clusters(300, generator, centres)
    matrix = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)  # class x attribute
    weight, bias = fit_attribute_probe(features, matrix[labels], l2=1e-3)
    predicted = torch.sigmoid(features @ weight.T + bias) > 0.5
    assert weight.shape == (3, 16) and (predicted == matrix[labels].bool()).float().mean() > 0.95


def fit_one_frozen_epoch(root, head_init: str) -> tuple[AnimalClassifier, float]:
    """One epoch with the backbone frozen and a learning rate of 0: validation sees the head as initialised."""
    datamodule = AnimalDataModule(root, batch_size=16, num_workers=0, augment={"enabled": False})
    model = AnimalClassifier(datamodule.class_names, backbone="efficientnet_lite0", pretrained=True, image_size=64,
                             head_init=head_init, freeze_backbone_epochs=1, channels_last=False,
                             optimizer=partial(torch.optim.AdamW, lr=0.0))
    datamodule.use_preprocess(model.preprocess)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", precision="32-true",
                        deterministic=True)
    trainer.fit(model, datamodule)
    return model, float(trainer.callback_metrics["val/acc"])


def test_the_probe_head_is_what_training_starts_from(copy_synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("ANIMAL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    root = copy_synthetic()  # 4 demo classes: ImageNet features tell them apart, a random head does not
    L.seed_everything(0)
    model, val_acc = fit_one_frozen_epoch(root, "probe")
    result = model.probe_result
    assert result["images"] == len(model.trainer.datamodule.train_set) and result["l2"] in L2_GRID
    assert val_acc == pytest.approx(result["val_acc"], abs=1e-6)  # the validation pass saw the probe's head
    assert val_acc >= 0.75  # 4 classes: chance is 0.25
    L.seed_everything(0)
    _, random_acc = fit_one_frozen_epoch(root, "random")
    assert val_acc > random_acc + 0.2


def test_a_resumed_run_keeps_its_trained_head(copy_synthetic, tmp_path, monkeypatch):
    """The probe is fitted once, at the start of a fresh run: never over a checkpoint's trained head."""
    monkeypatch.setenv("ANIMAL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    root = copy_synthetic()
    model, _ = fit_one_frozen_epoch(root, "probe")
    head = model.class_head
    with torch.no_grad():
        head.weight.add_(1.0)  # stands in for a head that trained on
    trained = head.weight.clone()
    assert model.trainer.global_step > 0  # as after restoring a checkpoint
    model.on_fit_start()
    assert torch.equal(head.weight, trained)


def test_an_unknown_head_init_is_one_line_with_the_choices():
    with pytest.raises(ModelConfigError, match=r"model.head_init='linear' is not one of: random, probe"):
        AnimalClassifier(["a", "b"], backbone="resnet18", pretrained=False, head_init="linear")


def test_finetune_cpu_is_the_packaged_lite0_with_a_probe_head(compose_cfg):
    cfg = compose_cfg("experiment=finetune_cpu")
    assert cfg.model.backbone == "efficientnet_lite0" and cfg.model.pretrained and cfg.model.head_init == "probe"
    assert cfg.model.freeze_bn and cfg.model.backbone_lr_mult == 0.1
    assert cfg.trainer.accelerator == "cpu"


def test_a_probe_head_without_the_projects_datamodule_is_one_line(tmp_path):
    """A plain LightningDataModule has no probe_dataloader: the error names the fix before any step."""
    images = torch.rand(8, 3, 32, 32)
    labels = torch.tensor([0, 1] * 4)

    class Plain(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)

    model = AnimalClassifier(["a", "b"], backbone="resnet18", pretrained=False, image_size=32, head_init="probe",
                             optimizer=partial(torch.optim.AdamW, lr=1e-3))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ModelConfigError, match=r"needs the project's DataModule .*set model.head_init=random$"):
        trainer.fit(model, Plain())
    assert trainer.global_step == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_probe_features_are_what_the_head_receives_in_eval_mode():
    model = AnimalClassifier(["a", "b"], backbone="resnet18", pretrained=False, image_size=32)
    assert model.training  # as in on_fit_start: BatchNorm would use (and update) batch statistics
    images, labels = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 0, 1, 1, 0])
    features, got = model.probe_features([(images[:4], labels[:4]), (images[4:], labels[4:])])
    assert model.training  # put back as it was
    assert features.shape == (6, model.class_head.in_features) and torch.equal(got, labels)
    with torch.no_grad():
        expected = model.eval()(images)  # running statistics, as the probe's features had
    torch.testing.assert_close(model.class_head(features), expected, rtol=1e-4, atol=1e-4)
