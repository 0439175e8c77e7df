"""The metrics that the test phase, validation and predict.py all score with: torchmetrics, and what it lacks.

`eval_metrics` is the one collection behind test/acc, test/acc_top5, test/acc_macro and test/f1_macro and
behind predict.py's accuracy, top-5 and macro accuracy on labelled folders; under DDP torchmetrics sums
the states across processes. `MeanClassRecall` is the macro accuracy torchmetrics does not have, and
`PerImageScores` keeps every evaluated image's scores for the calibration and the open-set report.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.utilities import dim_zero_cat


class MeanClassRecall(Metric):
    """Mean over the classes present in the targets of each class's recall (accuracy on that class).

    torchmetrics' macro recall also averages in a 0 for a class that is predicted but absent from the
    targets; with a test set that holds only some classes that is not what "macro accuracy" means.
    `classes`: average over these classes only (those of them present), e.g. the unseen classes of a
    generalized zero-shot test. update() takes logits (N x C) or predicted class indices (N).
    """

    full_state_update = False

    def __init__(self, num_classes: int, classes: Sequence[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("support", default=torch.zeros(num_classes), dist_reduce_fx="sum")
        self.classes = None if classes is None else [int(c) for c in classes]

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        predicted = predictions.argmax(dim=1) if predictions.ndim == 2 else predictions
        hits = (predicted == targets).float()
        self.support += torch.bincount(targets, minlength=len(self.support)).float()
        self.correct += torch.bincount(targets, weights=hits, minlength=len(self.correct)).float()

    def compute(self) -> torch.Tensor:
        """The mean recall; NaN when none of the classes has an image."""
        present = self.support > 0
        if self.classes is not None:
            chosen = torch.zeros_like(present)
            chosen[self.classes] = True
            present &= chosen
        return (self.correct[present] / self.support[present]).mean()


def eval_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """The metric names every logger, checkpoint monitor and summary relies on: <prefix>acc, ..."""
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
        "acc_top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        "acc_macro": MeanClassRecall(num_classes),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    }, prefix=prefix, compute_groups=False)  # groups would let top-1 and top-5 share state when they agree


class PerImageScores(Metric):
    """Every evaluated image's open-set scores (N x 3), predicted class, target and, with unseen classes, what
    names them (attribute compatibility, class probabilities, ImageNet evidence): what the calibration and the
    open-set report are computed from.
    Under DDP torchmetrics gathers them from every process (rank order), so each rank sees all images."""

    full_state_update = False
    FIELDS = ("scores", "predicted", "targets", "compat", "probabilities", "imagenet")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in self.FIELDS:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, predicted: torch.Tensor, targets: torch.Tensor,
               compat: torch.Tensor | None = None, probabilities: torch.Tensor | None = None,
               imagenet: torch.Tensor | None = None) -> None:
        self.scores.append(scores.float())
        self.predicted.append(predicted.long())
        self.targets.append(targets.long())
        for name, value in (("compat", compat), ("probabilities", probabilities), ("imagenet", imagenet)):
            if value is not None:
                getattr(self, name).append(value.float())

    def compute(self) -> dict[str, torch.Tensor]:
        """The fields as CPU tensors, images in order; a field nobody updated (compat without attributes) is left
        out, and without any image the answer is {}. (Under DDP torchmetrics turns an empty list into an empty
        tensor when it gathers: both count as empty.)"""
        values = {}
        for name in self.FIELDS:
            state = getattr(self, name)  # a list of batches, or after a DDP gather one tensor
            value = dim_zero_cat(state) if not isinstance(state, list) or state else None
            if value is not None and value.numel():
                values[name] = value.cpu()
        return values if "targets" in values else {}
