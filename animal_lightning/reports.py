"""What a model got wrong, as numbers and pictures: confusion matrix, per-class table, confused pairs, image grids.

Pure functions on tensors and class names, shared by the training callbacks (TensorBoard and the run
folder) and by predict.py on labelled input. Plots are matplotlib figures built with the object API
(no global pyplot state), so they can be drawn in a Trainer hook without a display.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torchmetrics.functional.classification import multiclass_confusion_matrix

from animal_lightning.atomic import write_bytes_atomic
from animal_lightning.data.transforms import PreprocessSpec

# Above this many classes the confusion plot shows the classes with the most errors (the CSV has all).
MAX_PLOTTED_CLASSES = 50


def confusion_matrix(targets: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """num_classes x num_classes counts: row = true class, column = predicted class (torchmetrics')."""
    targets, predicted = targets.long().flatten().cpu(), predicted.long().flatten().cpu()
    if len(targets) != len(predicted):
        raise ValueError(f"{len(targets)} targets but {len(predicted)} predictions")
    return multiclass_confusion_matrix(predicted, targets, num_classes).long()


def per_class_table(confusion: torch.Tensor, class_names: Sequence[str]) -> list[dict]:
    """One row per class: support (true images), predicted (times chosen), correct, precision, recall, F1.

    precision is None for a class never predicted, recall None for a class with no images, F1 None
    when either is; these are the usual undefined cases, not zeros.
    """
    counts = confusion.double()
    rows = []
    for c, name in enumerate(class_names):
        correct, support, chosen = float(counts[c, c]), float(counts[c].sum()), float(counts[:, c].sum())
        precision = correct / chosen if chosen else None
        recall = correct / support if support else None
        f1 = None
        if precision is not None and recall is not None:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "support": int(support), "predicted": int(chosen), "correct": int(correct),
                     "precision": _round(precision), "recall": _round(recall), "f1": _round(f1)})
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _mistakes(confusion: torch.Tensor) -> torch.Tensor:
    """The confusion matrix with its diagonal (the correct answers) zeroed."""
    return confusion.clone().fill_diagonal_(0)


def confused_pairs(confusion: torch.Tensor, class_names: Sequence[str], top: int = 10) -> list[dict]:
    """The off-diagonal cells with the most images, largest first: {"true", "predicted", "count"}."""
    flat = _mistakes(confusion).flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:top]
    n = confusion.shape[0]
    return [{"true": class_names[int(i) // n], "predicted": class_names[int(i) % n], "count": int(flat[i])}
            for i in order if flat[i] > 0]


def format_pairs(pairs: Sequence[dict]) -> str:
    """"siamese+cat -> persian+cat: 12" lines, or a note that nothing was confused."""
    if not pairs:
        return "no class was confused with another"
    return "\n".join(f"{p['true']} -> {p['predicted']}: {p['count']}" for p in pairs)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")  # and the quote itself, so one quote always comes off


def spreadsheet_safe(value):
    """Text that a spreadsheet would run as a formula (=, +, -, @ first: CSV injection) gets a leading
    apostrophe, which spreadsheets show as text, and so does text that starts with an apostrophe (so a
    reader can always take exactly one off); numbers and other text are left as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


def rows_csv(rows: Sequence[dict], columns: Sequence[str] | None = None, safe: bool = True) -> str:
    """A list of dicts as CSV text with a header (the columns of the first row unless given). safe: text that
    a spreadsheet would evaluate is written as text (see spreadsheet_safe); False writes values verbatim."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns or (rows[0].keys() if rows else [])),
                            extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: spreadsheet_safe(v) for k, v in row.items()} for row in rows] if safe else rows)
    return buffer.getvalue()


def confusion_csv(confusion: torch.Tensor, class_names: Sequence[str]) -> str:
    """Counts with a header row of predicted classes and a first column of true classes."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true \\ predicted", *(spreadsheet_safe(name) for name in class_names)])
    for name, row in zip(class_names, confusion.tolist(), strict=True):
        writer.writerow([spreadsheet_safe(name), *row])
    return buffer.getvalue()


def plotted_classes(confusion: torch.Tensor, limit: int = MAX_PLOTTED_CLASSES) -> list[int]:
    """All classes when there are at most `limit`; otherwise the `limit` with the most errors (as true or
    as predicted class), in class order, so a 101-class plot stays readable."""
    n = confusion.shape[0]
    if n <= limit:
        return list(range(n))
    off = _mistakes(confusion)
    errors = off.sum(0) + off.sum(1)
    keep = torch.argsort(errors, descending=True, stable=True)[:limit]
    return sorted(int(i) for i in keep)


def confusion_figure(confusion: torch.Tensor, class_names: Sequence[str], title: str = "confusion matrix",
                     limit: int = MAX_PLOTTED_CLASSES) -> Figure:
    """Row-normalised confusion (each true class's share of predictions, colour scale 0..1), class names on
    both axes; counts are printed in the cells when there are few classes."""
    shown = plotted_classes(confusion, limit)
    counts = confusion[shown][:, shown].double()
    rows = confusion[shown].double().sum(1, keepdim=True)  # the whole row: shares of all this class's images
    shares = torch.where(rows > 0, counts / rows.clamp(min=1), torch.zeros_like(counts)).numpy()
    n = len(shown)
    side = min(30.0, max(5.0, 0.28 * n + 2.5))
    font = 9 if n <= 20 else 7 if n <= 40 else 5.5
    figure = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.04, label="share of the true class's images")
    names = [class_names[i] for i in shown]
    axes.set_xticks(range(n), names, rotation=90, fontsize=font)
    axes.set_yticks(range(n), names, fontsize=font)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    total = int(confusion.sum())
    correct = int(confusion.diagonal().sum())
    subtitle = f"{total} images, {correct / total:.1%} correct" if total else "no images"
    if n < confusion.shape[0]:
        subtitle += f"; the {n} of {confusion.shape[0]} classes with most errors"
    axes.set_title(f"{title}\n{subtitle}", fontsize=10)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                value = int(counts[i, j])
                if value:
                    axes.text(j, i, str(value), ha="center", va="center", fontsize=font - 1,
                              color="white" if shares[i, j] > 0.5 else "black")
    return figure


def to_uint8_images(images: torch.Tensor, spec: PreprocessSpec) -> np.ndarray:
    """Normalised N x 3 x H x W tensors back to N x H x W x 3 uint8 pictures (undoing mean and std)."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1)
    return (pixels * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid_figure(pictures: np.ndarray | Sequence[np.ndarray], titles: Sequence[str], title: str = "",
                      columns: int = 8) -> Figure:
    """Pictures (H x W x 3 uint8) in a grid, each with its caption; long captions wrap onto two lines."""
    count = len(pictures)
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    figure = Figure(figsize=(1.9 * columns, 2.2 * rows + (0.4 if title else 0)), dpi=100, layout="constrained")
    if title:
        figure.suptitle(title, fontsize=10)
    for k in range(rows * columns):
        axes = figure.add_subplot(rows, columns, k + 1)
        axes.axis("off")
        if k < count:
            axes.imshow(pictures[k], interpolation="nearest" if pictures[k].shape[0] < 96 else "antialiased")
            axes.set_title(_wrap(titles[k]), fontsize=6.5)
    return figure


def _wrap(text: str, width: int = 30) -> str:
    lines = []
    for part in text.split("\n"):
        while len(part) > width:
            cut = part.rfind(" ", 0, width)
            cut = cut if cut > 0 else width
            lines.append(part[:cut])
            part = part[cut:].lstrip()
        lines.append(part)
    return "\n".join(lines[:4])


def save_figure(figure: Figure, path: Path) -> Path:
    """Write a PNG atomically (a kill mid-write leaves the previous file, never half a PNG)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_bytes_atomic(path, buffer.getvalue())
