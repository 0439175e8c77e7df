"""Folder scanning, the stratified split, robust decoding and the DataModule, on small real files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from animal_lightning.data import AnimalDataModule
from animal_lightning.data.folders import index_dataset
from animal_lightning.data.images import find_bad_images, image_problem, list_images, load_rgb, to_rgb
from animal_lightning.data.transforms import PreprocessSpec
from animal_lightning.errors import DataError
from tests.conftest import make_folder, write_image

SPEC = PreprocessSpec(input_size=32, resize_size=36)


# -- the split ----------------------------------------------------------------------------------------
def test_split_is_stratified_and_deterministic(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 20, "dog": 40, "emu": 7})
    first = index_dataset(root, val_fraction=0.15, seed=3, check_images=False)
    second = index_dataset(root, val_fraction=0.15, seed=3, check_images=False)
    assert first.train == second.train and first.val == second.val
    assert first.class_names == ["cat", "dog", "emu"]
    val_counts = first.class_counts(first.val)
    assert val_counts == [3, 6, 1]  # round(0.15 * n), at least one per class
    assert first.class_counts(first.train) == [17, 34, 6]
    assert not {p for p, _ in first.train} & {p for p, _ in first.val}
    other = index_dataset(root, val_fraction=0.15, seed=4, check_images=False)
    assert other.val != first.val  # the seed really drives the split
    assert other.class_counts(other.val) == val_counts


def test_adding_a_class_leaves_the_other_classes_split_alone(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 20, "dog": 20})
    before = index_dataset(root, seed=5, check_images=False)
    make_folder(root, {"aardvark": 10})  # sorts first: shifts every other class's position
    after = index_dataset(root, seed=5, check_images=False)
    def names(samples):
        return sorted(Path(p).parent.name + "/" + Path(p).name for p, _ in samples)

    assert [n for n in names(after.val) if not n.startswith("aardvark")] == names(before.val)


def test_split_does_not_depend_on_listing_order(tmp_path):
    """Same files, created in another order: same split (no reliance on directory order)."""
    a = make_folder(tmp_path / "a", {"x": 12, "y": 12})
    b = tmp_path / "b"
    for name in ("y", "x"):
        for f in sorted((a / "train" / name).iterdir(), reverse=True):
            (b / "train" / name).mkdir(parents=True, exist_ok=True)
            (b / "train" / name / f.name).write_bytes(f.read_bytes())
    split_a = index_dataset(a, seed=1, check_images=False)
    split_b = index_dataset(b, seed=1, check_images=False)
    assert [Path(p).name for p, _ in split_a.val] == [Path(p).name for p, _ in split_b.val]


def test_val_and_labelled_test_folders_are_used(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 5, "dog": 5})
    make_folder(root, {"cat": 2, "dog": 3}, split="val")
    make_folder(root, {"dog": 4}, split="test")
    index = index_dataset(root, check_images=False)
    assert len(index.train) == 10 and len(index.val) == 5 and index.val_source == "val folder"
    assert len(index.test) == 4 and {label for _, label in index.test} == {1}


def test_flat_test_folder_is_scored_from_labels_csv(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 4, "dog": 4})
    write_image(root / "test" / "a.jpg")
    write_image(root / "test" / "b.jpg")
    write_image(root / "test" / "c.jpg")  # no label: left out
    (root / "labels.csv").write_text("image_id,class\na.jpg,dog\nb.jpg,horse\n")
    index = index_dataset(root, test_labels="labels.csv", check_images=False)
    assert [(Path(p).name, label) for p, label in index.test] == [("a.jpg", 1)]
    unlabelled = index_dataset(root, check_images=False)
    assert unlabelled.test == unlabelled.val and "validation" in unlabelled.test_source
    (root / "excel.csv").write_bytes("\ufeffimage_id,class\r\nb.jpg,cat\r\n".encode())  # BOM, CRLF
    assert [Path(p).name for p, _ in index_dataset(root, test_labels="excel.csv", check_images=False).test] == ["b.jpg"]
    (root / "wrong.csv").write_text("image_id,class\nother.jpg,dog\n")
    with pytest.raises(DataError, match=r"labels file .*wrong.csv labels none of the 3 images in .*test"):
        index_dataset(root, test_labels="wrong.csv", check_images=False)


def test_scan_ignores_hidden_and_non_images_and_accepts_any_case(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 2, "dog": 2})
    write_image(root / "train" / "cat" / "UPPER.JPG", fmt="JPEG")
    write_image(root / "train" / "cat" / "nested" / "deep.png")
    write_image(root / "train" / "cat" / "x.webp")
    write_image(root / "train" / "cat" / "y.BMP", fmt="BMP")
    write_image(root / "train" / "cat" / ".hidden.jpg")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / ".secret").mkdir()
    names = sorted(p.name for p in list_images(root / "train" / "cat"))
    assert names == ["000.jpg", "001.jpg", "UPPER.JPG", "deep.png", "x.webp", "y.BMP"]
    assert index_dataset(root, check_images=False).class_names == ["cat", "dog"]


# -- bad folders: one clear line each, before any model exists -------------------------------------
@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist: set data.root="),
    ("file", "is a file, not a folder"),
    ("no_train", "no train folder at"),
    ("no_classes", "has no class folders"),
    ("one_class", "only one class folder (cat)"),
    ("empty_class", "has no usable image"),
    ("unknown_val_class", "class folders not in train/: zebra"),
    ("single_image", "has only 1 image"),
    ("empty_val_class", "val/dog has no usable image"),
])
def test_bad_folders_get_one_line_errors(tmp_path, case, expected):
    root = tmp_path / "ds"
    if case == "file":
        root.write_text("x")
    elif case == "no_train":
        root.mkdir()
    elif case == "no_classes":
        (root / "train").mkdir(parents=True)
        write_image(root / "train" / "loose.jpg")
    elif case == "one_class":
        make_folder(root, {"cat": 3})
    elif case == "empty_class":
        make_folder(root, {"cat": 3})
        (root / "train" / "dog").mkdir()
        (root / "train" / "dog" / "readme.txt").write_text("no images here")
    elif case == "unknown_val_class":
        make_folder(root, {"cat": 3, "dog": 3})
        make_folder(root, {"zebra": 1}, split="val")
    elif case == "single_image":
        make_folder(root, {"cat": 3, "dog": 1})
    elif case == "empty_val_class":
        make_folder(root, {"cat": 3, "dog": 3})
        make_folder(root, {"cat": 1}, split="val")
        (root / "val" / "dog").mkdir()
    with pytest.raises(DataError) as info:
        index_dataset(root, check_images=False)
    message = str(info.value)
    assert expected in message and "\n" not in message
    if case not in ("one_class", "no_classes"):
        assert str(root) in message


def make_bad_files(folder: Path) -> dict[str, Path]:
    good = write_image(folder / "good.jpg", size=(64, 48))
    data = good.read_bytes()
    files = {
        "empty": folder / "empty.jpg",
        "text": folder / "text.jpg",
        "truncated": folder / "truncated.jpg",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not a photo")
    files["truncated"].write_bytes(data[: len(data) // 2])
    return files


def test_unreadable_images_are_found(tmp_path):
    bad = make_bad_files(tmp_path)
    assert image_problem(tmp_path / "good.jpg") is None
    assert image_problem(bad["empty"]) == "empty file (0 bytes)"
    assert "cannot identify image file" in image_problem(bad["text"])
    assert "truncated" in image_problem(bad["truncated"])
    assert set(find_bad_images(tmp_path.iterdir())) == {str(p) for p in bad.values()}


def test_bad_images_are_skipped_and_logged_once(tmp_path, caplog):
    root = make_folder(tmp_path / "ds", {"cat": 6, "dog": 6})
    bad = make_bad_files(root / "train" / "cat")
    (root / "train" / "cat" / "good.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        index = index_dataset(root)
    used = {p for p, _ in index.train + index.val}
    assert not used & {str(p) for p in bad.values()}
    assert len(used) == 12 and set(index.bad_images) == {str(p) for p in bad.values()}
    for path in bad.values():
        assert sum(str(path) in r.getMessage() for r in caplog.records) == 1


def test_bad_images_stop_the_run_when_asked(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 4, "dog": 4})
    make_bad_files(root / "train" / "dog")
    with pytest.raises(DataError, match=r"3 unusable image\(s\) under .*data.on_bad_image=skip"):
        index_dataset(root, on_bad_image="error")


def test_class_with_only_bad_images_is_reported(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 4})
    folder = root / "train" / "dog"
    folder.mkdir()
    make_bad_files(folder)
    (folder / "good.jpg").unlink()
    with pytest.raises(DataError, match=f"class folder {folder} has no usable image"):
        index_dataset(root)


# -- decoding any mode to RGB ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16))
        assert image.mode.startswith("I;16") or image.mode == "I"
    else:
        image = rgb.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (30, 20)
    if mode == "I;16":  # the 16-bit range is rescaled, not clipped to white
        values = np.asarray(loaded)[..., 0]
        assert values.min() == 0 and 200 < values.max() <= 255 and len(np.unique(values)) > 100


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    image.save(tmp_path / "r.jpg", exif=exif, quality=95)
    upright = load_rgb(tmp_path / "r.jpg")
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200  # the red half is now on top


# -- the DataModule ----------------------------------------------------------------------------------
def test_datamodule_batches_follow_the_spec(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 6, "dog": 6})
    dm = AnimalDataModule(root, batch_size=4, num_workers=0)
    assert dm.class_names == ["cat", "dog"]
    dm.use_preprocess(SPEC)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    images, _ = next(iter(dm.val_dataloader()))
    assert images.shape[1:] == (3, 32, 32)
    # normalised with the spec's mean/std: values leave [0, 1]
    assert images.min() < 0


def test_a_lone_last_training_image_is_not_a_batch(tmp_path):
    """BatchNorm cannot train on a batch of one image: the ragged remainder is dropped instead."""
    root = make_folder(tmp_path / "ds", {"cat": 10, "dog": 11})  # 8 + 9 = 17 train images after the split
    dm = AnimalDataModule(root, batch_size=16, num_workers=0, check_images=False)
    dm.use_preprocess(SPEC)
    dm.setup("fit")
    assert len(dm.train_set) == 17 and [len(y) for _, y in dm.train_dataloader()] == [16]
    small = AnimalDataModule(root, batch_size=32, num_workers=0, check_images=False)
    small.use_preprocess(SPEC)
    small.setup("fit")
    assert [len(y) for _, y in small.train_dataloader()] == [17]  # never drop the only batch


def test_the_probe_loader_reads_every_image_of_a_split_once_without_augmentation(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 10, "dog": 11})  # 17 train images: a ragged last batch is kept
    dm = AnimalDataModule(root, batch_size=4, num_workers=1, check_images=False)
    dm.use_preprocess(SPEC)
    dm.setup("fit")
    loader = dm.probe_dataloader("train")
    assert not loader.persistent_workers and dm.train_dataloader().persistent_workers  # read once, not kept
    first = torch.cat([labels for _, labels in loader])
    assert first.tolist() == [label for _, label in dm.train_set.samples]  # every image, in order
    images = torch.cat([images for images, _ in dm.probe_dataloader("train")])
    again = torch.cat([images for images, _ in dm.probe_dataloader("train")])
    assert len(images) == 17 and torch.equal(images, again)  # the evaluation transform: no random crops
    assert len(torch.cat([labels for _, labels in dm.probe_dataloader("val")])) == len(dm.val_set)


def test_setup_before_preprocess_is_a_clear_error(tmp_path):
    dm = AnimalDataModule(make_folder(tmp_path / "ds", {"a": 3, "b": 3}), num_workers=0)
    with pytest.raises(RuntimeError, match="use_preprocess"):
        dm.setup("fit")


def test_balanced_sampler_and_loss_weights(tmp_path):
    root = make_folder(tmp_path / "ds", {"big": 40, "small": 8})
    weights = AnimalDataModule(root, balance="loss_weights", num_workers=0, check_images=False).loss_weights()
    # inverse frequency, mean 1: the rare class weighs (34/7) times the common one
    assert weights[1] / weights[0] == pytest.approx(34 / 7) and sum(weights) == pytest.approx(2)
    assert AnimalDataModule(root, num_workers=0, check_images=False).loss_weights() is None
    dm = AnimalDataModule(root, balance="sampler", batch_size=41, num_workers=0, check_images=False)
    dm.use_preprocess(SPEC)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [torch.cat([y for _, y in loader]) for _ in range(5)]
    assert not all(torch.equal(epochs[0], e) for e in epochs[1:])  # each epoch draws anew
    drawn = torch.cat(epochs)
    share_small = (drawn == 1).float().mean().item()
    assert 0.35 < share_small < 0.65  # ~0.5 with the sampler; 7/41 = 0.17 without


@pytest.mark.parametrize("field, value, message", [
    ("balance", "oversample", "data.balance='oversample' is not one of"),
    ("resize_mode", "stretch", "data.resize_mode='stretch' is not one of"),
    ("on_bad_image", "ignore", "data.on_bad_image='ignore' is not one of"),
    ("val_fraction", 1.5, "data.val_fraction=1.5 must be between 0 and 1"),
])
def test_bad_data_settings(tmp_path, field, value, message):
    root = make_folder(tmp_path / "ds", {"a": 3, "b": 3})
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        _ = AnimalDataModule(root, num_workers=0, **{field: value}).class_names


def test_image_broken_after_the_check_is_replaced(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": 4, "dog": 4})
    dm = AnimalDataModule(root, batch_size=8, num_workers=0)
    dm.use_preprocess(SPEC)
    dm.setup("fit")
    victim = dm.train_set.samples[0][0]
    Path(victim).write_bytes(b"")  # deleted or damaged mid-training
    images, _ = dm.train_set[0]
    assert images.shape == (3, 32, 32)
