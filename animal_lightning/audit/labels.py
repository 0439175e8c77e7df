"""Likely wrong labels, and how much of an unlabelled test folder looks like no training class.

Every labelled photo gets class probabilities from a classifier that never saw it: k-fold
cross-validation of a linear probe (models/probe.py: L2-regularised logistic regression, fitted by
L-BFGS) on frozen features. cleanlab's `find_label_issues` (confident learning, Northcutt et al.
2021) then estimates how often each class is filed as each other class and picks the photos whose
given label those estimates make least likely: with `filter_by="low_self_confidence"` (the default
here) it estimates how many labels are wrong from the confident joint and flags that many photos with
the lowest self-confidence (the out-of-sample probability of the given label). On Caltech-101 with 3%
of the training labels swapped, that found 99.4% of them at 72.2% precision, against 79.4% at 50.8%
for cleanlab's default `prune_by_noise_rate` (bench/audit.py --filters all; docs/benchmarks.md). Unlabelled
test photos are scored by how far they are from the labelled photos in feature space (cleanlab's
OutOfDistribution: k nearest neighbours); one further from its neighbours than `keep` of the labelled
photos are from theirs looks like no training class. (A linear probe's largest probability does this
badly: on well-separated features it is near 1 for nearly everything, unknown animals included.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from animal_lightning.audit.features import rooted
from animal_lightning.models.openset import quantile_table, value_at
from animal_lightning.models.probe import fit_linear_probe

log = logging.getLogger(__name__)


@dataclass
class LabelCheck:
    """The cross-validation's outcome (what the audit caches); `issues` applies cleanlab's filter to it."""

    probabilities: np.ndarray  # N x C out-of-sample probabilities of the checked photos, over the usable classes
    checked: np.ndarray  # indices (into the labelled photos) that were checked
    given: np.ndarray  # N: each checked photo's class, as an index into `usable`
    usable: np.ndarray  # the class indices (into the class names) that were checked
    folds: int
    skipped_classes: list[str]  # classes with too few photos to hold one out

    @property
    def cv_accuracy(self) -> float:
        """The out-of-sample accuracy: how well the features separate the classes."""
        return float((self.probabilities.argmax(1) == self.given).mean())

    def issues(self, filter_by: str = "low_self_confidence") -> list[tuple[int, int, float, float]]:
        """(row into `checked`, suggested class index, its probability, the label's self-confidence) for each
        likely wrong label, most suspect first."""
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores

        found = find_label_issues(self.given, self.probabilities, filter_by=filter_by,
                                  return_indices_ranked_by="self_confidence", n_jobs=1)
        quality = get_label_quality_scores(self.given, self.probabilities)
        best = self.probabilities.argmax(1)
        return [(int(n), int(self.usable[best[n]]), float(self.probabilities[n, best[n]]), float(quality[n]))
                for n in found]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"probabilities": self.probabilities, "checked": self.checked, "given": self.given,
                "usable": self.usable, "folds": np.array(self.folds),
                "skipped": np.array(self.skipped_classes, dtype=str)}

    @classmethod
    def from_arrays(cls, saved) -> LabelCheck:
        return cls(saved["probabilities"], saved["checked"], saved["given"], saved["usable"], int(saved["folds"]),
                   [str(v) for v in saved["skipped"]])


def _fold_of(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Stratified folds: each class's photos dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        fold[rng.permutation(members)] = np.arange(len(members)) % folds
    return fold


def _probe(features: np.ndarray, labels: np.ndarray, classes: int, max_iter: int):
    weight, bias, _ = fit_linear_probe((torch.from_numpy(features), torch.from_numpy(labels)), None, classes,
                                       max_iter=max_iter)
    return lambda x: torch.softmax(torch.from_numpy(x) @ weight.T + bias, dim=1).numpy()


def out_of_sample_probabilities(features: np.ndarray, labels: np.ndarray, classes: int, folds: int, seed: int,
                                max_iter: int = 200) -> np.ndarray:
    fold = _fold_of(labels, folds, seed)
    probabilities = np.zeros((len(labels), classes), dtype=np.float64)
    for k in range(folds):
        held = fold == k
        predict = _probe(features[~held], labels[~held], classes, max_iter)
        probabilities[held] = predict(features[held])
    return probabilities


FILTERS = ("low_self_confidence", "low_normalized_margin", "prune_by_noise_rate", "prune_by_class", "both",
           "confident_learning", "predicted_neq_given")  # cleanlab.filter.find_label_issues' filter_by


def check_labels(features: np.ndarray, labels: np.ndarray, class_names: list[str], *, folds: int = 5,
                 seed: int = 0, max_iter: int = 200) -> LabelCheck | None:
    """Out-of-sample probabilities of the labelled photos (features row-aligned with labels, class indices);
    None with fewer than two classes of two photos."""
    counts = np.bincount(labels, minlength=len(class_names))
    usable = [c for c in range(len(class_names)) if counts[c] >= 2]
    skipped = [class_names[c] for c in range(len(class_names)) if 0 < counts[c] < 2]
    if len(usable) < 2:
        return None
    folds = int(max(2, min(folds, min(counts[c] for c in usable))))
    checked = np.flatnonzero(np.isin(labels, usable))
    remap = {c: i for i, c in enumerate(usable)}
    given = np.array([remap[int(v)] for v in labels[checked]], dtype=np.int64)
    probabilities = out_of_sample_probabilities(features[checked].astype(np.float32), given, len(usable), folds,
                                                seed, max_iter)
    return LabelCheck(probabilities, checked, given, np.array(usable, dtype=np.int64), folds, skipped)


def unknown_scores(labelled: np.ndarray, unlabelled: np.ndarray, keep: float = 0.95, neighbours: int = 10
                   ) -> tuple[np.ndarray, float]:
    """(how typical each unlabelled photo is of the labelled ones, the threshold under which it looks like none).

    cleanlab's OutOfDistribution on the square-rooted features: one minus the mean cosine distance to the
    `neighbours` nearest labelled photos (deep k-nearest-neighbour open-set scoring, Sun et al. 2022). The labelled
    photos' own scores (each without itself) set the threshold that keeps `keep` of them. On Caltech-101 with 10
    classes held out, the rooted features found 46.5% of those classes' photos against 39.8% with the raw ones,
    at the same 4-5% of the others (bench/audit.py --held-out 10)."""
    from cleanlab.outlier import OutOfDistribution

    detector = OutOfDistribution(params={"k": max(1, min(neighbours, len(labelled) - 1))})
    known = detector.fit_score(features=rooted(labelled), verbose=False)
    threshold = value_at(quantile_table(torch.from_numpy(np.asarray(known, dtype=np.float64))), 1.0 - keep)
    return np.asarray(detector.score(features=rooted(unlabelled)), dtype=np.float64), threshold

