"""Open-set scores, their calibration on validation images, and generalized zero-shot decisions.

Plain tensor functions shared by the LightningModule (validation calibrates, test evaluates) and by
prediction (flags and names images), so that both sides compute exactly the same thing.

- Known-class score: how much an image looks like one of the training classes, higher is more
  known. `msp` is the maximum softmax probability (Hendrycks & Gimpel 2017), `maxlogit` the largest
  logit, `energy` the log-sum-exp of the logits (Liu et al. 2020). The threshold that flags an image
  `unknown` is a quantile of the validation images' scores: keep=0.95 keeps 95% of seen-class images.
- Calibrated stacking (Chao et al. 2016): with an attribute head, the compatibility of an image
  with every class (seen and unseen) is compared after subtracting a penalty from the seen classes'
  scores. The penalty is also a validation quantile: the margin (best seen - best unseen) that keeps
  the same fraction of seen-class validation images seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import binary_auroc

from animal_lightning.models.metrics import MeanClassRecall

SCORES = ("msp", "maxlogit", "energy")
QUANTILE_POINTS = 201  # the calibration keeps each score's distribution at every 0.5%


def known_scores(logits: torch.Tensor) -> torch.Tensor:
    """N x 3 scores (msp, maxlogit, energy) of N x C class logits; higher means more like a training class."""
    logits = logits.float()
    return torch.stack([torch.softmax(logits, dim=1).amax(dim=1), logits.amax(dim=1),
                        torch.logsumexp(logits, dim=1)], dim=1)


def stacking_margin(compat: torch.Tensor, num_seen: int) -> torch.Tensor:
    """Best seen-class compatibility minus best unseen-class compatibility, per image."""
    return compat[:, :num_seen].amax(dim=1) - compat[:, num_seen:].amax(dim=1)


def quantile_table(values: torch.Tensor) -> list[float]:
    """The values' quantiles at 0, 0.5%, ..., 100%: enough to set a threshold for any keep fraction later."""
    levels = torch.linspace(0, 1, QUANTILE_POINTS, dtype=torch.float64)
    return [float(v) for v in torch.quantile(values.double().flatten(), levels)]


def value_at(table: Sequence[float], fraction: float) -> float:
    """Linear interpolation in a quantile table: the value below which `fraction` of the images fall."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} must be in [0, 1]")
    position = fraction * (len(table) - 1)
    low = int(position)
    high = min(low + 1, len(table) - 1)
    return float(table[low] + (table[high] - table[low]) * (position - low))


def calibrate(scores: torch.Tensor, margins: torch.Tensor | None) -> dict:
    """What validation teaches: each score's and the stacking margin's distribution on seen-class images."""
    return {"images": int(scores.shape[0]),
            "score_quantiles": {name: quantile_table(scores[:, i]) for i, name in enumerate(SCORES)},
            "margin_quantiles": quantile_table(margins) if margins is not None and len(margins) else None}


def known_threshold(calibration: dict, method: str, keep: float) -> float:
    """The score below which an image is flagged unknown, so that `keep` of validation images are not."""
    return value_at(calibration["score_quantiles"][method], 1.0 - keep)


def seen_penalty(calibration: dict, keep: float) -> float:
    """Calibrated stacking's penalty on seen classes: `keep` of validation images still choose a seen class."""
    if not calibration.get("margin_quantiles"):
        raise ValueError("this calibration has no attribute margins: the model was trained without attributes")
    return value_at(calibration["margin_quantiles"], 1.0 - keep)


def gzsl_predict(seen_predicted: torch.Tensor, compat: torch.Tensor, num_seen: int, penalty: float) -> torch.Tensor:
    """Class indices over seen + unseen classes (seen first, as in compat's columns).

    Calibrated stacking decides seen or unseen; a seen image keeps the classifier head's choice
    (`seen_predicted`: the head is trained on the seen classes alone and names them more accurately
    than attributes do), an unseen one gets the unseen class whose attributes fit it best.
    """
    chose_seen = stacking_margin(compat, num_seen) >= penalty
    return torch.where(chose_seen, seen_predicted, best_unseen(compat, num_seen))


def best_unseen(compat: torch.Tensor, num_seen: int) -> torch.Tensor:
    """The unseen class whose attributes fit each image best (an index into seen + unseen classes)."""
    return compat[:, num_seen:].argmax(dim=1) + num_seen


def gzsl_probabilities(compat: torch.Tensor, num_seen: int, penalty: float) -> torch.Tensor:
    """Softmax over seen + unseen classes of the compatibility scores after calibrated stacking."""
    adjusted = compat.float().clone()
    adjusted[:, :num_seen] -= penalty
    return torch.softmax(adjusted, dim=1)


def mean_class_accuracy(predicted: torch.Tensor, targets: torch.Tensor, classes: Sequence[int]) -> float | None:
    """Per-class accuracy averaged over those of `classes` present in `targets` (Xian et al. 2017's metric):
    MeanClassRecall, the metric behind test/acc_macro, restricted to `classes`."""
    classes = list(classes)
    if not len(targets) or not classes:
        return None
    size = max(int(targets.max()), int(predicted.max()) if len(predicted) else 0, max(classes)) + 1
    metric = MeanClassRecall(size, classes=classes)
    metric.update(predicted.long(), targets.long())
    value = float(metric.compute())
    return None if math.isnan(value) else value


def harmonic_mean(seen: float | None, unseen: float | None) -> float | None:
    if seen is None or unseen is None:
        return None
    return 0.0 if seen + unseen == 0 else 2 * seen * unseen / (seen + unseen)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of `scores` separating positives (seen-class images) from the rest (torchmetrics'
    binary AUROC: the probability that a random positive scores above a random negative, ties counting half);
    None when either side has no image."""
    positive = positive.bool()
    if not positive.any() or positive.all():
        return None
    # scaled into [0, 1] in float64 (order and ties unchanged): torchmetrics would put anything outside [0, 1]
    # through a sigmoid, which in float32 makes large logits and energies tie at 1.0
    values = scores.double()
    spread = float(values.max() - values.min())
    scaled = (values - values.min()) / spread if spread > 0 else torch.zeros_like(values)
    return float(binary_auroc(scaled, positive.long()))


def open_set_report(known_score: torch.Tensor, targets: torch.Tensor, num_seen: int,
                    threshold: float | None) -> dict:
    """AUROC of seen (targets < num_seen) vs novel images, and the share of each flagged unknown
    (known_score below threshold; None without a calibration)."""
    known = targets < num_seen
    report: dict = {"auroc": auroc(known_score, known)}
    if threshold is not None:
        flagged = known_score < threshold
        report["seen_flagged_unknown"] = float(flagged[known].float().mean()) if known.any() else None
        report["novel_flagged_unknown"] = float(flagged[~known].float().mean()) if (~known).any() else None
    return report


def zero_shot_report(predicted: torch.Tensor, targets: torch.Tensor, num_seen: int, num_classes: int,
                     unseen_choice: torch.Tensor | None = None) -> dict:
    """Generalized zero-shot accuracy over seen + unseen classes: seen, unseen and their harmonic mean H,
    each per-class averaged (Xian et al. 2017). Targets >= num_classes (novel, unnamed) count in neither.
    With `unseen_choice` (best_unseen), also `acc_zsl`: unseen-class images named among the unseen classes
    alone (conventional zero-shot, per-class averaged), i.e. how well attributes name what is new."""
    seen = mean_class_accuracy(predicted, targets, range(num_seen))
    unseen = mean_class_accuracy(predicted, targets, range(num_seen, num_classes))
    report = {"acc_seen": seen, "acc_unseen": unseen, "H": harmonic_mean(seen, unseen)}
    if unseen_choice is not None:
        report["acc_zsl"] = mean_class_accuracy(unseen_choice, targets, range(num_seen, num_classes))
    return report
