"""Per-photo quality checks and per-class balance, from fingerprints and the folder's class counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from animal_lightning.audit.findings import Finding
from animal_lightning.audit.fingerprints import Fingerprint
from animal_lightning.audit.inventory import Entry, Inventory


@dataclass(frozen=True)
class QualitySettings:
    min_side: int = 64  # px: smaller photos are upscaled to the input size from almost nothing
    max_aspect: float = 3.0  # a centre crop of a longer photo keeps under a third of it
    blank: float = 6.0  # luminance standard deviation (0-255)
    dark: float = 40.0  # 99th luminance percentile
    overexposed: float = 215.0  # 1st luminance percentile
    blurry: float = 4.0  # standard deviation of the Laplacian on the 256 px copy
    grayscale: float = 1.0  # mean absolute channel difference


def quality_findings(entries: Sequence[Entry], prints: Sequence[Fingerprint], settings: QualitySettings
                     ) -> list[Finding]:
    """One finding per (decodable photo, quality problem)."""
    found = []
    for entry, item in zip(entries, prints, strict=True):
        short, long = sorted((item.width, item.height))
        aspect = long / max(short, 1)
        size = f"{item.width} x {item.height} px"
        checks = [
            ("small", short < settings.min_side, short, size),
            ("odd_aspect", aspect > settings.max_aspect, aspect, f"{size}, {aspect:.1f}:1"),
            ("blank", item.contrast < settings.blank, item.contrast, f"luminance spread {item.contrast:.1f}"),
            ("dark", item.dark < settings.dark, item.dark, f"99% of pixels under {item.dark:.0f}/255"),
            ("overexposed", item.light > settings.overexposed, item.light, f"99% of pixels over {item.light:.0f}/255"),
            # a blank photo has no edges by definition: it is reported as blank, not again as blurry
            ("blurry", item.sharpness < settings.blurry and item.contrast >= settings.blank, item.sharpness,
             f"Laplacian spread {item.sharpness:.1f}"),
            ("grayscale", item.colourfulness < settings.grayscale, item.colourfulness,
             f"stored as {item.mode}" if item.mode in {"L", "LA", "I", "I;16", "1"} else "RGB without colour"),
            ("alpha", item.alpha, float("nan"), f"mode {item.mode}"),
        ]
        found.extend(Finding(kind, entry.rel, score=float(score), detail=detail)
                     for kind, flagged, score, detail in checks if flagged)
    return found


def class_counts(inventory: Inventory, usable: set[str]) -> dict[str, int]:
    """Usable photos per training class, train/ and val/ together (what the model learns from)."""
    counts = Counter(e.label for e in inventory.entries if e.split in ("train", "val") and e.path in usable)
    return {name: counts.get(name, 0) for name in inventory.class_names}


def balance_findings(inventory: Inventory, usable: set[str], min_images: int, max_ratio: float) -> list[Finding]:
    """Class folders the DataModule would refuse (empty, stray, a single class) and thin or unbalanced classes."""
    counts = class_counts(inventory, usable)
    per_folder = Counter((e.split, e.label) for e in inventory.entries if e.path in usable and e.label is not None)
    has_val = bool(inventory.classes["val"])
    found = []
    for split in ("train", "val"):
        for name in inventory.classes[split]:
            if per_folder[(split, name)] == 0:
                found.append(Finding("empty_class", f"{split}/{name}/", score=0, action="fix",
                                     detail="no usable photo: training stops here; add photos or remove the folder"))
    known = set(inventory.class_names)
    for split in ("val", "test"):
        for name in inventory.classes[split]:
            if name not in known:
                found.append(Finding("stray_class", f"{split}/{name}/", action="fix",
                                     detail="a class folder without a train/ folder: training stops here; rename it "
                                            "to a training class or remove it"))
    if len(inventory.class_names) == 1:
        found.append(Finding("one_class", "train/", inventory.class_names[0], action="fix",
                             detail="one class folder: a classifier needs at least two; add the other classes"))
    for name, count in counts.items():
        if 0 < count < min_images:
            why = " (a validation split needs 2: training stops here)" if count < 2 and not has_val else ""
            found.append(Finding("few_images", f"train/{name}/", score=count, action="fix",
                                 detail=f"{count} usable photo(s){why}: add photos of this class"))
    present = [c for c in counts.values() if c > 0]
    if len(present) >= 2 and max(present) / min(present) > max_ratio:
        large = max(counts, key=counts.get)
        small = min((n for n in counts if counts[n] > 0), key=counts.get)
        ratio = max(present) / min(present)
        found.append(Finding("imbalance", "train/", other=f"{large} / {small}", score=ratio, action="fix",
                             detail=f"{counts[large]} vs {counts[small]} photos ({ratio:.1f}:1): train with "
                                    "data.balance=sampler (or data.balance=loss_weights)"))
    return found
