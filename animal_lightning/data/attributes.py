"""Class-attribute tables in the Animals-with-Attributes-2 format, for zero-shot learning.

A folder holds three files (names configurable through `data.attribute_files`):

    classes.txt                      "<id>\t<class name>" per line, e.g. "    1\tantelope"
    predicates.txt                   "<id>\t<attribute name>" per line, e.g. "    1\tblack"
    predicate-matrix-continuous.txt  one row per class, one whitespace-separated number per attribute
                                     (AwA2: 0..100; the binary matrix works as well)

Classes in the table that have no training folder are the unseen ones: the model learns to map
images to attributes on the seen classes and names unseen classes by their attributes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from animal_lightning.errors import DataError

DEFAULT_FILES = {"classes": "classes.txt", "predicates": "predicates.txt",
                 "matrix": "predicate-matrix-continuous.txt"}


@dataclass(frozen=True)
class AttributeTable:
    """All classes of the table (seen and unseen), the attribute names, and one row of values per class."""

    classes: tuple[str, ...]
    predicates: tuple[str, ...]
    matrix: tuple[tuple[float, ...], ...]
    source: str = ""

    def unseen(self, seen: Sequence[str]) -> list[str]:
        """The table's classes that are not among `seen`, in table order."""
        known = set(seen)
        return [name for name in self.classes if name not in known]

    def rows_for(self, names: Sequence[str]) -> list[list[float]]:
        position = {name: i for i, name in enumerate(self.classes)}
        return [list(self.matrix[position[name]]) for name in names]

    def check_covers(self, seen: Sequence[str]) -> None:
        """Every training class needs a row: otherwise its images cannot teach attributes."""
        missing = sorted(set(seen) - set(self.classes))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DataError(f"attribute classes file {self.source} has no row for training class(es) {shown}: "
                            "add them to it (same spelling as the train/ folder names) or set data.attributes=null")

    def to_dict(self, seen: Sequence[str]) -> dict:
        """Plain data for a checkpoint: the seen classes' rows first (in training order), then the unseen."""
        unseen = self.unseen(seen)
        return {"predicates": list(self.predicates), "seen": list(seen), "unseen": unseen,
                "matrix": self.rows_for([*seen, *unseen]), "source": self.source}


def _read_lines(path: Path, what: str, setting: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"attribute {what} file {path} not found: set {setting} to its name, or data.attributes "
                        "to the folder holding classes.txt, predicates.txt and predicate-matrix-continuous.txt")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read attribute {what} file {path} ({type(error).__name__}): "
                        "it should be UTF-8 text") from error
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _read_names(path: Path, what: str, setting: str) -> tuple[str, ...]:
    """'<id> <name>' or '<name>' per line (AwA2 writes '    1\\tantelope')."""
    names = []
    for number, line in enumerate(_read_lines(path, what, setting), start=1):
        parts = line.split()
        if len(parts) > 2 or (len(parts) == 2 and not parts[0].isdigit()):
            raise DataError(f"{path} line {number} is {line!r}: expected '<id> <name>' or '<name>' "
                            "(names use + for spaces, as in grizzly+bear)")
        names.append(parts[-1])
    if not names:
        raise DataError(f"attribute {what} file {path} is empty: it needs one name per line")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"attribute {what} file {path} lists {name!r} twice: each name must appear once")
        seen.add(name)
    return tuple(names)


def _read_matrix(path: Path, n_rows: int, n_cols: int, files: Mapping[str, Path]) -> tuple[tuple[float, ...], ...]:
    lines = _read_lines(path, "matrix", "data.attribute_files.matrix")
    if len(lines) != n_rows:
        raise DataError(f"attribute matrix {path} has {len(lines)} rows but {files['classes']} lists {n_rows} "
                        "classes: one row per class, in the same order")
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = tuple(float(value) for value in line.split())
        except ValueError:
            raise DataError(f"attribute matrix {path} line {number} has a value that is not a number: "
                            f"{line[:60]!r}") from None
        if len(row) != n_cols:
            raise DataError(f"attribute matrix {path} line {number} has {len(row)} values but "
                            f"{files['predicates']} lists {n_cols} attributes: one value per attribute")
        if not all(math.isfinite(v) for v in row):
            raise DataError(f"attribute matrix {path} line {number} has a NaN or infinite value")
        if not any(row):
            raise DataError(f"attribute matrix {path} line {number} is all zeros: a class needs some attribute "
                            "to be told apart")
        rows.append(row)
    return tuple(rows)


def load_attributes(folder: str | os.PathLike, files: Mapping[str, str] | None = None) -> AttributeTable:
    """Read and check an AwA2-format attribute folder; every problem is a one-line DataError."""
    names = {**DEFAULT_FILES, **dict(files or {})}
    unknown = sorted(set(names) - set(DEFAULT_FILES))
    if unknown:
        raise DataError(f"data.attribute_files has unknown key(s) {', '.join(unknown)}: use classes, predicates, "
                        "matrix")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"attribute folder {folder} does not exist or is not a folder: set data.attributes to the "
                        "folder with classes.txt, predicates.txt and predicate-matrix-continuous.txt")
    classes = _read_names(folder / names["classes"], "classes", "data.attribute_files.classes")
    predicates = _read_names(folder / names["predicates"], "predicates", "data.attribute_files.predicates")
    matrix = _read_matrix(folder / names["matrix"], len(classes), len(predicates),
                          {"classes": folder / names["classes"], "predicates": folder / names["predicates"]})
    return AttributeTable(classes, predicates, matrix, source=str(folder / names["classes"]))
