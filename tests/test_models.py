"""The backbone factory, the LightningModule's training logic, optimizers and schedules."""

from __future__ import annotations

import copy
from functools import partial

import lightning.pytorch as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from animal_lightning.data import AnimalDataModule
from animal_lightning.errors import ModelConfigError, WeightsError
from animal_lightning.models import AnimalClassifier, available, create_backbone, preprocess_spec
from animal_lightning.models.metrics import eval_metrics
from animal_lightning.models.schedules import cyclic, onecycle, warmup_cosine
from tests.conftest import CONF, PickleBomb, make_folder

MODEL_CONFIGS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
# VGG-16 (138 M parameters) and ViT-B/16 (86 M) take seconds per step even at small inputs: make test-all covers them
SLOW_MODELS = ("vgg16", "vit_b_16")
WITH_SLOW_MODELS = [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_MODELS else name
                    for name in MODEL_CONFIGS]
# A small input each network accepts (Inception v3's auxiliary head needs 299, Inception v4's stem 75).
SMALL = {"inception_v3": 299, "inception_v4": 75}
TIMM_TEST_MODEL = "resnet10t"  # model=timm is tested with a small timm network


def small_model(compose_cfg, name: str, *extra: str) -> AnimalClassifier:
    size = SMALL.get(name, 32)
    overrides = [f"model={name}", "model.pretrained=false", f"model.image_size={size}", *extra]
    if name == "timm":
        overrides.append(f"model.backbone=timm/{TIMM_TEST_MODEL}")
    cfg = compose_cfg(*overrides)
    return instantiate(cfg.model, class_names=["a", "b", "c"], optimizer=instantiate(cfg.optimizer))


def test_every_backbone_has_a_model_config():
    assert set(available()) | {"timm"} == set(MODEL_CONFIGS)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_model_config_trains_a_step_and_predicts_its_classes(compose_cfg, name):
    model = small_model(compose_cfg, name)
    size = SMALL.get(name, 32)
    assert model.hparams.backbone == (f"timm/{TIMM_TEST_MODEL}" if name == "timm" else name)
    assert model.preprocess.input_size == size
    model.train()
    images, targets = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    loss = model.training_step((images, targets), 0)
    loss.backward()
    head = model.net.get_submodule(model.head_names[0])  # the factory names the head
    assert head.weight.grad is not None and head.out_features == 3
    assert all(p.grad is not None for p in model.net.parameters() if p.requires_grad and p.ndim > 1)
    model.eval()
    with torch.inference_mode():
        assert model(images).shape == (2, 3)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_the_transforms_receive_the_backbones_spec(compose_cfg, name, tmp_path):
    model = small_model(compose_cfg, name)
    spec = model.preprocess
    root = make_folder(tmp_path / "ds", {"a": 3, "b": 3, "c": 3})
    dm = AnimalDataModule(root, batch_size=2, num_workers=0, augment={"train_crop_ratio": 0.875})
    dm.use_preprocess(spec)
    dm.setup("fit")
    train_images, _ = next(iter(dm.train_dataloader()))
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape[-2:] == (spec.input_size, spec.input_size)
    # FixRes crops are never below what the network accepts (fixed-size ViTs: never below the input)
    assert train_images.shape[-1] == max(spec.min_input_size, round(spec.input_size * 0.875))
    assert dm.preprocess.mean == spec.mean and dm.preprocess.interpolation == spec.interpolation


def test_preprocess_spec_comes_from_the_backbone():
    assert preprocess_spec("resnet50").input_size == 224
    inception = preprocess_spec("inception_v3")
    assert (inception.input_size, inception.resize_size) == (299, 342)
    small = preprocess_spec("vgg16", image_size=112)
    assert (small.input_size, small.resize_size) == (112, 128)  # keeps vgg's 224/256 crop ratio


def test_too_small_input_is_refused_with_the_minimum():
    with pytest.raises(ModelConfigError, match="model.image_size=80 is too small for inception_v3: use at least 299"):
        preprocess_spec("inception_v3", image_size=80)


def test_unknown_backbone_lists_the_available_ones():
    with pytest.raises(ModelConfigError, match="unknown backbone 'resnet5': choose one of .*resnet50.*vgg16"):
        create_backbone("resnet5", 3)


def test_weights_path_loads_a_local_state_dict(tmp_path):
    reference = create_backbone("resnet18", 1000).net  # stands in for downloaded ImageNet weights
    path = tmp_path / "resnet18-local.pth"
    torch.save(reference.state_dict(), path)
    model = create_backbone("resnet18", 5, weights_path=path).net
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.fc.out_features == 5  # the head is new, sized for our classes
    scratch = create_backbone("resnet18", 5).net
    assert not torch.equal(scratch.conv1.weight, reference.conv1.weight)


def test_weights_path_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(WeightsError, match=r"weights file .*nope.pth not found: model.weights_path should be"):
        create_backbone("resnet18", 3, weights_path=tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read weights file .*garbage.pth"):
        create_backbone("resnet18", 3, weights_path=garbage)
    other = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, other)
    with pytest.raises(WeightsError, match="does not fit resnet18"):
        create_backbone("resnet18", 3, weights_path=other)


def test_weights_file_with_a_pickled_payload_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": PickleBomb()}, path)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        create_backbone("resnet18", 3, weights_path=path)
    assert not (tmp_path / "PWNED").exists()


def test_optimizer_groups_no_decay_on_norm_and_bias_and_a_lower_backbone_lr():
    model = AnimalClassifier(["a", "b"], backbone="resnet18", pretrained=False, backbone_lr_mult=0.1,
                             optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05))
    optimizer = model.configure_optimizers()
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    net = model.net
    def holds(name, tensor):
        return any(p is tensor for p in groups[name]["params"])

    assert holds("backbone_no_decay", net.bn1.weight) and holds("head_no_decay", net.fc.bias)
    assert holds("backbone", net.conv1.weight) and holds("head", net.fc.weight)
    assert groups["backbone_no_decay"]["weight_decay"] == groups["head_no_decay"]["weight_decay"] == 0.0
    assert groups["backbone"]["weight_decay"] == groups["head"]["weight_decay"] == 0.05
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["head"]["lr"] == pytest.approx(1e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))


def _lrs(scheduler, steps):
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def _sgd():
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)


def test_warmup_cosine_rises_then_decays_to_the_floor():
    lrs = _lrs(warmup_cosine(_sgd(), total_steps=100, steps_per_epoch=10, warmup_epochs=1, min_lr_ratio=0.01), 101)
    assert lrs[0] < 0.2 and lrs[9] < lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[100] == pytest.approx(0.01)


def test_cyclic_triangular2_halves_each_cycle():
    lrs = _lrs(cyclic(_sgd(), total_steps=80, steps_per_epoch=10, base_lr_ratio=0.1, epochs_per_half_cycle=1), 80)
    assert max(lrs[:20]) == pytest.approx(1.0) and max(lrs[20:40]) == pytest.approx(0.55)
    assert min(lrs) == pytest.approx(0.1)


def test_onecycle_peaks_at_the_optimizer_lr():
    lrs = _lrs(onecycle(_sgd(), total_steps=50, steps_per_epoch=10, pct_start=0.3), 50)
    assert max(lrs) == pytest.approx(1.0, rel=1e-3) and lrs[0] < 0.1 and lrs[-1] < 0.01


class Snapshots(L.Callback):
    """Copies of the weights at each epoch end: what the freeze phase may and may not change."""

    def __init__(self):
        self.states = []

    def on_train_epoch_end(self, trainer, module):
        self.states.append(copy.deepcopy({k: v.detach().clone() for k, v in module.net.state_dict().items()}))


@pytest.mark.parametrize("name", WITH_SLOW_MODELS)
def test_weights_path_round_trip_for_every_model(compose_cfg, name, tmp_path):
    """A state dict saved from the ImageNet-shaped network (1000 classes) starts a model for our classes."""
    backbone = small_model(compose_cfg, name).hparams.backbone
    fixed = preprocess_spec(backbone).min_input_size == preprocess_spec(backbone).input_size  # ViT: native size
    size = None if fixed else SMALL.get(name, 32)
    reference = create_backbone(backbone, 1000, image_size=size)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.net.state_dict(), path)
    loaded = create_backbone(backbone, 3, weights_path=path, image_size=size)
    path.unlink()  # VGG-16's is 550 MB: not kept until pytest prunes its temp folders
    heads = set(loaded.head_names)
    original = reference.net.state_dict()
    for key, value in loaded.net.state_dict().items():
        if any(key.startswith(head + ".") for head in heads):
            assert value.shape[0] == 3, key  # the new head, sized for our classes
        else:
            assert torch.equal(value, original[key]), f"{key} not loaded"
    del reference, loaded, original


@pytest.mark.parametrize("name", WITH_SLOW_MODELS)
def test_frozen_backbone_phase_then_thaw_for_every_model(compose_cfg, name, tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 2, "b": 2, "c": 2}, split="train")
    make_folder(tmp_path / "ds", {"a": 1, "b": 1, "c": 1}, split="val")
    model = small_model(compose_cfg, name, "model.freeze_backbone_epochs=1", "optimizer.lr=1e-2",
                        "model.channels_last=false")
    dm = AnimalDataModule(root, batch_size=2, num_workers=0, augment={"enabled": False})
    dm.use_preprocess(model.preprocess)
    initial = {k: v.clone() for k, v in model.net.state_dict().items()}
    heads = tuple(model.head_names)
    snaps = Snapshots()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[snaps], num_sanity_val_steps=0, accelerator="cpu",
                        limit_train_batches=1, limit_val_batches=0, precision="32-true")
    trainer.fit(model, dm)
    frozen, thawed = snaps.states
    changed_backbone = False
    for key, value in initial.items():
        if any(key.startswith(head + ".") for head in heads):
            assert not torch.equal(frozen[key], value), f"head {key} did not train"
        elif "num_batches_tracked" not in key:
            assert torch.equal(frozen[key], value), f"{key} changed while frozen"
            changed_backbone |= not torch.equal(thawed[key], frozen[key])
    assert changed_backbone, "the backbone did not train after the frozen epoch"


def test_frozen_backbone_phase_trains_only_the_head(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 6, "b": 6})
    dm = AnimalDataModule(root, batch_size=4, num_workers=0)
    model = AnimalClassifier(dm.class_names, backbone="resnet18", pretrained=False, image_size=32,
                             freeze_backbone_epochs=1, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    dm.use_preprocess(model.preprocess)
    initial = {k: v.clone() for k, v in model.net.state_dict().items()}
    snaps = Snapshots()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[snaps], num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(model, dm)
    frozen, thawed = snaps.states
    for name, value in initial.items():
        if name.startswith("fc."):
            assert not torch.equal(frozen[name], value), name
        elif "num_batches_tracked" not in name:
            assert torch.equal(frozen[name], value), f"{name} changed while frozen"
    assert not torch.equal(thawed["conv1.weight"], frozen["conv1.weight"])
    assert not torch.equal(thawed["bn1.running_mean"], frozen["bn1.running_mean"])


def test_freeze_bn_keeps_the_running_statistics_while_everything_trains(tmp_path):
    root = make_folder(tmp_path / "ds", {"a": 6, "b": 6})
    dm = AnimalDataModule(root, batch_size=4, num_workers=0)
    model = AnimalClassifier(dm.class_names, backbone="resnet18", pretrained=False, image_size=32, freeze_bn=True,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    dm.use_preprocess(model.preprocess)
    initial = {k: v.clone() for k, v in model.net.state_dict().items()}
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(model, dm)
    after = model.net.state_dict()
    for name, value in initial.items():
        if "running_" in name:
            assert torch.equal(after[name], value), f"{name} changed"
    # the convolutions, and the BatchNorm scales and shifts, still train
    assert not torch.equal(after["conv1.weight"], initial["conv1.weight"])
    assert not torch.equal(after["bn1.weight"], initial["bn1.weight"])


def test_inception_trains_with_its_auxiliary_head(tmp_path):
    model = AnimalClassifier(["a", "b"], backbone="inception_v3", pretrained=False)
    model.train()
    images = torch.randn(2, 3, 299, 299)
    output = model.net(images)
    assert output.aux_logits.shape == (2, 2)  # the aux head was re-made for our classes too
    loss = model.training_step((images, torch.tensor([0, 1])), 0)
    loss.backward()
    assert model.net.AuxLogits.fc.weight.grad is not None


def test_eval_metrics_match_an_independent_computation():
    """The first batch is all correct (top-1 and top-5 states agree), the rest are not: no shared state.
    Class 6 never occurs in the targets but gets predicted: macro accuracy averages present classes only."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 6, (60,), generator=generator)
    logits = torch.randn(60, 7, generator=generator)
    logits[:10] = torch.nn.functional.one_hot(targets[:10], 7).float() * 5
    metrics = eval_metrics(7, "val/")
    for start in range(0, 60, 10):
        metrics.update(logits[start:start + 10], targets[start:start + 10])
    values = {k: v.item() for k, v in metrics.compute().items()}
    predicted = logits.argmax(1)
    top5 = (logits.topk(5, 1).indices == targets[:, None]).any(1)
    recalls, f1s = [], []
    assert (predicted == 6).any()
    for c in range(7):
        tp = ((predicted == c) & (targets == c)).sum().item()
        support, chosen = (targets == c).sum().item(), (predicted == c).sum().item()
        if support:
            recalls.append(tp / support)
        f1s.append(2 * tp / (support + chosen) if support + chosen else 0.0)
    assert values["val/acc"] == pytest.approx((predicted == targets).float().mean().item())
    assert values["val/acc_top5"] == pytest.approx(top5.float().mean().item())
    assert values["val/acc_top5"] > values["val/acc"]
    assert len(recalls) == 6 and values["val/acc_macro"] == pytest.approx(sum(recalls) / 6)
    assert values["val/f1_macro"] == pytest.approx(sum(f1s) / 7)


def test_checkpoint_restores_the_imagenet_variant_of_inception(tmp_path):
    """Inception with ImageNet weights transforms its input; a restored checkpoint must do the same."""
    imagenet = create_backbone("inception_v3", 1000, weights_path=None).net  # scratch variant, for weights only
    path = tmp_path / "inception-local.pth"
    torch.save(imagenet.state_dict(), path)
    model = AnimalClassifier(["a", "b", "c"], backbone="inception_v3", weights_path=str(path)).eval()
    assert model.net.transform_input
    payload = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(payload)
    torch.save(payload, tmp_path / "inception.ckpt")
    restored, meta = AnimalClassifier.from_checkpoint(tmp_path / "inception.ckpt")
    assert restored.net.transform_input and meta["preprocess"]["input_size"] == 299
    images = torch.randn(1, 3, 299, 299)
    with torch.inference_mode():
        assert torch.allclose(restored(images), model(images), atol=1e-5)


def test_zoo_configuration_errors_name_the_setting_and_the_fix(tmp_path):
    with pytest.raises(ModelConfigError, match=r"unknown timm model 'convnext_tinyy' \(did you mean convnext_tiny"):
        create_backbone("timm/convnext_tinyy", 3)
    with pytest.raises(ModelConfigError, match=r"timm model 'resnet50.bad_tag': .*set model.backbone=timm/"):
        create_backbone("timm/resnet50.bad_tag", 3)
    with pytest.raises(ModelConfigError, match="model.image_size=72 does not suit vit_b_16: use a multiple of 16"):
        preprocess_spec("vit_b_16", image_size=72)
    with pytest.raises(ModelConfigError, match="vit_b_16's ImageNet weights are for 224 px: drop model.image_size"):
        create_backbone("vit_b_16", 3, pretrained=True, image_size=128)
    with pytest.raises(WeightsError, match="no pretrained zfnet weights are published: set model.pretrained=false"):
        create_backbone("zfnet", 3, pretrained=True)
    with pytest.raises(ModelConfigError, match="model.image_size=64 is too small for inception_v4: use at least 75"):
        preprocess_spec("inception_v4", image_size=64)


def test_weights_path_reads_safetensors_too(tmp_path):
    from safetensors.torch import save_file

    reference = create_backbone("timm/resnet10t", 1000).net  # a timm state dict, as the Hugging Face hub serves it
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    loaded = create_backbone("timm/resnet10t", 4, weights_path=path)
    assert torch.equal(loaded.net.conv1[0].weight, reference.conv1[0].weight)
    assert loaded.net.get_submodule(loaded.head_names[0]).out_features == 4
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="cannot read weights file .*broken.safetensors"):
        create_backbone("timm/resnet10t", 4, weights_path=broken)
