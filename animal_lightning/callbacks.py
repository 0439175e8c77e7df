"""Trainer callbacks that show what the model learned: confusion, worst mistakes, and the augmented inputs.

`EvaluationReport` counts a confusion matrix and keeps the most confident mistakes while validation
and test run (from the logits each step returns: no second pass over the data). At the end of each
validation it sends the matrix, the mistakes and the most confused pairs to TensorBoard; at test it
also writes them into the run folder as PNG and CSV. `AugmentationSamples` shows the first training
batch, exactly as the network receives it (crops, flips, MixUp/CutMix included). `EMA` is
Lightning's moving average of the weights with a decay that warms up, so short runs average too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from matplotlib.figure import Figure
from torchmetrics.classification import MulticlassConfusionMatrix

from animal_lightning import reports
from animal_lightning.atomic import write_text_atomic
from animal_lightning.compat import foreach_lerp_
from animal_lightning.distributed import gather_objects
from animal_lightning.errors import ModelConfigError

log = logging.getLogger(__name__)


class WarmupEMAUpdate:
    """AveragedModel's multi-tensor update: decay min(decay, (1 + n) / (warmup + n)) at the n-th average.

    warmup=0: always `decay`. Floating-point tensors move towards the model's by lerp (in their own
    dtype: the rate is a Python float, not rounded to bf16); integer and bool buffers (BatchNorm's
    batch counter) take the model's value. A module-level class, so the callback pickles (ddp_spawn).
    """

    def __init__(self, decay: float, warmup: float):
        if not 0.0 <= decay <= 1.0:
            raise ModelConfigError(f"callbacks.ema.decay={decay} must be in [0, 1] (e.g. 0.998)")
        if warmup < 0:
            raise ModelConfigError(f"callbacks.ema.warmup={warmup} must be >= 0 (e.g. 10; 0: a fixed decay)")
        self.decay, self.warmup = float(decay), float(warmup)

    def rate(self, num_averaged: int) -> float:
        """The decay at the n-th average (n = 1 at the first one after the initial copy)."""
        if self.warmup == 0:
            return self.decay
        return min(self.decay, (1 + num_averaged) / (self.warmup + num_averaged))

    @torch.no_grad()
    def __call__(self, averaged: list[torch.Tensor], current: list[torch.Tensor],
                 num_averaged: torch.Tensor | int) -> None:
        weight = 1.0 - self.rate(int(num_averaged))
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        if floats:
            foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
        for a, c in zip(averaged, current, strict=True):
            if not a.is_floating_point():
                a.copy_(c)


class EMA(WeightAveraging):
    """An exponential moving average of the weights (Lightning's weight averaging), with the decay warmed up.

    After n updates the decay is min(decay, (1 + n) / (warmup + n)), as TensorFlow's EfficientNet
    training did: early on the average spans about the last tenth of the steps, and it reaches the
    full horizon of 1 / (1 - decay) steps only once the run is long enough for it. A fixed decay of
    0.999 over a 400-step fine-tune keeps 0.999^400 = 67% of the initial weights (a random head) in
    the average that validation scores. warmup=0: the fixed decay. When to update follows Lightning's
    EMAWeightAveraging: every `update_every_n_steps` steps from `update_starting_at_step`, or every
    epoch from `update_starting_at_epoch`.
    """

    def __init__(self, decay: float = 0.998, warmup: float = 10.0, update_every_n_steps: int = 1,
                 update_starting_at_step: int | None = None, update_starting_at_epoch: int | None = None,
                 device: torch.device | str | int | None = None, use_buffers: bool = True):
        self.update = WarmupEMAUpdate(decay, warmup)  # checks both settings first; a module-level class: picklable
        super().__init__(device=device, use_buffers=use_buffers, multi_avg_fn=self.update)
        self.update_every_n_steps = int(update_every_n_steps)
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is not None and (self.update_starting_at_step is None or step_idx >= self.update_starting_at_step) \
                and self.update_every_n_steps > 0 and step_idx % self.update_every_n_steps == 0:
            return True
        return epoch_idx is not None and self.update_starting_at_epoch is not None and \
            epoch_idx >= self.update_starting_at_epoch


def _figure_loggers(trainer: Trainer) -> list:
    """The loggers that take images (TensorBoard's SummaryWriter has add_figure; CSV does not)."""
    return [logger.experiment for logger in trainer.loggers if hasattr(logger.experiment, "add_figure")]


class EvaluationReport(Callback):
    """Confusion matrix, per-class table, confused pairs and a grid of the worst mistakes.

    Validation (every `every_n_epochs`): TensorBoard images `val/confusion_matrix` and
    `val/misclassified`, text `val/confused_pairs`. Test: the same under `test/`, plus in `output_dir`
    confusion_matrix.png/.csv, per_class.csv, confused_pairs.csv and misclassified.png. Only images of
    training classes count (novel test classes are the open-set report's business). Under DDP the counts
    of all ranks are summed; the DataModule's evaluation loaders give each image to exactly one rank.
    """

    def __init__(self, output_dir: str | None = None, every_n_epochs: int = 1, worst_images: int = 16,
                 top_pairs: int = 10, max_plotted_classes: int = reports.MAX_PLOTTED_CLASSES):
        if every_n_epochs < 1:
            raise ValueError(f"callbacks.evaluation_report.every_n_epochs={every_n_epochs} must be at least 1")
        self.output_dir = Path(output_dir) if output_dir else None
        self.every_n_epochs = int(every_n_epochs)
        self.worst_images = int(worst_images)
        self.top_pairs = int(top_pairs)
        self.max_plotted_classes = int(max_plotted_classes)
        self._confusion: MulticlassConfusionMatrix | None = None  # counted while a stage runs, None otherwise
        self._worst: list[dict] = []
        self.last: dict[str, Any] = {}  # the latest report per stage: confusion, per_class, pairs (for tests)

    # -- collecting --------------------------------------------------------------------------------
    def _active(self, trainer: Trainer, stage: str) -> bool:
        if stage == "test":
            return True
        if trainer.sanity_checking:
            return False
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None  # -1: no last epoch
        last_epoch = epochs is not None and trainer.current_epoch + 1 >= epochs
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0 or last_epoch

    def _start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        n = len(pl_module.class_names)
        # novel test classes (targets >= n) are counted by the open-set report, not here: ignore_index=-1 drops them
        self._confusion = MulticlassConfusionMatrix(n, ignore_index=-1, validate_args=False).to(pl_module.device) \
            if self._active(trainer, stage) else None
        self._worst = []

    def _collect(self, pl_module: LightningModule, outputs: Any, batch: Any) -> None:
        if self._confusion is None or not isinstance(outputs, dict) or "logits" not in outputs:
            return
        num_seen = self._confusion.num_classes
        targets = outputs["targets"].detach()
        self._confusion.update(outputs["logits"].detach().argmax(1), torch.where(targets < num_seen, targets, -1))
        # one copy to the host per batch, not a device sync per number read
        logits, targets = outputs["logits"].detach().float().cpu(), targets.cpu()
        seen = targets < num_seen
        if not seen.any():
            return
        logits, targets, images = logits[seen], targets[seen], batch[0][seen.to(batch[0].device)]
        probabilities = F.softmax(logits, dim=1)
        confidence, predicted = probabilities.max(dim=1)
        wrong = (predicted != targets).nonzero().flatten()
        if not len(wrong) or not self.worst_images:
            return
        floor = self._worst[-1]["confidence"] if len(self._worst) >= self.worst_images else -1.0
        wrong = wrong[confidence[wrong] > floor]
        wrong = wrong[torch.argsort(confidence[wrong], descending=True)][: self.worst_images]
        if not len(wrong):
            return
        pictures = reports.to_uint8_images(images[wrong.to(images.device)], pl_module.preprocess)
        for k, i in enumerate(wrong.tolist()):
            self._worst.append({"confidence": float(confidence[i]), "picture": pictures[k],
                                "true": int(targets[i]), "predicted": int(predicted[i]),
                                "true_probability": float(probabilities[i, targets[i]])})
        self._worst = sorted(self._worst, key=lambda item: -item["confidence"])[: self.worst_images]

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(pl_module, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(pl_module, outputs, batch)

    # -- reporting ---------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._confusion is None:
            return
        # Every rank takes part in the reductions (torchmetrics sums the counts); only rank zero draws and writes.
        n = self._confusion.num_classes
        counted = self._confusion.update_called or trainer.world_size > 1  # under DDP every rank joins compute()
        confusion = self._confusion.compute().long().cpu() if counted else torch.zeros(n, n, dtype=torch.long)
        worst = sorted((item for rank in gather_objects(self._worst) for item in rank),
                       key=lambda item: -item["confidence"])[: self.worst_images]
        self._confusion, self._worst = None, []
        if not trainer.is_global_zero or int(confusion.sum()) == 0:
            return
        names = pl_module.class_names
        pairs = reports.confused_pairs(confusion, names, self.top_pairs)
        table = reports.per_class_table(confusion, names)
        self.last[stage] = {"confusion": confusion, "per_class": table, "pairs": pairs}
        where = "test set" if stage == "test" else f"validation, epoch {trainer.current_epoch}"
        matrix = reports.confusion_figure(confusion, names, f"confusion matrix ({where})", self.max_plotted_classes)
        mistakes = self._mistakes_figure(worst, names, where) if worst else None
        step = trainer.global_step
        for writer in _figure_loggers(trainer):
            writer.add_figure(f"{stage}/confusion_matrix", matrix, global_step=step, close=False)
            if mistakes is not None:
                writer.add_figure(f"{stage}/misclassified", mistakes, global_step=step, close=False)
            writer.add_text(f"{stage}/confused_pairs", "    " + reports.format_pairs(pairs).replace("\n", "\n    "),
                            global_step=step)
        if stage == "test":
            self._write_files(confusion, table, pairs, matrix, mistakes)

    def _mistakes_figure(self, worst: list[dict], names: list[str], where: str) -> Figure:
        titles = [f"true: {names[item['true']]} {item['true_probability']:.0%}\n"
                  f"predicted: {names[item['predicted']]} {item['confidence']:.0%}" for item in worst]
        return reports.image_grid_figure([item["picture"] for item in worst], titles,
                                         f"most confident mistakes ({where})")

    def _write_files(self, confusion, table, pairs, matrix: Figure, mistakes: Figure | None) -> None:
        if self.output_dir is None:
            return
        out = self.output_dir
        names = [row["class"] for row in table]
        write_text_atomic(out / "confusion_matrix.csv", reports.confusion_csv(confusion, names))
        write_text_atomic(out / "per_class.csv", reports.rows_csv(table))
        write_text_atomic(out / "confused_pairs.csv", reports.rows_csv(pairs, ["true", "predicted", "count"]))
        reports.save_figure(matrix, out / "confusion_matrix.png")
        if mistakes is not None:
            reports.save_figure(mistakes, out / "misclassified.png")
        log.info("most confused classes on the test set:\n%s", reports.format_pairs(pairs))
        log.info("wrote confusion_matrix.png/.csv, per_class.csv, confused_pairs.csv%s to %s",
                 ", misclassified.png" if mistakes is not None else "", out)


class AugmentationSamples(Callback):
    """The first training batch as the network gets it, captioned with its labels: TensorBoard image
    `train/augmented_samples` and `augmented_samples.png` in `output_dir`."""

    def __init__(self, output_dir: str | None = None, count: int = 32):
        self.output_dir = Path(output_dir) if output_dir else None
        self.count = int(count)
        self._done = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._done or self.count <= 0:
            return
        self._done = True  # once per fit, also when resuming mid-run
        if not trainer.is_global_zero:
            return
        images, targets = batch[0][: self.count], batch[1][: self.count]
        names = pl_module.class_names
        figure = reports.image_grid_figure(reports.to_uint8_images(images, pl_module.preprocess),
                                           [_label(target, names) for target in targets],
                                           f"augmented training samples ({images.shape[-1]}x{images.shape[-2]} px)")
        for writer in _figure_loggers(trainer):
            writer.add_figure("train/augmented_samples", figure, global_step=trainer.global_step, close=False)
        if self.output_dir is not None:
            reports.save_figure(figure, self.output_dir / "augmented_samples.png")


def _label(target: torch.Tensor, names: list[str]) -> str:
    """A class name, or for a MixUp/CutMix soft target the two largest parts with their weights."""
    if target.ndim == 0:
        return names[int(target)]
    weights, classes = target.float().topk(min(2, len(target)))
    parts = [f"{names[int(c)]} {float(w):.0%}" for w, c in zip(weights, classes, strict=True) if w > 0.005]
    return "\n".join(parts)
