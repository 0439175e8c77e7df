"""What the audit reports: one `Finding` per (file, kind), grouped into the report's sections."""

from __future__ import annotations

import math
from dataclasses import dataclass

# section key, title, the kinds it holds (in the order the report lists them), what the section checks
SECTIONS: list[tuple[str, str, tuple[str, ...], str]] = [
    ("files", "Unreadable and skipped files", ("unreadable", "not_an_image"),
     "Files the DataModule leaves out: they do not decode (empty, truncated, corrupt, over the pixel limit), or "
     "their type is not one the loader reads."),
    ("duplicates", "Duplicates and leaks", ("leak", "conflicting_labels", "exact_duplicate", "near_duplicate"),
     "Copies of one photo: across splits (a leak that inflates every score), under two classes (one label is "
     "wrong), or twice in one class. Exact: the same bytes or pixels; near: resized, re-encoded, cropped or "
     "mirrored copies."),
    ("quality", "Image quality", ("small", "odd_aspect", "blank", "dark", "overexposed", "blurry", "grayscale",
                                  "alpha"),
     "Photos that may still train, but deserve a look."),
    ("balance", "Class folders and balance", ("empty_class", "stray_class", "one_class", "few_images", "imbalance"),
     "Class folders training would refuse, and usable photos per class in train/ and val/."),
    ("labels", "Likely wrong labels", ("label_issue",),
     "Photos whose given class a classifier that never saw them finds unlikely (cross-validated probabilities, "
     "cleanlab's label-issue finder), most suspect first."),
    ("unknown", "Unlabelled test photos like no training class", ("unknown_test",),
     "How many photos of the flat test/ folder score below the open-set threshold: a first estimate of the "
     "animals that have no training class."),
]
KINDS = [kind for _, _, kinds, _ in SECTIONS for kind in kinds]
DESCRIPTIONS = {
    "unreadable": "does not decode as an image",
    "not_an_image": "not a type the loader reads",
    "leak": "a test/ or val/ photo with a copy in another split",
    "conflicting_labels": "the same photo under two classes",
    "exact_duplicate": "the same bytes or pixels twice in a class",
    "near_duplicate": "a resized, re-encoded, cropped or mirrored copy in the same class",
    "small": "shorter side under quality.min_side",
    "odd_aspect": "longer side over quality.max_aspect times the shorter",
    "blank": "nearly uniform (luminance spread under quality.blank)",
    "dark": "nearly black (99th luminance percentile under quality.dark)",
    "overexposed": "nearly white (1st luminance percentile over quality.overexposed)",
    "blurry": "little edge detail (Laplacian spread under quality.blurry)",
    "grayscale": "no colour (channels differ by under quality.grayscale)",
    "alpha": "has transparency (shown on white when loaded)",
    "empty_class": "a class folder without images",
    "stray_class": "a val/ or test/ class folder without a train/ folder",
    "one_class": "a single class folder in train/",
    "few_images": "a class with fewer than balance.min_images",
    "imbalance": "largest / smallest class over balance.max_ratio",
    "label_issue": "given class unlikely; another class suggested",
    "unknown_test": "looks like no training class",
}


@dataclass
class Finding:
    kind: str
    file: str  # relative to the data root (a class folder for class findings)
    other: str = ""  # the other file (the kept copy of a duplicate) or the suggested class
    score: float = math.nan  # the measure the kind thresholds (distance, probability, statistic)
    action: str = "review"  # exclude | review | fix
    detail: str = ""
    excludes: tuple[str, ...] = ()  # files this finding suggests leaving out of training

    def row(self) -> dict:
        return {"finding": self.kind, "file": self.file, "other": self.other,
                "score": "" if math.isnan(self.score) else f"{self.score:.4g}", "action": self.action,
                "detail": self.detail}
