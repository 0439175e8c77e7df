"""Open-set flags and zero-shot naming from attributes: parsing, calibration, metrics, end to end."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
import torch

from animal_lightning.data import AnimalDataModule
from animal_lightning.data.attributes import load_attributes
from animal_lightning.data.synthetic import SyntheticSpec, ensure_synthetic_dataset
from animal_lightning.errors import DataError
from animal_lightning.models import AnimalClassifier, openset
from animal_lightning.prediction import predict
from tests.conftest import FAST, compose_config, make_folder, read_rows


def write_awa2(folder: Path, classes: list[str], predicates: list[str], rows: list[list[float]]) -> Path:
    """Files laid out exactly like AwA2's: right-aligned ids, a tab, then the name; space-padded numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("".join(f"{i:>6}\t{c}\n" for i, c in enumerate(classes, 1)))
    (folder / "predicates.txt").write_text("".join(f"{i:>6}\t{p}\n" for i, p in enumerate(predicates, 1)))
    (folder / "predicate-matrix-continuous.txt").write_text(
        "".join(" ".join(f"{v:6.2f}" for v in row) + "\n" for row in rows))
    return folder


AWA = {"classes": ["antelope", "grizzly+bear", "killer+whale", "horse"],
       "predicates": ["black", "white", "stripes", "hooves"],
       "rows": [[0.0, 12.34, 0.0, 85.5], [39.25, 1.39, 0.0, 0.0], [83.4, 64.1, 0.0, 0.0], [20.0, 10.0, 0.0, 90.1]]}


# -- attribute files ---------------------------------------------------------------------------------
def test_awa2_format_is_parsed(tmp_path):
    table = load_attributes(write_awa2(tmp_path / "attrs", AWA["classes"], AWA["predicates"], AWA["rows"]))
    assert table.classes == tuple(AWA["classes"]) and table.predicates == tuple(AWA["predicates"])
    assert table.matrix[0] == (0.0, 12.34, 0.0, 85.5) and len(table.matrix) == 4
    assert table.unseen(["antelope", "grizzly+bear", "killer+whale"]) == ["horse"]
    saved = table.to_dict(["grizzly+bear", "antelope"])  # training order first, then the unseen in table order
    assert saved["seen"] == ["grizzly+bear", "antelope"] and saved["unseen"] == ["killer+whale", "horse"]
    assert saved["matrix"][0] == [39.25, 1.39, 0.0, 0.0] and saved["matrix"][3] == [20.0, 10.0, 0.0, 90.1]


def test_the_generators_attribute_files_are_parsed(tmp_path):
    root = ensure_synthetic_dataset(tmp_path, SyntheticSpec(num_classes=4, train_per_class=2, test_per_class=1,
                                                            image_size=32, unseen_classes=2))
    table = load_attributes(root / "attributes")
    seen = sorted(p.name for p in (root / "train").iterdir())
    unseen = (root / "attributes" / "unseen.txt").read_text().split()
    assert sorted(table.unseen(seen)) == sorted(unseen) and len(unseen) == 2
    assert all(sum(row) == pytest.approx(300.0) for row in table.matrix)  # one shape, pattern, colour: 100 each


def test_custom_file_names(tmp_path):
    folder = write_awa2(tmp_path / "attrs", AWA["classes"], AWA["predicates"], AWA["rows"])
    (folder / "predicate-matrix-continuous.txt").rename(folder / "matrix.txt")
    with pytest.raises(DataError, match="attribute matrix file .*predicate-matrix-continuous.txt not found"):
        load_attributes(folder)
    assert len(load_attributes(folder, {"matrix": "matrix.txt"}).matrix) == 4


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "predicates.txt").unlink(), "attribute predicates file .*predicates.txt not found: set"),
    (lambda f: (f / "classes.txt").write_text(""), "classes.txt is empty"),
    (lambda f: (f / "classes.txt").write_text("1 antelope\n2 antelope\n3 a\n4 b\n"), "lists 'antelope' twice"),
    (lambda f: (f / "classes.txt").write_text("1 grizzly bear\n"), r"classes.txt line 1 is .*expected '<id> <name>'"),
    (lambda f: (f / "predicate-matrix-continuous.txt").write_text("1 2 3 4\n" * 3),
     "has 3 rows but .*attrs/classes.txt lists 4 classes"),
    (lambda f: (f / "predicate-matrix-continuous.txt").write_text("1 2 3\n" * 4),
     "line 1 has 3 values but .*attrs/predicates.txt lists 4 attributes"),
    (lambda f: (f / "predicate-matrix-continuous.txt").write_text("1 2 x 4\n" * 4), "not a number"),
    (lambda f: (f / "predicate-matrix-continuous.txt").write_text("1 2 nan 4\n" * 4), "NaN or infinite"),
    (lambda f: (f / "predicate-matrix-continuous.txt").write_text("0 0 0 0\n" + "1 2 3 4\n" * 3), "all zeros"),
    (lambda f: (f / "classes.txt").write_bytes(b"\xff\xfe\x00bad"), "should be UTF-8 text"),
])
def test_each_bad_attribute_file_gets_its_message(tmp_path, damage, message):
    folder = write_awa2(tmp_path / "attrs", AWA["classes"], AWA["predicates"], AWA["rows"])
    damage(folder)
    with pytest.raises(DataError, match=message) as caught:
        load_attributes(folder)
    assert "\n" not in str(caught.value)


def test_missing_folder_unknown_key_and_uncovered_training_class(tmp_path):
    with pytest.raises(DataError, match="attribute folder .*nowhere does not exist"):
        load_attributes(tmp_path / "nowhere")
    folder = write_awa2(tmp_path / "attrs", AWA["classes"], AWA["predicates"], AWA["rows"])
    with pytest.raises(DataError, match="unknown key.*labels"):
        load_attributes(folder, {"labels": "x.txt"})
    root = make_folder(tmp_path / "ds", {"antelope": 3, "zebra": 3})
    dm = AnimalDataModule(root, num_workers=0, attributes=str(folder))
    with pytest.raises(DataError, match="has no row for training class.*zebra: add them"):
        dm.attribute_hparams()


def test_train_py_reports_a_bad_attribute_folder_before_training(compose_cfg, copy_synthetic):
    from animal_lightning.training import train

    cfg = compose_cfg(f"data.root={copy_synthetic()}", "data.attributes=no_such_folder", *FAST)
    with pytest.raises(DataError, match="no_such_folder does not exist"):
        train(cfg)


# -- scores, calibration and metrics ------------------------------------------------------------------
def test_known_scores_agree_with_their_definitions():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.4, 0.3]])
    scores = openset.known_scores(logits)
    assert torch.allclose(scores[:, 0], torch.softmax(logits, 1).max(1).values)
    assert torch.allclose(scores[:, 1], torch.tensor([2.0, 0.5]))
    assert torch.allclose(scores[:, 2], torch.log(torch.exp(logits).sum(1)))


@pytest.mark.parametrize("keep", [0.8, 0.95, 0.99])
def test_the_calibrated_threshold_keeps_the_target_fraction(keep):
    generator = torch.Generator().manual_seed(0)
    validation = torch.randn(4000, 3, generator=generator)
    calibration = openset.calibrate(validation, {"both": validation[:, 0] * 2})
    for i, method in enumerate(openset.SCORES):
        kept = (validation[:, i] >= openset.known_threshold(calibration, method, keep)).float().mean()
        assert float(kept) == pytest.approx(keep, abs=0.005)
    stays_seen = (validation[:, 0] * 2 >= openset.seen_penalty(calibration, keep)).float().mean()
    assert float(stays_seen) == pytest.approx(keep, abs=0.005)


def test_auroc_equals_a_pairwise_count():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (60,), generator=generator).float()  # many ties
    positive = torch.rand(60, generator=generator) > 0.4
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in
             itertools.product(scores[positive].tolist(), scores[~positive].tolist())]
    assert openset.auroc(scores, positive) == pytest.approx(sum(pairs) / len(pairs))
    assert openset.auroc(scores, torch.ones(60, dtype=torch.bool)) is None


def test_gzsl_prediction_and_harmonic_mean():
    compat = torch.tensor([[5.0, 1.0, 4.0, 0.0], [3.0, 0.0, 3.5, 0.0], [0.0, 2.0, 0.0, 6.0]])
    seen_choice = torch.tensor([1, 0, 1])  # the classifier head's answer among the 2 seen classes
    assert openset.gzsl_predict(seen_choice, compat, 2, penalty=0.0).tolist() == [1, 2, 3]
    assert openset.gzsl_predict(seen_choice, compat, 2, penalty=-1.0).tolist() == [1, 0, 3]  # a bonus for seen
    assert openset.gzsl_predict(seen_choice, compat, 2, penalty=2.0).tolist() == [2, 2, 3]
    predicted, targets = torch.tensor([0, 0, 1, 2, 3, 3]), torch.tensor([0, 0, 1, 2, 2, 3])
    assert openset.mean_class_accuracy(predicted, targets, [0, 1]) == 1.0
    assert openset.mean_class_accuracy(predicted, targets, [2, 3]) == pytest.approx(0.75)
    assert openset.harmonic_mean(1.0, 0.75) == pytest.approx(2 * 0.75 / 1.75)
    assert openset.harmonic_mean(0.0, 0.0) == 0.0 and openset.harmonic_mean(0.5, None) is None
    # conventional zero-shot: unseen-class images named among the unseen classes only
    choice = openset.best_unseen(compat, 2)
    assert choice.tolist() == [2, 2, 3]
    report = openset.zero_shot_report(torch.tensor([1, 0, 3]), torch.tensor([1, 3, 3]), 2, 4, choice)
    assert report["acc_zsl"] == 0.5 and report["acc_unseen"] == 0.5 and report["acc_seen"] == 1.0


# -- end to end on the demo data with held-out classes ----------------------------------------------
@pytest.mark.slow  # the zeroshot fixture trains the demo for real (about a minute)
def test_short_training_names_unseen_classes_above_chance(zeroshot):
    test = zeroshot["metrics"]  # train() returns val/* and test/* metrics in one dict
    # The bars sit below what 8 runs of this fixture measured: training seeds 42, 1, 2, 3, 4 (bf16 on an
    # AMD CPU), seeds 42 and 1 in fp32, and demo data seed 1 (other held-out classes); and an Intel AMX
    # machine's acc_unseen of 0.2375 (issue 16). Measured ranges in the comments.
    # With Pillow 12 (issue 21, docs/benchmarks.md) seeds 1, 2, 3 measured acc_unseen 0.24, 0.31, 0.20 and seed 42
    # 0.05: the fixture trains seed 1.
    # Naming among the 4 unseen classes alone (chance 0.25): 0.69 to 0.91.
    assert test["test/acc_zsl"] > 0.5
    # Generalized: the seen-or-unseen decision (calibrated stacking) comes first, then the name, among all
    # 14 classes (chance 1/14 = 0.07): 0.15 to 0.375, the widest spread of all, so only above chance here.
    assert test["test/acc_unseen"] > 0.1
    assert test["test/acc_seen"] > 0.6  # 0.895 to 0.95
    assert test["test/auroc_unknown"] > 0.55  # 0.71 to 0.89 with this fixture's data, 0.57 with data seed 1
    assert test["val/acc_attributes"] > 0.5  # 0.98 to 0.99


@pytest.mark.slow  # the zeroshot fixture trains the demo for real (about a minute)
def test_the_checkpoint_carries_attributes_and_calibration(zeroshot):
    model, meta = AnimalClassifier.from_checkpoint(zeroshot["ckpt"])
    unseen = (zeroshot["root"] / "attributes" / "unseen.txt").read_text().split()
    assert sorted(model.unseen_class_names) == sorted(unseen) and len(model.class_names) == 10
    attributes = model.hparams.attributes
    assert len(attributes["matrix"]) == 14 and len(attributes["predicates"]) == 14
    calibration = meta["calibration"]
    assert set(calibration["score_quantiles"]) == set(openset.SCORES)
    assert set(calibration["stacking_quantiles"]) == {"both", "attributes"}  # no ImageNet head: ResNet-18 from scratch
    assert calibration["images"] == 10 * 15  # the 15% validation split of 100 images per class


@pytest.mark.slow  # the zeroshot fixture trains the demo for real (about a minute)
def test_prediction_flags_unknowns_and_names_unseen_classes(zeroshot, tmp_path, capsys):
    cfg = compose_config("predict", tmp_path, f"ckpt_path={zeroshot['ckpt']}", "progress=false", "num_workers=0")
    summary = predict(cfg)  # no input: the training root's test folder, scored by its labels CSV
    with (tmp_path / "run" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:5] == ["image_id", "class", "confidence", "known_score", "open_set"]
    labels = {r["image_id"]: r["class"] for r in csv.DictReader((zeroshot["root"] / "test_labels.csv").open())}
    model, _ = AnimalClassifier.from_checkpoint(zeroshot["ckpt"])
    unseen = set(model.unseen_class_names)
    named = [r for r in rows if r["class"] in unseen]
    right = [r for r in named if labels[r["image_id"]] == r["class"]]
    assert len(right) >= 8  # of 80 unseen-class images: 12 to 30 measured (acc_unseen 0.15 to 0.375), chance 5.7
    assert {r["open_set"] for r in rows} == {"known", "unknown"}
    novel = [r for r in rows if labels[r["image_id"]] in unseen]
    flagged_novel = sum(r["open_set"] == "unknown" for r in novel) / len(novel)
    flagged_seen = sum(r["open_set"] == "unknown" for r in rows if r not in novel) / (len(rows) - len(novel))
    assert flagged_novel > flagged_seen
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    zs = metrics["zero_shot"]
    assert zs["acc_unseen"] == pytest.approx(summary["zero_shot"]["acc_unseen"]) and zs["H"] > 0
    # the same model and calibration, computed by the test phase and by predict.py, agree
    assert zs["acc_unseen"] == pytest.approx(zeroshot["metrics"]["test/acc_unseen"], abs=1e-6)
    out = capsys.readouterr().out
    assert "Zero-shot (per-class): seen" in out and "Open set (msp): AUROC" in out


@pytest.mark.slow  # the zeroshot fixture trains the demo for real (about a minute)
def test_prediction_options_change_the_decisions(zeroshot, tmp_path):
    def unseen_named(*overrides: str) -> int:
        predict(compose_config("predict", tmp_path, f"ckpt_path={zeroshot['ckpt']}", "progress=false",
                               "num_workers=0", *overrides))
        with (tmp_path / "run" / "predictions.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        model, _ = AnimalClassifier.from_checkpoint(zeroshot["ckpt"])
        return sum(r["class"] in model.unseen_class_names for r in rows), sum(r["open_set"] == "unknown"
                                                                              for r in rows), len(rows)

    default_named, default_flagged, images = unseen_named()
    assert images == 14 * 20
    assert unseen_named("seen_penalty=-1000")[0] == 0  # a huge bonus for seen classes: nothing unseen named
    assert unseen_named("seen_penalty=1000")[0] == images  # a huge penalty: everything unseen
    assert unseen_named("open_set_keep=0.5")[1] > default_flagged
    with pytest.raises(DataError, match="open_set_score='softmax' is not one of"):
        unseen_named("open_set_score=softmax")
    assert 0 < default_named < images


def test_novel_and_blank_labels_in_a_labels_csv(tmp_path):
    from animal_lightning.data.folders import index_dataset
    from tests.conftest import write_image

    root = make_folder(tmp_path / "ds", {"antelope": 3, "horse": 3})
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        write_image(root / "test" / name)
    (root / "labels.csv").write_text("image_id,class\na.jpg,antelope\nb.jpg,zebra\nc.jpg,\n")  # d.jpg: no row
    index = index_dataset(root, test_labels="labels.csv")
    assert [Path(p).name for p, _ in index.test] == ["a.jpg"]
    assert [(Path(p).name, c) for p, c in index.novel_test] == [("b.jpg", "zebra")]  # blank c.jpg: unlabelled
    dm = AnimalDataModule(root, num_workers=0, test_labels="labels.csv")
    dm.use_preprocess(AnimalClassifier(dm.class_names, backbone="resnet18", pretrained=False, image_size=32).preprocess)
    dm.setup("test")
    assert sorted(label for _, label in dm.test_set.samples) == [0, 2]  # zebra: first novel class, after 2 seen


def test_bad_open_set_settings_are_one_line_errors(compose_cfg, copy_synthetic):
    from animal_lightning.errors import ModelConfigError
    from animal_lightning.training import train

    root = copy_synthetic()
    for override, message in (("model.open_set_score=softmax", "model.open_set_score='softmax' is not one of"),
                              ("model.open_set_keep=1.5", "model.open_set_keep=1.5 must be between 0 and 1")):
        with pytest.raises(ModelConfigError, match=message):
            train(compose_cfg(f"data.root={root}", override, *FAST))


def small_attribute_model(**kwargs) -> AnimalClassifier:
    table = {"predicates": ["p", "q", "r"], "seen": ["a", "b"], "unseen": ["c"],
             "matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "source": "attrs/classes.txt"}
    return AnimalClassifier(["a", "b"], backbone="resnet18", pretrained=False, image_size=32,
                            attributes={**table, **kwargs})


def test_compatibility_is_fp32_under_bf16_and_features_are_not_kept():
    model = small_attribute_model().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output, features = model.run(torch.randn(2, 3, 32, 32))
        compat = model.compatibility(model.attribute_logits(features))
    assert output.dtype == torch.bfloat16 and compat.dtype == torch.float32 and compat.shape == (2, 3)
    assert features.shape == (2, model.class_head.in_features)
    # the features come back from run(); no hook stays on the network to keep them (or their graph) around
    assert not any(module._forward_hooks for module in model.modules())
    assert model.compatibility(model.attribute_logits(None)) is None


def test_an_attribute_table_that_does_not_fit_the_model_is_a_one_line_error():
    from animal_lightning.errors import ModelConfigError

    with pytest.raises(ModelConfigError, match=r"attrs/classes.txt: its seen classes \['x', 'y'\]"):
        small_attribute_model(seen=["x", "y"])
    with pytest.raises(ModelConfigError, match="attrs/classes.txt: attribute matrix is 3 x 2, expected 3 classes x 3"):
        small_attribute_model(matrix=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


@pytest.mark.slow  # the zeroshot fixture trains the demo for real (about a minute)
def test_decisions_need_a_calibration_and_a_sane_keep(zeroshot):
    from animal_lightning.errors import CheckpointError
    from animal_lightning.prediction import decide

    model, _ = AnimalClassifier.from_checkpoint(zeroshot["ckpt"])
    outputs = {"probabilities": torch.full((2, 10), 0.1), "scores": torch.zeros(2, 3), "compat": torch.zeros(2, 14)}
    with pytest.raises(DataError, match="open_set_keep=1.5 must be between 0 and 1"):
        decide(model, outputs, keep=1.5)
    assert decide(model, outputs, penalty=0.0).penalty == 0.0
    model.calibration = None  # a checkpoint saved before any validation
    with pytest.raises(CheckpointError, match="no zero-shot calibration.*seen_penalty=<number>"):
        decide(model, outputs)
    assert decide(model, outputs, penalty=1.0).unknown is None  # no threshold either: the flag stays empty


def _gather_on_rank(rank: int, store: str, out: str) -> None:
    from animal_lightning.models.metrics import PerImageScores

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        scores = PerImageScores()
        n = rank + 1  # uneven shares: rank 0 one image, rank 1 two
        scores.update(torch.full((n, 3), float(rank)), torch.full((n,), rank), torch.full((n,), 10 + rank),
                      torch.full((n, 4), float(rank)))
        plain = PerImageScores()  # a model without attributes: no compat, which the gather must not invent
        plain.update(torch.full((n, 3), float(rank)), torch.full((n,), rank), torch.full((n,), 10 + rank))
        empty = PerImageScores()  # a rank that saw no image answers {} like the rest, after joining the gather
        torch.save((scores.compute(), plain.compute(), empty.compute()), f"{out}.{rank}")  # every rank's images
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes with a gloo group
def test_ddp_ranks_calibrate_on_every_ranks_images(tmp_path):
    torch.multiprocessing.spawn(_gather_on_rank, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    expected = torch.tensor([[0.0] * 3, [1.0] * 3, [1.0] * 3])  # rank 0's one image, then rank 1's two
    for rank in (0, 1):
        gathered, plain, empty = torch.load(tmp_path / f"out.{rank}")
        assert torch.equal(gathered["scores"], expected) and gathered["targets"].tolist() == [10, 11, 11]
        assert gathered["predicted"].tolist() == [0, 1, 1] and gathered["compat"].shape == (3, 4)
        assert set(plain) == {"scores", "predicted", "targets"} and torch.equal(plain["scores"], expected)
        assert empty == {}


@pytest.mark.slow  # the zeroshot fixture trains the demo for real (about a minute)
def test_an_engine_names_unseen_classes_as_fp32_does(zeroshot, tmp_path):
    rows = {}
    for engine, precision in (("eager", "32-true"), ("compiled", "auto")):
        predict(compose_config("predict", tmp_path / engine, f"ckpt_path={zeroshot['ckpt']}", "progress=false",
                               "num_workers=0", f"engine={engine}", f"precision={precision}",
                               f"engine_cache={tmp_path / 'cache'}"))
        rows[engine] = read_rows(tmp_path / engine / "run" / "predictions.csv")
    assert list(rows["compiled"][0]) == list(rows["eager"][0])  # the source column (classifier or unseen) too
    same = sum(a["class"] == b["class"] and a["source"] == b["source"]
               for a, b in zip(rows["compiled"], rows["eager"], strict=True))
    assert same >= 0.95 * len(rows["eager"])  # bf16 and the recalibrated penalty may move an image at the margin
    assert any(row["source"] != "classifier" for row in rows["compiled"])  # unseen classes are still named
