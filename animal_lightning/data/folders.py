"""Finding the classes and images of a dataset folder, and splitting them reproducibly.

Layout (the real task's): root/train/<class>/*, optional root/val/<class>/*, optional labelled
root/test/<class>/* or a flat, unlabelled root/test/* (left for prediction, or scored with a
labels CSV). Every problem is found here, before a model is built, and reported in one line.
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import os
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from animal_lightning.data.images import find_bad_images, is_image_name, list_images
from animal_lightning.errors import DataError

log = logging.getLogger(__name__)

Sample = tuple[str, int]  # (path, class index): the same shape as torchvision's ImageFolder.samples


@dataclass
class DatasetIndex:
    """The outcome of scanning a dataset root once: class names and the samples of each split."""

    root: Path
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    test_source: str  # where test samples came from: "test folders", "labels CSV" or "val split"
    val_source: str  # "val folder" or "split of train"
    bad_images: dict[str, str] = field(default_factory=dict)
    # Labelled test images of classes that have no training folder (path, class name): kept apart,
    # for open-set and zero-shot evaluation; only a flat test folder scored by a labels CSV has them.
    novel_test: list[tuple[str, str]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # files data.exclude left out, relative to the root
    exclude_unmatched: list[str] = field(default_factory=list)  # data.exclude lines that matched no file

    def class_counts(self, samples: Sequence[Sample]) -> list[int]:
        counts = [0] * len(self.class_names)
        for _, label in samples:
            counts[label] += 1
        return counts


def class_folders(split_dir: Path) -> list[Path]:
    """Visible sub-folders of `split_dir`, sorted by name: each one is a class."""
    return sorted((p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def scan_class_folders(split_dir: Path) -> dict[str, list[Path]]:
    """Map each class folder name under `split_dir` to its image files (searched recursively)."""
    return {folder.name: list_images(folder) for folder in class_folders(split_dir)}


def stratified_split(by_class: dict[str, list[Path]], val_fraction: float, seed: int
                     ) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Split each class on its own so that every class is in both parts in the same proportion.

    Files are sorted before a `random.Random` shuffle (whose sequence is fixed by the language for
    integer seeds) seeded by the seed and the class name, so the split is the same on every run and
    machine, and adding or removing a class leaves the other classes' splits alone.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.15)")
    train: dict[str, list[Path]] = {}
    val: dict[str, list[Path]] = {}
    for name, files in sorted(by_class.items()):
        files = sorted(files)
        if len(files) < 2:
            raise DataError(f"class folder {files[0].parent if files else name} has only {len(files)} image: "
                            "the validation split needs at least 2 per class; add images or provide root/val/")
        random.Random(seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))).shuffle(files)
        n_val = min(len(files) - 1, max(1, round(val_fraction * len(files))))
        val[name] = sorted(files[:n_val])
        train[name] = sorted(files[n_val:])
    return train, val


def read_labels_csv(path: Path) -> dict[str, str]:
    """image_id -> class from a CSV with at least the columns image_id,class (the submission format)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"image_id", "class"} <= set(reader.fieldnames):
                raise DataError(f"labels file {path} needs a header with image_id,class (found {reader.fieldnames})")
            # a blank class means "not labelled", like a missing row
            return {row["image_id"]: row["class"] for row in reader if (row["class"] or "").strip()}
    except OSError as error:
        raise DataError(f"cannot read labels file {path}: {error.strerror}; fix data.test_labels") from error


def _samples(by_class: dict[str, list[Path]], class_to_idx: dict[str, int]) -> list[Sample]:
    return [(str(path), class_to_idx[name]) for name in sorted(by_class) for path in by_class[name]]


def _leave_out_bad(by_class: dict[str, list[Path]], bad: dict[str, str]) -> dict[str, list[Path]]:
    return {name: [p for p in files if str(p) not in bad] for name, files in by_class.items()}


def _require_usable(by_class: dict[str, list[Path]], split_dir: Path, excluded: bool = False) -> None:
    for name, files in by_class.items():
        if not files:
            hint = " (data.exclude left out the rest)" if excluded else ""
            raise DataError(f"class folder {split_dir / name} has no usable image (jpg, jpeg, png, bmp, webp){hint}: "
                            "add images or remove the folder")


def _require_known(by_class: dict[str, list[Path]], split_dir: Path, class_names: list[str]) -> None:
    unknown = sorted(set(by_class) - set(class_names))
    if unknown:
        raise DataError(f"{split_dir} has class folders not in train/: {', '.join(unknown[:5])}; "
                        "rename or remove them so that every class has training images")


_GLOB = frozenset("*?[")


def read_exclude_file(exclude: str | Path, root: Path) -> tuple[Path, list[str]]:
    """data.exclude's file (as given, else relative to the root) and its entries: one path or glob a line,
    blank lines and # comments skipped."""
    path = Path(exclude).expanduser()
    if not path.is_file() and not path.is_absolute() and (root / path).is_file():
        path = root / path
    try:
        # surrogateescape: file names that are not UTF-8 come back as the bytes the audit wrote
        lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as error:
        reason = error.strerror or str(error)
        raise DataError(f"cannot read data.exclude file {path}: {reason}; set data.exclude to a file of paths "
                        "(one a line, relative to the data root), e.g. an audit's exclude.txt, or to null") from error
    return path, [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def match_exclusions(entries: list[str], files: list[Path], root: Path) -> tuple[set[Path], list[str]]:
    """The files that `entries` name (paths or globs, relative to `root` or absolute; a glob's * also crosses
    folders; an entry that is a file's exact name is that file, even with [ ] * ? in it) and the entries that
    name none."""
    base = Path(os.path.abspath(root))
    relative = {f: Path(os.path.abspath(f)).relative_to(base).as_posix() for f in files}
    by_name = {name: f for f, name in relative.items()}
    by_name.update({os.path.abspath(f): f for f in files})
    matched: set[Path] = set()
    unmatched = []
    for entry in entries:
        absolute = os.path.isabs(os.path.expanduser(entry))
        pattern = os.path.abspath(os.path.expanduser(entry)) if absolute else entry.removeprefix("./")
        if pattern in by_name:  # a file's own name first: photo[1].jpg is that file, not a pattern
            hits = {by_name[pattern]}
        elif _GLOB & set(entry):
            hits = {f for f, name in relative.items()
                    if fnmatch.fnmatchcase(os.path.abspath(f) if absolute else name, pattern)}
        else:
            hits = set()
        if not hits:
            unmatched.append(entry)
        matched |= hits
    return matched, unmatched


def index_dataset(root: str | Path, *, val_fraction: float = 0.15, seed: int = 42,
                  on_bad_image: str = "skip", test_labels: str | Path | None = None,
                  check_images: bool = True, exclude: str | Path | None = None) -> DatasetIndex:
    """Scan `root` once: find classes, check every image, build the train/val/test sample lists."""
    if on_bad_image not in {"skip", "error"}:
        raise DataError(f"data.on_bad_image={on_bad_image!r} is not one of: skip, error")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data root {root} does not exist: set data.root=/path/to/dataset "
                        "(or $ANIMAL_DATA_DIR) to a folder holding train/<class>/<images>")
    if not root.is_dir():
        raise DataError(f"data root {root} is a file, not a folder: set data.root to the dataset folder")
    train_dir, val_dir, test_dir = root / "train", root / "val", root / "test"
    if not train_dir.is_dir():
        raise DataError(f"no train folder at {train_dir}: the dataset needs {root}/train/<class>/<images>")

    train_by_class = scan_class_folders(train_dir)
    if not train_by_class:
        raise DataError(f"{train_dir} has no class folders: put each class's images in {train_dir}/<class_name>/")
    if len(train_by_class) < 2:
        only = next(iter(train_by_class))
        raise DataError(f"{train_dir} has only one class folder ({only}): a classifier needs at least two classes")
    class_names = sorted(train_by_class)
    _require_usable(train_by_class, train_dir)

    val_by_class = scan_class_folders(val_dir) if val_dir.is_dir() else {}
    _require_known(val_by_class, val_dir, class_names)
    test_by_class = scan_class_folders(test_dir) if test_dir.is_dir() else {}
    test_by_class = {k: v for k, v in test_by_class.items() if v}  # nested non-class folders are not classes
    _require_known(test_by_class, test_dir, class_names)
    flat_test: list[tuple[Path, str]] = []
    if not test_by_class and test_labels is not None:
        flat_test = _labelled_flat_test(root, test_dir, Path(test_labels), class_names)
    known = set(class_names)
    novel_test = [(p, c) for p, c in flat_test if c not in known]
    flat_test = [(p, c) for p, c in flat_test if c in known]

    excluded: set[Path] = set()
    unmatched: list[str] = []
    if exclude:
        exclude_file, entries = read_exclude_file(exclude, root)
        every = [p for group in (train_by_class, val_by_class, test_by_class) for files in group.values()
                 for p in files] + [p for p, _ in flat_test + novel_test]
        excluded, unmatched = match_exclusions(entries, every, root)
        log.info("data.exclude: leaving out %d files listed in %s", len(excluded), exclude_file)
        if unmatched:
            log.warning("data.exclude: %d line(s) of %s match no file under %s, e.g. %s", len(unmatched),
                        exclude_file, root, ", ".join(unmatched[:3]))
        keep = {str(p) for p in every} - {str(p) for p in excluded}
        train_by_class, val_by_class, test_by_class = (
            {name: [p for p in files if str(p) in keep] for name, files in group.items()}
            for group in (train_by_class, val_by_class, test_by_class))
        flat_test = [(p, c) for p, c in flat_test if str(p) in keep]
        novel_test = [(p, c) for p, c in novel_test if str(p) in keep]
        _require_usable(train_by_class, train_dir, excluded=True)

    bad: dict[str, str] = {}
    if check_images:
        every = [p for group in (train_by_class, val_by_class, test_by_class) for files in group.values()
                 for p in files] + [p for p, _ in flat_test + novel_test]
        bad = find_bad_images(every)
    if bad:
        first, reason = next(iter(sorted(bad.items())))
        if on_bad_image == "error":
            raise DataError(f"{len(bad)} unusable image(s) under {root}, first {first} ({reason}); "
                            "remove them or set data.on_bad_image=skip")
        for path, why in sorted(bad.items()):
            log.warning("leaving out unusable image %s (%s)", path, why)
        train_by_class = _leave_out_bad(train_by_class, bad)
        val_by_class = _leave_out_bad(val_by_class, bad)
        test_by_class = _leave_out_bad(test_by_class, bad)
        flat_test = [(p, c) for p, c in flat_test if str(p) not in bad]
        novel_test = [(p, c) for p, c in novel_test if str(p) not in bad]
        _require_usable(train_by_class, train_dir)
    _require_usable(val_by_class, val_dir)

    class_to_idx = {name: i for i, name in enumerate(class_names)}
    if val_by_class:
        val_source = "val folder"
    else:
        train_by_class, val_by_class = stratified_split(train_by_class, val_fraction, seed)
        val_source = f"{val_fraction:.0%} stratified split of train"
    train, val = _samples(train_by_class, class_to_idx), _samples(val_by_class, class_to_idx)
    if test_by_class:
        test, test_source = _samples(test_by_class, class_to_idx), "test class folders"
    elif flat_test:
        test = [(str(p), class_to_idx[c]) for p, c in flat_test]
        test_source = f"flat test folder scored with {test_labels}"
    else:
        test, test_source = list(val), "validation split (no labelled test set)"
    base = Path(os.path.abspath(root))
    return DatasetIndex(root, class_names, train, val, test, test_source, val_source, bad,
                        [(str(p), c) for p, c in novel_test],
                        sorted(Path(os.path.abspath(p)).relative_to(base).as_posix() for p in excluded), unmatched)


def _labelled_flat_test(root: Path, test_dir: Path, labels_file: Path, class_names: list[str]
                        ) -> list[tuple[Path, str]]:
    """The flat test folder's labelled images: those of training classes, and of other (novel) classes."""
    labels_path = labels_file if labels_file.is_absolute() else root / labels_file
    if not labels_path.is_file():
        raise DataError(f"labels file {labels_path} not found: fix data.test_labels or set it to null")
    labels = read_labels_csv(labels_path)
    known = set(class_names)
    images = sorted(p for p in test_dir.iterdir() if p.is_file() and is_image_name(p.name)) \
        if test_dir.is_dir() else []
    pairs = [(p, labels[p.name]) for p in images if p.name in labels]
    unlabelled = sum(1 for p in images if p.name not in labels)
    unseen = sum(1 for p in images if p.name in labels and labels[p.name] not in known)
    if not any(c in known for _, c in pairs):
        raise DataError(f"labels file {labels_path} labels none of the {len(images)} images in {test_dir} with a "
                        "training class: check its image_id column (file names) or set data.test_labels=null")
    if unlabelled or unseen:
        log.info("test set from %s: %d images of training classes, %d without a label, %d of classes not in "
                 "train/ (scored as novel: open-set and zero-shot metrics)", labels_path, len(pairs) - unseen,
                 unlabelled, unseen)
    return pairs
