"""What a dataset folder holds, file by file, read the way the DataModule reads it, but without stopping.

The DataModule refuses a folder it cannot train on (no train/, an empty class, one class); the audit
lists what it finds instead, so that every problem of a folder shows in one report. Only a root that
is not a dataset at all (missing, a file, no train/ folder) stops it, with the DataModule's message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from animal_lightning.data.folders import class_folders
from animal_lightning.data.images import is_image_name
from animal_lightning.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Entry:
    path: str  # as found under the root (not resolved: links stay links)
    rel: str  # relative to the root, with / separators: what reports and exclude files name
    split: str  # train | val | test
    label: str | None  # class folder name; None for a flat, unlabelled test/ photo


@dataclass
class Inventory:
    root: Path
    entries: list[Entry]
    classes: dict[str, list[str]]  # each split's class folders (empty ones included)
    other_files: list[Entry] = field(default_factory=list)  # files of types the loader does not read
    unreadable_folders: list[tuple[Entry, str]] = field(default_factory=list)  # sub-folders os.walk could not list

    @property
    def class_names(self) -> list[str]:
        return list(self.classes["train"])


def _walk(folder: Path, failed: list[tuple[Path, str]]) -> tuple[list[Path], list[Path]]:
    """(image files, other visible files) below `folder`, sorted; symlinked folders are not followed; folders
    that cannot be listed are added to `failed` with the reason."""
    images, others = [], []
    for current, dirs, files in os.walk(folder, followlinks=False,
                                        onerror=lambda error: failed.append((Path(error.filename),
                                                                             error.strerror or str(error)))):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            (images if is_image_name(name) else others).append(Path(current) / name)
    return sorted(images), sorted(others)


def take_inventory(root: str | Path) -> Inventory:
    """Every file of root/train/<class>/, root/val/<class>/ and root/test/ (class folders or flat)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder: set data.root=/path/to/dataset "
                        "(a folder holding train/<class>/<images>)")
    if not (root / "train").is_dir():
        raise DataError(f"no train folder at {root / 'train'}: the dataset needs {root}/train/<class>/<images>")
    entries: list[Entry] = []
    others: list[Entry] = []
    classes: dict[str, list[str]] = {}

    def add(paths: list[Path], split: str, label: str | None, into: list[Entry]) -> None:
        into.extend(Entry(str(p), p.relative_to(root).as_posix(), split, label) for p in paths)

    failed: list[tuple[Path, str]] = []
    for split in SPLITS:
        folder = root / split
        classes[split] = []
        if not folder.is_dir():
            continue
        try:
            class_dirs = class_folders(folder)
            flat = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        except OSError as error:
            raise DataError(f"cannot read {folder}: {error.strerror}; give yourself read access to the dataset "
                            "(chmod -R u+rX)") from None
        for class_dir in class_dirs:
            images, other = _walk(class_dir, failed)
            if split == "test" and not images and not other:
                continue  # an empty folder in test/ is no class (the DataModule ignores it too)
            classes[split].append(class_dir.name)
            add(images, split, class_dir.name, entries)
            add(other, split, class_dir.name, others)
        if split == "test":  # a flat test folder: its own files are unlabelled photos
            add([p for p in flat if is_image_name(p.name)], split, None, entries)
            add([p for p in flat if not is_image_name(p.name)], split, None, others)
    if not classes["train"]:
        raise DataError(f"{root / 'train'} has no class folders: put each class's images in "
                        f"{root / 'train'}/<class_name>/")
    unreadable = [(Entry(str(p), p.relative_to(root).as_posix() + "/", p.relative_to(root).parts[0], None), why)
                  for p, why in failed]
    return Inventory(root, entries, classes, others, unreadable)
