"""Open-set scores, their calibration on validation images, and generalized zero-shot decisions.

Plain tensor functions shared by the LightningModule (validation calibrates, test evaluates) and by
prediction (flags and names images), so that both sides compute exactly the same thing.

- Known-class score: how much an image looks like one of the training classes, higher is more
  known. `msp` is the maximum softmax probability (Hendrycks & Gimpel 2017), `maxlogit` the largest
  logit, `energy` the log-sum-exp of the logits (Liu et al. 2020). The threshold that flags an image
  `unknown` is a quantile of the validation images' scores: keep=0.95 keeps 95% of seen-class images.
- Zero-shot evidence for the classes without training images comes from two sources: the
  pretrained network's own ImageNet head (the probability mass of the ImageNet classes a class name
  stands for, data/imagenet_names.py: a direct match, or through a hypernym the sum over the
  ImageNet classes below it, as in ConSE) and the attribute head (softmax of the compatibility over
  every class). ImageNet names what it knows; attributes share out the rest: the ImageNet mass that
  no class of the model stands for, so a photo the ImageNet head calls a killer whale or a leopard
  lends little to an attributes-only rhinoceros. Each answer remembers which source gave it.
- Calibrated stacking (Chao et al. 2016): every class gets a log-probability (seen classes: the
  trained classifier's; unseen: their evidence), and the seen classes' are lowered by a penalty
  before the argmax. The penalty is a validation quantile: the margin (best seen - best unseen) that
  keeps the same fraction of seen-class validation images seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import binary_auroc

from animal_lightning.models.metrics import MeanClassRecall

SCORES = ("msp", "maxlogit", "energy")
QUANTILE_POINTS = 201  # the calibration keeps each score's distribution at every 0.5%
SOURCE_MODES = ("both", "imagenet", "attributes")  # which sources name unseen classes (model.zero_shot_sources)
SOURCES = ("imagenet", "attributes")  # an unseen class's source: its index here (-1: no evidence at all)
_FLOOR = 1e-12  # the smallest probability stacking takes the log of: a class without evidence scores log(1e-12)


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


def unseen_evidence(compat: torch.Tensor | None, imagenet: torch.Tensor | None, num_seen: int, num_unseen: int,
                    mode: str = "both") -> tuple[torch.Tensor, torch.Tensor]:
    """Each unseen class's probability for each image (N x unseen) and its source (index into SOURCES, -1: none).

    compat: N x (seen + the unseen classes with attributes, which come first among the unseen); its softmax over
    all those classes is the attribute probability. imagenet: N x (unseen + 1), the ImageNet head's probability
    mass on each unseen class's ImageNet classes (0 for a class without any), then the mass on ImageNet classes
    that no class of the model stands for. mode picks the sources (SOURCE_MODES). With both, a class gets its
    ImageNet mass plus its attribute probability times the unclaimed mass; the larger part names its source.
    """
    if mode not in SOURCE_MODES:
        raise ValueError(f"zero-shot sources {mode!r} is not one of: {', '.join(SOURCE_MODES)}")
    present = [t for t in (compat, imagenet) if t is not None]
    rows = present[0].shape[0] if present else 0
    attributes = torch.zeros(rows, num_unseen)
    if compat is not None and mode in ("both", "attributes"):
        known = torch.softmax(compat.float(), dim=1)[:, num_seen:].cpu()
        attributes[:, : known.shape[1]] = known
    mass, rest = torch.zeros(rows, num_unseen), torch.ones(rows, 1)
    if imagenet is not None and mode in ("both", "imagenet"):
        imagenet = imagenet.float().cpu()
        mass, rest = imagenet[:, :num_unseen], imagenet[:, num_unseen:].clamp(0.0, 1.0)
    shared = attributes * rest
    probability = mass + shared
    source = torch.where(mass >= shared, SOURCES.index("imagenet"), SOURCES.index("attributes"))
    return probability, torch.where(probability > 0, source, -1)


def stacked_scores(seen_probabilities: torch.Tensor, unseen_probabilities: torch.Tensor) -> torch.Tensor:
    """N x (seen + unseen) log-probabilities: the classifier's for the seen classes, the evidence for the unseen."""
    joined = torch.cat([seen_probabilities.float().cpu(), unseen_probabilities.float()], dim=1)
    return joined.clamp_min(_FLOOR).log()


def calibrate(scores: torch.Tensor, margins: dict[str, torch.Tensor] | None = None) -> dict:
    """What validation teaches: each score's distribution on seen-class images and, per zero-shot source mode,
    the stacking margin's."""
    stacking = {mode: quantile_table(values) for mode, values in (margins or {}).items() if len(values)}
    return {"images": int(scores.shape[0]),
            "score_quantiles": {name: quantile_table(scores[:, i]) for i, name in enumerate(SCORES)},
            "stacking_quantiles": stacking or None}


def known_threshold(calibration: dict, method: str, keep: float) -> float:
    """The score below which an image is flagged unknown, so that `keep` of validation images are not."""
    return value_at(calibration["score_quantiles"][method], 1.0 - keep)


def seen_penalty(calibration: dict, keep: float, mode: str = "both") -> float:
    """Calibrated stacking's penalty on seen classes: `keep` of validation images still choose a seen class."""
    tables = calibration.get("stacking_quantiles") or {}
    if mode not in tables:
        raise ValueError(f"this calibration has no stacking margins for zero-shot sources {mode!r} "
                         f"(it has: {', '.join(tables) or 'none'})")
    return value_at(tables[mode], 1.0 - keep)


def gzsl_predict(seen_predicted: torch.Tensor, compat: torch.Tensor, num_seen: int, penalty: float) -> torch.Tensor:
    """Class indices over seen + unseen classes (seen first, as in the columns of `compat`: scores per class,
    such as stacked_scores()).

    Calibrated stacking decides seen or unseen; a seen image keeps the classifier head's choice
    (`seen_predicted`), an unseen one gets the unseen class with the best score.
    """
    chose_seen = stacking_margin(compat, num_seen) >= penalty
    return torch.where(chose_seen, seen_predicted, best_unseen(compat, num_seen))


def best_unseen(compat: torch.Tensor, num_seen: int) -> torch.Tensor:
    """The unseen class with each image's best score (an index into seen + unseen classes)."""
    return compat[:, num_seen:].argmax(dim=1) + num_seen


def gzsl_probabilities(compat: torch.Tensor, num_seen: int, penalty: float) -> torch.Tensor:
    """Softmax over seen + unseen classes of the scores after calibrated stacking."""
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


def named_by(predicted: torch.Tensor, source: torch.Tensor, targets: torch.Tensor | None, num_seen: int,
             unseen_names: Sequence[str]) -> list[dict]:
    """Per unseen class: how many images were named it, by which source, and (with targets) how many of its
    own images there were and were named right. `source` is N x unseen (unseen_evidence())."""
    rows = []
    for k, name in enumerate(unseen_names):
        chosen = predicted == num_seen + k
        row = {"class": name, "named": int(chosen.sum())}
        for i, source_name in enumerate(SOURCES):
            row[f"by_{source_name}"] = int((chosen & (source[:, k] == i)).sum()) if len(source) else 0
        if targets is not None:
            own = targets == num_seen + k
            row["images"] = int(own.sum())
            row["correct"] = int((own & chosen).sum())
        rows.append(row)
    return rows


def format_named_by(rows: Sequence[dict]) -> str:
    """named_by()'s rows as a table, one line per unseen class."""
    width = max((len(row["class"]) for row in rows), default=5)
    labelled = bool(rows) and "images" in rows[0]
    lines = [f"  {'class':<{width}}  named  by imagenet  by attributes" + ("  images  correct" if labelled else "")]
    for row in rows:
        line = f"  {row['class']:<{width}}  {row['named']:>5}  {row['by_imagenet']:>11}  {row['by_attributes']:>13}"
        if "images" in row:
            line += f"  {row['images']:>6}  {row['correct']:>7}"
        lines.append(line)
    return "\n".join(lines)
