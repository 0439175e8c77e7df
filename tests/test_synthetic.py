"""The synthetic demo set: the rest of the project trusts its layout, determinism, caching and labels."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from animal_lightning.data import synthetic
from animal_lightning.data.synthetic import (
    COLOURS,
    MARKER,
    PATTERNS,
    SHAPES,
    SyntheticSpec,
    ensure_synthetic_dataset,
    generate,
)

# Tiny but complete: several classes, an unseen class, and images big enough to check the boxes on.
TINY = SyntheticSpec(
    num_classes=3, train_per_class=4, test_per_class=3, image_size=64, unseen_classes=1, seed=7
)
# The smallest valid spec, for tests that only care about folders.
MINIMAL = SyntheticSpec(num_classes=2, train_per_class=2, test_per_class=1, image_size=16)
PATTERN_WORDS = {"plain": "solid", "striped": "stripes", "spotted": "spots", "patched": "patches"}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), TINY)


def _read_ids(path: Path) -> list[str]:
    """Read an AwA2 "<id><TAB><name>" file, checking the ids are 1-based and consecutive."""
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    assert [int(i) for i, _ in rows] == list(range(1, len(rows) + 1))
    return [name for _, name in rows]


def _labels(root: Path) -> list[dict[str, str]]:
    with open(root / "test_labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["image_id", "class", "x0", "y0", "x1", "y1"]
        return list(reader)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(tiny_root: Path) -> None:
    classes = _read_ids(tiny_root / "attributes" / "classes.txt")
    seen = classes[: TINY.num_classes]
    assert len(classes) == len(set(classes)) == TINY.num_classes + TINY.unseen_classes
    # The project orders classes by sorted folder name, so classes.txt must list seen classes that way.
    assert sorted(p.name for p in (tiny_root / "train").iterdir()) == seen == sorted(seen)
    for name in seen:
        names = sorted(p.name for p in (tiny_root / "train" / name).iterdir())
        assert names == [f"{name}_{i:04d}.jpg" for i in range(TINY.train_per_class)]
    n_test = len(classes) * TINY.test_per_class
    assert sorted(p.name for p in (tiny_root / "test").iterdir()) == [f"{i:04d}.jpg" for i in range(n_test)]
    labels = _labels(tiny_root)
    assert sorted(r["image_id"] for r in labels) == [f"{i:04d}.jpg" for i in range(n_test)]
    assert Counter(r["class"] for r in labels) == {name: TINY.test_per_class for name in classes}
    assert (tiny_root / MARKER).is_file() and TINY.key() in (tiny_root / "README.txt").read_text()


def test_every_image_is_a_jpeg_of_the_right_size(tiny_root: Path) -> None:
    images = sorted(tiny_root.rglob("*.jpg"))
    assert len(images) == TINY.num_classes * TINY.train_per_class + 4 * TINY.test_per_class
    for path in images:
        with Image.open(path) as image:
            image.load()  # decodes fully, so a truncated file fails here
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))


def test_test_order_mixes_classes(tiny_root: Path) -> None:
    # A test folder grouped by class would let the file order leak the label.
    order = [r["class"] for r in sorted(_labels(tiny_root), key=lambda r: r["image_id"])]
    changes = sum(a != b for a, b in itertools.pairwise(order))
    assert changes > TINY.num_classes + TINY.unseen_classes


def test_generation_is_deterministic(tiny_root: Path, tmp_path: Path) -> None:
    generate(tmp_path / "again", TINY)
    first = {k: v for k, v in _files(tiny_root).items() if k != MARKER}
    assert first == _files(tmp_path / "again")


def test_other_seed_gives_other_images(tiny_root: Path, tmp_path: Path) -> None:
    other = dataclasses.replace(TINY, seed=TINY.seed + 1)
    generate(tmp_path / "other", other)
    first, second = _files(tiny_root), _files(tmp_path / "other")
    assert first["test/0000.jpg"] != second["test/0000.jpg"]


def test_key_is_readable_and_changes_with_every_field() -> None:
    assert TINY.key().startswith("c3-n4-t3-s64-u1-seed7-") and len(TINY.key().rsplit("-", 1)[1]) == 8
    assert TINY.key() == dataclasses.replace(TINY).key()
    fields = dataclasses.asdict(TINY)
    changed = {name: dataclasses.replace(TINY, **{name: value + 1}) for name, value in fields.items()}
    keys = {spec.key() for spec in changed.values()} | {TINY.key()}
    assert len(keys) == len(changed) + 1


def test_attribute_files_parse(tiny_root: Path) -> None:
    folder = tiny_root / "attributes"
    classes = _read_ids(folder / "classes.txt")
    predicates = _read_ids(folder / "predicates.txt")
    assert len(predicates) == len(SHAPES) + len(PATTERNS) + len(COLOURS) == len(set(predicates))
    binary = np.loadtxt(folder / "predicate-matrix-binary.txt", dtype=int, ndmin=2)
    continuous = np.loadtxt(folder / "predicate-matrix-continuous.txt", ndmin=2)
    assert binary.shape == continuous.shape == (len(classes), len(predicates))
    assert np.array_equal(binary, (continuous > 0).astype(int))
    assert continuous.min() >= 0 and continuous.max() <= 100
    assert len({tuple(row) for row in binary}) == len(classes)
    for name, row in zip(classes, binary, strict=True):
        # One value per attribute group, and the same ones the class name describes.
        colour, pattern, shape = name.split("_")
        expected = {f"colour_{colour}", f"pattern_{PATTERN_WORDS[pattern]}", f"shape_{shape}"}
        assert {predicates[i] for i in np.flatnonzero(row)} == expected


def test_unseen_classes_are_only_in_test(tiny_root: Path) -> None:
    classes = _read_ids(tiny_root / "attributes" / "classes.txt")
    unseen = (tiny_root / "attributes" / "unseen.txt").read_text().split()
    assert unseen == classes[TINY.num_classes :] and len(unseen) == TINY.unseen_classes
    assert not any((tiny_root / "train" / name).exists() for name in unseen)
    assert set(unseen) <= {r["class"] for r in _labels(tiny_root)}


def test_default_classes_differ_in_at_least_two_attributes(tmp_path: Path) -> None:
    # One-attribute differences are what make a 64 px set slow to learn; one-hot rows then differ in >= 4.
    spec = SyntheticSpec(num_classes=10, train_per_class=2, test_per_class=1, image_size=16)
    binary = np.loadtxt(
        ensure_synthetic_dataset(tmp_path, spec) / "attributes" / "predicate-matrix-binary.txt"
    )
    for a, b in itertools.combinations(binary, 2):
        assert np.abs(a - b).sum() >= 4


def test_boxes_hold_the_animal(tiny_root: Path) -> None:
    size = TINY.image_size
    for row in _labels(tiny_root):
        x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        assert 0.2 <= (x1 - x0) / size <= 0.7, row  # the animal is neither a speck nor the whole picture
        pixels = np.asarray(Image.open(tiny_root / "test" / row["image_id"]), dtype=np.float32)
        # Backgrounds are kept far from the body colour, so pixels of that colour belong to the animal.
        body = np.array(COLOURS[row["class"].split("_")[0]][0], dtype=np.float32)
        ys, xs = np.nonzero(np.linalg.norm(pixels - body, axis=2) < 60)
        assert len(xs) >= 10, row  # the animal is visible ...
        inside = x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        assert inside, row  # ... and lies wholly inside its box ...
        # ... and the box is tight: the body (without legs and tail) spans a fair part of it.
        body_area = (xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min())
        assert body_area >= 0.15 * (x1 - x0) * (y1 - y0), row


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"train_per_class": 1}, "train_per_class"),
        ({"test_per_class": 0}, "test_per_class"),
        ({"image_size": 15}, "image_size"),
        ({"unseen_classes": -1}, "unseen_classes"),
        ({"seed": -1}, "seed"),
        ({"num_classes": 90, "unseen_classes": 7}, "num_classes \\+ unseen_classes = 97 exceeds the 96"),
    ],
)
def test_bad_spec_names_the_field(tmp_path: Path, change: dict[str, int], field: str) -> None:
    spec = dataclasses.replace(MINIMAL, **change)
    with pytest.raises(ValueError, match=field):
        ensure_synthetic_dataset(tmp_path, spec)
    with pytest.raises(ValueError, match=field):
        generate(tmp_path / "direct", spec)
    assert list(tmp_path.iterdir()) == []


def test_ensure_reuses_a_complete_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_synthetic_dataset(tmp_path, MINIMAL)
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*")}

    def must_not_run(root: Path, spec: SyntheticSpec) -> None:
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(synthetic, "generate", must_not_run)
    assert ensure_synthetic_dataset(str(tmp_path), MINIMAL) == first == tmp_path / MINIMAL.key()
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamps
    assert os.listdir(tmp_path) == [MINIMAL.key()]  # no temporary folder left behind


def test_ensure_never_uses_half_written_folders(tmp_path: Path) -> None:
    leftover_tmp = tmp_path / f".{MINIMAL.key()}.tmp-999999"  # from a run that was killed
    (leftover_tmp / "train").mkdir(parents=True)
    no_marker = tmp_path / MINIMAL.key()  # e.g. an interrupted copy: has data but no marker
    (no_marker / "train").mkdir(parents=True)
    (no_marker / "junk.txt").write_text("half written")

    root = ensure_synthetic_dataset(tmp_path, MINIMAL)
    assert root == no_marker and (root / MARKER).is_file() and not (root / "junk.txt").exists()
    assert len(list((root / "train").iterdir())) == MINIMAL.num_classes
    assert sorted(os.listdir(tmp_path)) == sorted([MINIMAL.key(), leftover_tmp.name])


def test_ensure_cleans_up_after_a_failed_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(root: Path, spec: SyntheticSpec) -> None:
        (root / "train").mkdir(parents=True)
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "generate", crash)
    with pytest.raises(OSError, match="disk full"):
        ensure_synthetic_dataset(tmp_path, MINIMAL)
    assert list(tmp_path.iterdir()) == []


def test_ensure_keeps_the_winner_of_a_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_generate = synthetic.generate

    def rival_finishes_first(root: Path, spec: SyntheticSpec) -> None:
        real_generate(root, spec)
        winner = tmp_path / spec.key()
        real_generate(winner, spec)
        (winner / MARKER).write_text("rival\n")

    monkeypatch.setattr(synthetic, "generate", rival_finishes_first)
    root = ensure_synthetic_dataset(tmp_path, MINIMAL)
    assert (root / MARKER).read_text() == "rival\n"
    assert os.listdir(tmp_path) == [MINIMAL.key()]
