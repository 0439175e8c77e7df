"""The pretrained ImageNet head kept in the model, its evidence for unseen classes, and decisions that use it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from animal_lightning.data.synthetic import SyntheticSpec, ensure_synthetic_dataset
from animal_lightning.errors import CheckpointError, DataError, ModelConfigError
from animal_lightning.models import AnimalClassifier, create_backbone, openset
from animal_lightning.prediction import decide, predict
from tests.conftest import FAST, compose_config

RED_FOX = 277


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory) -> Path:
    """A ResNet-18 state dict with a 1000-class head: stands in for ImageNet weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18-imagenet.pth"
    torch.save(create_backbone("resnet18", 1000).net.state_dict(), path)
    return path


def knowing_model(weights: Path, **kwargs) -> AnimalClassifier:
    kwargs.setdefault("imagenet_knowledge", "head")
    return AnimalClassifier(["antelope", "collie"], backbone="resnet18", weights_path=str(weights), image_size=32,
                            **kwargs)


def test_a_pretrained_backbone_keeps_its_imagenet_head_as_frozen_buffers(imagenet_weights):
    state = torch.load(imagenet_weights, weights_only=True)
    model = knowing_model(imagenet_weights, unseen_classes=["fox"], imagenet_map={"fox": [RED_FOX]})
    assert torch.equal(model.imagenet_weight, state["fc.weight"]) and torch.equal(model.imagenet_bias, state["fc.bias"])
    assert model.hparams.imagenet_knowledge == "head" and model.net.fc.out_features == 2
    assert "imagenet_weight" in model.state_dict()  # saved with the checkpoint...
    assert not any(p is model.imagenet_weight for p in model.parameters())  # ...and never trained
    idle = knowing_model(imagenet_weights, imagenet_knowledge="copy")  # no unseen class: nothing to keep, or save
    off = knowing_model(imagenet_weights, imagenet_knowledge=False)  # as YAML's false arrives: none
    scratch = AnimalClassifier(["a", "b"], backbone="resnet18", pretrained=False, image_size=32)
    assert not hasattr(idle, "imagenet_net") and idle.hparams.imagenet_knowledge == "none"
    for model in (off, scratch):
        assert not hasattr(model, "imagenet_weight") and model.hparams.imagenet_knowledge == "none"
    with pytest.raises(ModelConfigError, match="model.imagenet_knowledge='all' is not one of: head, copy, none"):
        knowing_model(imagenet_weights, imagenet_knowledge="all")


def test_a_frozen_copy_of_the_pretrained_network_reads_the_images(imagenet_weights, tmp_path):
    from animal_lightning.models.optim import parameter_groups

    reference = torchvision.models.resnet18()
    reference.load_state_dict(torch.load(imagenet_weights, weights_only=True))
    reference.eval()
    model = knowing_model(imagenet_weights, imagenet_knowledge="copy", unseen_classes=["fox"],
                          imagenet_map={"fox": [RED_FOX, 278]}).eval()
    assert not hasattr(model, "imagenet_weight") and not any(p.requires_grad for p in model.imagenet_net.parameters())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.net.layer4[0].conv1.weight.mul_(3.0)  # fine-tuning moves the backbone: the copy does not follow
        expected = torch.softmax(reference(images), dim=1)[:, [RED_FOX, 278]].sum(1)
        evidence = model.outputs(images)["imagenet"]
    assert torch.allclose(evidence[:, 0], expected, rtol=1e-4, atol=1e-7)
    trained = {id(p) for group in parameter_groups(model, model._head_ids, exclude={
        id(p) for p in model.imagenet_net.parameters()}) for p in group["params"]}
    assert trained.isdisjoint(id(p) for p in model.imagenet_net.parameters())
    torch.save({"state_dict": model.state_dict()}, tmp_path / "state.pt")
    restored = AnimalClassifier(**{**model.hparams, "weights_path": None}, load_weights=False)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        assert torch.allclose(restored.eval().outputs(images)["imagenet"], evidence, atol=1e-6)


def test_ddp_does_not_broadcast_the_constant_imagenet_buffers(imagenet_weights, tmp_path):
    model = knowing_model(imagenet_weights, unseen_classes=["fox"], imagenet_map={"fox": [RED_FOX]})
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        synced = set(ddp.named_module_buffers)
    finally:
        torch.distributed.destroy_process_group()
    assert "net.bn1.running_mean" in synced  # BatchNorm statistics are still synced
    assert not synced & {"imagenet_weight", "imagenet_bias", "imagenet_members"}


def test_imagenet_evidence_is_the_mass_on_each_classs_imagenet_classes(imagenet_weights):
    model = knowing_model(imagenet_weights, unseen_classes=["fox", "gorilla"],
                          imagenet_map={"fox": [RED_FOX, 278], "gorilla": [366], "collie": [231]}).eval()
    with torch.no_grad():
        model.imagenet_weight.zero_()
        model.imagenet_bias.fill_(-30.0)
        model.imagenet_bias[[RED_FOX, 278]] = 10.0  # every image looks like a red or a kit fox to ImageNet
        outputs = model.outputs(torch.randn(3, 3, 32, 32))
    assert outputs["imagenet"].shape == (3, 3)  # fox, gorilla, then the mass no class stands for
    assert torch.allclose(outputs["imagenet"][:, 0], torch.ones(3), atol=1e-5)
    assert float(outputs["imagenet"][:, 1:].max()) < 1e-5
    model.calibration = {"score_quantiles": {name: [0.0] * openset.QUANTILE_POINTS for name in openset.SCORES},
                         "stacking_quantiles": {"both": [0.5] * openset.QUANTILE_POINTS}}
    decisions = decide(model, outputs)
    assert [decisions.names[i] for i in decisions.predicted] == ["fox"] * 3
    assert [decisions.answer_source(n) for n in range(3)] == ["imagenet"] * 3
    with torch.no_grad():
        model.imagenet_bias.fill_(-30.0)
        model.imagenet_bias[231] = 10.0  # now a collie: a seen class claims the ImageNet mass
        outputs = model.outputs(torch.randn(3, 3, 32, 32))
    assert float(outputs["imagenet"].max()) < 1e-5
    assert all(decisions.names[i] in ("antelope", "collie") for i in decide(model, outputs).predicted)
    with pytest.raises(DataError, match="zero_shot_sources='attributes' is not one this model has: both, imagenet"):
        decide(model, outputs, sources="attributes")
    with pytest.raises(DataError, match="zero_shot_keep=1.0 must be between 0 and 1"):
        decide(model, outputs, zero_shot_keep=1.0)
    model.calibration = {"score_quantiles": model.calibration["score_quantiles"], "margin_quantiles": [0.0] * 201}
    with pytest.raises(CheckpointError, match="calibrated by an older version, on another scale: train it again, or "
                                              "pass seen_penalty=<number>"):
        decide(model, outputs)  # a checkpoint from before ImageNet knowledge, stacked on attribute scores
    assert decide(model, outputs, penalty=-100.0).predicted.max() < 2  # a huge bonus for seen classes: all seen


def test_imagenet_names_what_it_knows_and_attributes_share_out_the_rest():
    # 2 seen classes; unseen: "rhino" (attributes only), "panda" (attributes and ImageNet), "fox" (ImageNet only)
    compat = torch.log(torch.tensor([[0.1, 0.1, 0.6, 0.2],  # softmax: seen a, b, then rhino, panda
                                     [0.7, 0.1, 0.1, 0.1]]))
    imagenet = torch.tensor([[0.0, 0.25, 0.25, 0.5],  # rhino (no ImageNet class), panda, fox, unclaimed
                             [0.0, 0.0, 0.0, 0.1]])
    probability, source = openset.unseen_evidence(compat, imagenet, 2, 3, "both")
    # rhino: its attribute share of the unclaimed mass; panda: its ImageNet mass plus its share; fox: ImageNet
    assert torch.allclose(probability[0], torch.tensor([0.6 * 0.5, 0.25 + 0.2 * 0.5, 0.25]))
    assert source[0].tolist() == [1, 0, 0]  # attributes, imagenet (0.25 > 0.1), imagenet
    assert torch.allclose(probability[1], torch.tensor([0.01, 0.01, 0.0])) and source[1].tolist() == [1, 1, -1]
    alone, _ = openset.unseen_evidence(compat, imagenet, 2, 3, "imagenet")
    assert torch.allclose(alone[0], torch.tensor([0.0, 0.25, 0.25]))
    attributes, attribute_source = openset.unseen_evidence(compat, imagenet, 2, 3, "attributes")
    assert torch.allclose(attributes[0], torch.tensor([0.6, 0.2, 0.0])) and attribute_source[0].tolist() == [1, 1, -1]
    scores = openset.stacked_scores(torch.tensor([[0.5, 0.5]]), probability[:1])
    assert scores.shape == (1, 5) and float(scores[0, 4]) == pytest.approx(float(torch.tensor(0.25).log()))
    assert float(openset.stacked_scores(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 1))[0, 1]) == \
        pytest.approx(float(torch.tensor(1e-12).log()))  # no evidence: the floor, never -inf


def test_resuming_with_another_imagenet_knowledge_names_the_setting_to_use(imagenet_weights, tmp_path):
    from animal_lightning.checkpoints import check_resumable

    fox = {"unseen_classes": ["fox"], "imagenet_map": {"fox": [RED_FOX]}}
    trained = knowing_model(imagenet_weights, **fox)  # imagenet_knowledge=head
    payload = {"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}
    trained.on_save_checkpoint(payload)
    torch.save(payload, tmp_path / "head.ckpt")
    with pytest.raises(CheckpointError, match=r"does not fit this run's model \(.*\): resume with "
                                              r"model.imagenet_knowledge=head, or drop ckpt_path"):
        check_resumable(tmp_path / "head.ckpt", knowing_model(imagenet_weights, imagenet_knowledge="copy", **fox))


def test_unseen_classes_nothing_can_name_are_refused(imagenet_weights):
    with pytest.raises(ModelConfigError, match="unseen classes moose have no attributes and they match no ImageNet "
                                               "class: give them attribute rows"):
        knowing_model(imagenet_weights, unseen_classes=["moose"], imagenet_map={"fox": [RED_FOX]})
    with pytest.raises(ModelConfigError, match="unseen classes fox have no attributes and the model keeps no "
                                               "ImageNet head .*model.pretrained=true"):
        AnimalClassifier(["a", "b"], backbone="resnet18", pretrained=False, image_size=32, unseen_classes=["fox"],
                         imagenet_map={"fox": [RED_FOX]})
    with pytest.raises(ModelConfigError, match="model.zero_shot_sources='ears' is not one of: both, imagenet, "
                                               "attributes"):
        knowing_model(imagenet_weights, zero_shot_sources="ears")
    with pytest.raises(ModelConfigError, match="model.zero_shot_sources=attributes but this model can only use: "
                                               "both, imagenet"):
        knowing_model(imagenet_weights, unseen_classes=["fox"], imagenet_map={"fox": [RED_FOX]},
                      zero_shot_sources="attributes")
    with pytest.raises(ModelConfigError, match="data.unseen_classes lists \\['collie'\\], which have training images"):
        knowing_model(imagenet_weights, unseen_classes=["collie"], imagenet_map={"collie": [231]})
    with pytest.raises(ModelConfigError, match="model.imagenet_map\\['fox'\\] has an index outside 0-999"):
        knowing_model(imagenet_weights, unseen_classes=["fox"], imagenet_map={"fox": [1000]})


# -- end to end: a held-out class that the "ImageNet" head knows ---------------------------------------------
@pytest.fixture(scope="module")
def knowing_run(tmp_path_factory) -> dict:
    """The stand-in for ImageNet pretraining: a ResNet-18 trained on 4 demo classes, its head written as rows of
    a 1000-class head (the fourth class as ImageNet's red fox, 277). Then the fourth class's training photos are
    removed, and the model is trained on the other 3 from those weights, the backbone frozen (so the features
    the old head reads are those it was trained on), and asked to name the fourth from data.unseen_classes and a
    class map. What is tested is the chain from that knowledge to the answers."""
    from animal_lightning.training import train

    work = tmp_path_factory.mktemp("knowing")
    spec = SyntheticSpec(num_classes=4, train_per_class=30, test_per_class=8, image_size=32, seed=3)
    source = ensure_synthetic_dataset(work / "synthetic", spec)
    pretrained = train(compose_config("train", work / "pretraining", f"data.root={source}", *FAST,
                                      "data.test_labels=test_labels.csv", "trainer.max_epochs=10",
                                      "data.batch_size=16", "test=false"))
    checkpoint = torch.load(pretrained["best_checkpoint"], map_location="cpu", weights_only=True)
    state = {key.removeprefix("net."): value for key, value in checkpoint["state_dict"].items()
             if key.startswith("net.")}
    classes = checkpoint["hyper_parameters"]["class_names"]
    held_out = classes[-1]
    weight, bias = state["fc.weight"], state["fc.bias"]
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, weight.shape[1]), torch.full((1000,), -30.0)
    for row, index in enumerate([0, 1, 2, RED_FOX]):
        state["fc.weight"][index], state["fc.bias"][index] = weight[row], bias[row]
    knowing = work / "resnet18-knows.pth"
    torch.save(state, knowing)
    root = work / "dataset"
    shutil.copytree(source, root)
    shutil.rmtree(root / "train" / held_out)  # its test photos stay: labelled, without training photos
    (root / "class_map.txt").write_text(f"{held_out}: red fox\n")
    cfg = compose_config("train", work, f"data.root={root}", "data.test_labels=test_labels.csv", *FAST,
                         f"model.weights_path={knowing}", "model.freeze_backbone_epochs=99", "model.head_init=probe",
                         "trainer.max_epochs=2", f"data.unseen_classes=[{held_out}]", "data.class_map=class_map.txt",
                         "data.batch_size=16")
    metrics = train(cfg)
    return {"metrics": metrics, "root": root, "held_out": held_out, "work": work, "knowing": knowing,
            "pretrained_acc": pretrained["val/acc"], "run": Path(metrics["best_checkpoint"]).parent.parent}


def test_training_and_test_name_the_held_out_class_from_the_imagenet_head(knowing_run):
    metrics = knowing_run["metrics"]
    assert metrics["test/acc_unseen"] >= 0.75  # named from the ImageNet head
    # the seen classes keep the classifier's answers: calibrated stacking costs them little (a random-init
    # backbone at 64 px makes a weak classifier, which is not what is tested here)
    assert metrics["test/acc_seen"] >= metrics["test/acc_macro"] - 0.15
    summary = json.loads((knowing_run["run"] / "metrics.json").read_text())["zero_shot"]
    assert summary["sources"] == "both"
    assert summary["imagenet_map"][knowing_run["held_out"]].endswith("[map: class_map.txt line 1]")
    (row,) = summary["test_per_class"]
    assert row["class"] == knowing_run["held_out"] and row["by_imagenet"] == row["named"] >= 6
    assert row["by_attributes"] == 0 and row["images"] == 8


def test_the_checkpoint_keeps_the_imagenet_head_as_plain_data(knowing_run):
    path = knowing_run["metrics"]["best_checkpoint"]
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # no pickled objects needed
    hparams = checkpoint["hyper_parameters"]
    assert hparams["imagenet_knowledge"] == "copy" and hparams["unseen_classes"] == [knowing_run["held_out"]]
    assert hparams["imagenet_map"][knowing_run["held_out"]] == [RED_FOX]
    assert type(hparams["imagenet_map"]) is dict
    model, _ = AnimalClassifier.from_checkpoint(path)
    state = torch.load(knowing_run["knowing"], weights_only=True)
    assert torch.equal(model.imagenet_net.fc.weight, state["fc.weight"])  # the default: a frozen copy, untouched
    assert torch.equal(model.imagenet_net.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert model.unseen_class_names == [knowing_run["held_out"]]


def test_predict_names_the_held_out_class_and_says_which_source(knowing_run, tmp_path, capsys):
    cfg = compose_config("predict", tmp_path, f"ckpt_path={knowing_run['metrics']['best_checkpoint']}",
                         "progress=false", "num_workers=0")
    summary = predict(cfg)
    with (tmp_path / "run" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    held_out = knowing_run["held_out"]
    named = [r for r in rows if r["class"] == held_out]
    assert named and {r["source"] for r in named} == {"imagenet"}
    assert {r["source"] for r in rows if r["class"] != held_out} == {"classifier"}
    assert summary["zero_shot"]["acc_unseen"] == pytest.approx(knowing_run["metrics"]["test/acc_unseen"], abs=1e-6)
    out = capsys.readouterr().out
    assert "sources: both" in out and "by imagenet" in out and held_out in out
    alone = predict(compose_config("predict", tmp_path, f"ckpt_path={knowing_run['metrics']['best_checkpoint']}",
                                   "progress=false", "num_workers=0", "zero_shot_sources=imagenet"))
    assert alone["zero_shot"]["sources"] == "imagenet" and alone["zero_shot"]["acc_unseen"] >= 0.75
    with pytest.raises(DataError, match="zero_shot_sources='attributes' is not one this model has"):
        predict(compose_config("predict", tmp_path, f"ckpt_path={knowing_run['metrics']['best_checkpoint']}",
                               "progress=false", "num_workers=0", "zero_shot_sources=attributes"))
