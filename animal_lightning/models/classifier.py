"""The LightningModule: a backbone from the factory, cross-entropy, torchmetrics, optimizer and schedule.

Its hyperparameters are plain data (class names, backbone name, sizes), so a checkpoint can be
loaded with torch.load(weights_only=True) and still rebuild the model and its preprocessing.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MaxMetric, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from animal_lightning.data.transforms import PreprocessSpec
from animal_lightning.errors import CheckpointError
from animal_lightning.models.backbones import create_backbone

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "animal_lightning"  # the checkpoint entry that prediction reads
CHECKPOINT_FORMAT = 1


class MeanClassRecall(Metric):
    """Mean over the classes present in the targets of each class's recall (accuracy on that class).

    torchmetrics' macro accuracy also averages in a 0 for a class that is predicted but absent from
    the targets; with a test set that holds only some classes that is not what "macro accuracy" means.
    """

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("support", default=torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        hits = (logits.argmax(dim=1) == targets).float()
        self.support += torch.bincount(targets, minlength=len(self.support)).float()
        self.correct += torch.bincount(targets, weights=hits, minlength=len(self.correct)).float()

    def compute(self) -> torch.Tensor:
        present = self.support > 0
        return (self.correct[present] / self.support[present]).mean()


def eval_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """The metric names every logger, checkpoint monitor and summary relies on: <prefix>acc, ..."""
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
        "acc_top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        "acc_macro": MeanClassRecall(num_classes),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    }, prefix=prefix, compute_groups=False)  # groups would let top-1 and top-5 share state when they agree


def parameter_groups(net: nn.Module, head_ids: set[int], backbone_lr_mult: float = 1.0) -> list[dict]:
    """Optimizer groups: backbone and head, each split so that biases and norm-layer parameters (1-D
    tensors) get no weight decay. Backbone groups carry `lr_mult`, applied to the optimizer's LR."""
    groups = []
    for part in ("backbone", "head"):
        params = [p for p in net.parameters() if (id(p) in head_ids) == (part == "head")]
        mult = backbone_lr_mult if part == "backbone" else 1.0
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "name": part, "lr_mult": mult})
        if no_decay:
            groups.append({"params": no_decay, "name": f"{part}_no_decay", "weight_decay": 0.0, "lr_mult": mult})
    return groups


class AnimalClassifier(LightningModule):
    def __init__(
        self,
        class_names: list[str],
        backbone: str = "resnet50",
        pretrained: bool = True,
        weights_path: str | None = None,
        image_size: int | None = None,
        freeze_backbone_epochs: int = 0,
        backbone_lr_mult: float = 1.0,
        label_smoothing: float = 0.0,
        aux_loss_weight: float = 0.4,
        channels_last: bool = True,
        class_weights: list[float] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        load_weights: bool = True,  # False: the checkpoint being restored has the weights; fetch none
    ):
        super().__init__()
        class_names = [str(name) for name in class_names]
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if len(class_weights) != len(class_names):
                raise ValueError(f"{len(class_weights)} class weights for {len(class_names)} classes")
        self.save_hyperparameters({
            "class_names": class_names, "backbone": str(backbone), "pretrained": bool(pretrained),
            "weights_path": str(weights_path) if weights_path else None,
            "image_size": int(image_size) if image_size else None,
            "freeze_backbone_epochs": int(freeze_backbone_epochs), "backbone_lr_mult": float(backbone_lr_mult),
            "label_smoothing": float(label_smoothing),
            "aux_loss_weight": float(aux_loss_weight), "channels_last": bool(channels_last),
            "class_weights": class_weights,
        })
        built = create_backbone(backbone, len(class_names), pretrained=pretrained, weights_path=weights_path,
                                image_size=image_size, load_weights=load_weights)
        self.net = built.net
        self.preprocess: PreprocessSpec = built.spec
        self._head_ids = {id(p) for p in built.head_parameters()}
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.register_buffer("class_weights", torch.tensor(class_weights) if class_weights else None,
                             persistent=False)
        n = len(class_names)
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_metrics = eval_metrics(n, "val/")
        self.test_metrics = eval_metrics(n, "test/")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # saved in checkpoints, so a resumed run remembers its best
        if self.hparams.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    # -- forward and loss ---------------------------------------------------------------------------
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits; an auxiliary head's output (Inception in training) is not part of the answer."""
        output = self.net(self._prepare(images))
        return output.logits if hasattr(output, "logits") else output

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class indices, or against class probabilities (mixed batches)."""
        return F.cross_entropy(logits.float(), targets, weight=self.class_weights,
                               label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        output = self.net(self._prepare(images))
        if hasattr(output, "aux_logits"):  # Inception v3's auxiliary classifier, trained alongside
            logits = output.logits
            loss = self._loss(logits, targets)
            if output.aux_logits is not None:
                loss = loss + self.hparams.aux_loss_weight * self._loss(output.aux_logits, targets)
        else:
            logits, loss = output, self._loss(output, targets)
        hard_targets = targets.argmax(dim=1) if targets.ndim == 2 else targets  # mixup/cutmix: soft targets
        self.train_acc(logits, hard_targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(targets))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(targets))
        return loss

    def _evaluate(self, batch, metrics: MetricCollection, stage: str) -> None:
        images, targets = batch
        logits = self(images)
        self.log(f"{stage}/loss", self._loss(logits, targets), on_epoch=True, prog_bar=stage == "val",
                 batch_size=len(targets))
        metrics.update(logits, targets)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict({name: value for name, value in values.items() if name != "val/acc"})
        self.log("val/acc", values["val/acc"], prog_bar=True)
        if not self.trainer.sanity_checking:
            self.val_acc_best(values["val/acc"])
        self.log("val/acc_best", self.val_acc_best.compute() if self.val_acc_best.update_called
                 else values["val/acc"], prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    predict_tta: str | None = None  # "hflip": average with the mirrored image (set by prediction)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        probabilities = torch.softmax(self(images).float(), dim=1)
        if self.predict_tta == "hflip":
            probabilities = (probabilities + torch.softmax(self(images.flip(-1)).float(), dim=1)) / 2
        return probabilities

    # -- fine-tuning: train the new head alone first -------------------------------------------------
    def on_train_epoch_start(self) -> None:
        frozen = self.current_epoch < self.hparams.freeze_backbone_epochs
        for parameter in self.net.parameters():
            if id(parameter) not in self._head_ids:
                parameter.requires_grad_(not frozen)
        # A frozen backbone keeps its BatchNorm statistics too: the head must see stable features.
        # Modes set here persist (Lightning restores them after validation), so thawing resets them.
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train(not frozen)
        if self.hparams.freeze_backbone_epochs and self.current_epoch == self.hparams.freeze_backbone_epochs:
            log.info("epoch %d: backbone unfrozen, training the whole network", self.current_epoch)

    # -- optimisation --------------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("AnimalClassifier needs an optimizer factory to train (the optimizer config group)")
        optimizer = self.optimizer_factory(params=parameter_groups(self.net, self._head_ids,
                                                                   self.hparams.backbone_lr_mult))
        for group in optimizer.param_groups:
            group["lr"] *= group["lr_mult"]
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=total,
                                           steps_per_epoch=max(1, total // epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- what prediction needs, in the checkpoint ----------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "class_names": self.class_names,
            "backbone": self.hparams.backbone,
            "preprocess": self.preprocess.to_dict(),
            # where the training data was, so `python predict.py` can default to its test folder
            "data_root": str(Path(datamodule.root).resolve()) if hasattr(datamodule, "root") else None,
            "test_labels": getattr(datamodule, "test_labels_path", None),
        }

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> tuple[AnimalClassifier, dict]:
        """Rebuild a trained model from its checkpoint alone: (model, the checkpoint's metadata).

        torch.load(weights_only=True) refuses pickled objects, so a planted payload cannot run; a
        file that is damaged, not a checkpoint, or not one of ours is a one-line CheckpointError.
        Pretrained weights are never downloaded: the state dict has the trained ones.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} not found: pass ckpt_path=/path/to/best.ckpt")
        damaged = (f"checkpoint {path} is damaged or not a PyTorch checkpoint; "
                   "pass a .ckpt written by train.py")
        if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
            raise CheckpointError(damaged)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(f"checkpoint {path} holds pickled objects{what} that safe loading refuses, since "
                                  "they could run code; only load checkpoints written by train.py") from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
            raise CheckpointError(f"{damaged} ({type(error).__name__})") from None
        meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
        if not isinstance(meta, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
            raise CheckpointError(f"{path} is not an animal-lightning checkpoint (no class names or preprocessing "
                                  "inside); pass a .ckpt written by train.py")
        hparams = dict(checkpoint["hyper_parameters"])
        model = cls(**hparams, load_weights=False)
        result = model.load_state_dict(checkpoint["state_dict"], strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f"checkpoint {path} does not match its own backbone {hparams.get('backbone')} "
                                  f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
        model.preprocess = PreprocessSpec.from_dict(meta["preprocess"])
        return model.eval(), meta
