"""The LightningModule: a backbone from the factory, cross-entropy, torchmetrics, optimizer and schedule.

Its hyperparameters are plain data (class names, backbone name, sizes), so a checkpoint can be
loaded with torch.load(weights_only=True) and still rebuild the model and its preprocessing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import re
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from animal_lightning.data.transforms import PreprocessSpec
from animal_lightning.errors import CheckpointError, ModelConfigError
from animal_lightning.models import openset, probe
from animal_lightning.models.backbones import create_backbone

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "animal_lightning"  # the checkpoint entry that prediction reads
CHECKPOINT_FORMAT = 1
HEAD_INITS = ("random", "probe")
RNG_KEY = "rng_states"  # the random streams at the save, for resuming exactly where training was


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


def gather_objects(value) -> list:
    """Every process's `value` under DDP (all_gather_object), or [value] in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, value)
        return everyone
    return [value]


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
        head_init: str = "random",  # probe: fit the new head as a linear probe on frozen features first
        freeze_bn: bool = False,  # True: BatchNorm layers keep their running statistics all through training
        label_smoothing: float = 0.0,
        aux_loss_weight: float = 0.4,
        channels_last: bool = True,
        class_weights: list[float] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        attributes: dict | None = None,  # AttributeTable.to_dict(seen): adds the zero-shot attribute head
        attribute_loss_weight: float = 1.0,
        open_set_score: str = "msp",
        open_set_keep: float = 0.95,
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
            "head_init": str(head_init), "freeze_bn": bool(freeze_bn),
            "label_smoothing": float(label_smoothing),
            "aux_loss_weight": float(aux_loss_weight), "channels_last": bool(channels_last),
            "class_weights": class_weights, "attributes": _plain_attributes(attributes, class_names),
            "attribute_loss_weight": float(attribute_loss_weight),
            "open_set_score": str(open_set_score), "open_set_keep": float(open_set_keep),
        })
        if open_set_score not in openset.SCORES:  # a typo fails here, before any training
            raise ModelConfigError(f"model.open_set_score={open_set_score!r} is not one of: "
                                   f"{', '.join(openset.SCORES)}")
        if head_init not in HEAD_INITS:
            raise ModelConfigError(f"model.head_init={head_init!r} is not one of: {', '.join(HEAD_INITS)}")
        if not 0.0 < float(open_set_keep) < 1.0:
            raise ModelConfigError(f"model.open_set_keep={open_set_keep} must be between 0 and 1 (e.g. 0.95)")
        built = create_backbone(backbone, len(class_names), pretrained=pretrained, weights_path=weights_path,
                                image_size=image_size, load_weights=load_weights)
        self.net = built.net
        self.preprocess: PreprocessSpec = built.spec
        self._head_ids = {id(p) for p in built.head_parameters()}
        self.head_names = built.head_names  # the classifier layers, named by the backbone factory
        self.cam_layer_name = built.cam_layer  # Grad-CAM's target layer, named by the backbone factory
        self.calibration: dict | None = None  # open-set and stacking quantiles from the last validation
        self._stats: list[dict] = []  # per-batch scores gathered over an evaluation epoch
        self._features: torch.Tensor | None = None
        self.probe_result: dict | None = None  # what head_init=probe fitted (l2, val_acc, images, seconds)
        attributes = self.hparams.attributes
        if attributes:
            # The image features are the classifier head's input: the factory names the head, a hook reads it.
            head = self.class_head
            head.register_forward_hook(self._keep_features)
            self.attribute_head = nn.Linear(head.in_features, len(attributes["predicates"]))
            self.attribute_logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            targets, unit = _attribute_targets(attributes["matrix"])
            self.register_buffer("attribute_targets", targets, persistent=False)  # in [0, 1], for the BCE loss
            self.register_buffer("class_attributes", unit, persistent=False)  # unit length, for compatibility
            self._head_ids |= {id(p) for p in (*self.attribute_head.parameters(), self.attribute_logit_scale)}
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.register_buffer("class_weights", torch.tensor(class_weights) if class_weights else None,
                             persistent=False)
        n = len(class_names)
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_metrics = eval_metrics(n, "val/")
        self.test_metrics = eval_metrics(n, "test/")
        # nan_strategy="disable": a diverging run must show a NaN loss, not the mean of its finite batches
        self.eval_loss = nn.ModuleDict({"val": MeanMetric(nan_strategy="disable"),
                                        "test": MeanMetric(nan_strategy="disable")})
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # saved in checkpoints, so a resumed run remembers its best
        if self.hparams.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    @property
    def unseen_class_names(self) -> list[str]:
        """Classes known only by their attributes (no training images): zero-shot candidates."""
        return list(self.hparams.attributes["unseen"]) if self.hparams.attributes else []

    @property
    def all_class_names(self) -> list[str]:
        """Seen then unseen: the columns of the compatibility scores and the generalized zero-shot labels."""
        return self.class_names + self.unseen_class_names

    # -- forward and loss ---------------------------------------------------------------------------
    @property
    def class_head(self) -> nn.Linear:
        """The last Linear layer, which gives the class logits (named by the backbone factory)."""
        return self.net.get_submodule(self.head_names[0])

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits; an auxiliary head's output (Inception in training) is not part of the answer."""
        output = self.net(self._prepare(images))
        return output.logits if hasattr(output, "logits") else output

    def _keep_features(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._features = inputs[0]

    def attribute_logits(self) -> torch.Tensor | None:
        """After a forward pass: N x attributes logits (each attribute predicted on its own, as in DAP)."""
        if not self.hparams.attributes:
            return None
        features, self._features = self._features, None  # no activations (or autograd graph) kept past their use
        if features is None:
            raise RuntimeError("attribute_logits() reads the features of the last forward pass: call the model first")
        return self.attribute_head(features.flatten(1)).float()

    def compatibility(self, attribute_logits: torch.Tensor | None = None) -> torch.Tensor | None:
        """After a forward pass: N x (seen + unseen) attribute-compatibility scores, None without attributes.

        Each attribute is predicted independently (sigmoid, trained by binary cross-entropy against the
        class's attribute values, which is what lets unseen combinations of known attributes be named),
        and the cosine between the predicted attribute vector and each class's vector, times a learned
        temperature, scores the class (trained by cross-entropy over the seen classes).
        """
        if attribute_logits is None:
            attribute_logits = self.attribute_logits()
        if attribute_logits is None:
            return None
        with torch.autocast(self.device.type, enabled=False):  # fp32: bf16 would round the stacking margins
            predicted = F.normalize(torch.sigmoid(attribute_logits.float()), dim=1)
            scale = self.attribute_logit_scale.float().exp().clamp(max=100.0)
            return scale * predicted @ self.class_attributes.T

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
        attribute_logits = self.attribute_logits()
        if attribute_logits is not None:
            compat = self.compatibility(attribute_logits)
            class_targets = targets if targets.ndim == 2 else F.one_hot(targets, len(self.class_names)).float()
            wanted = class_targets @ self.attribute_targets[: len(self.class_names)]  # mixed batches mix attributes
            attribute_loss = F.binary_cross_entropy_with_logits(attribute_logits, wanted) + \
                F.cross_entropy(compat[:, : len(self.class_names)], targets)
            self.log("train/attribute_loss", attribute_loss, on_step=False, on_epoch=True, batch_size=len(targets))
            loss = loss + self.hparams.attribute_loss_weight * attribute_loss
        hard_targets = targets.argmax(dim=1) if targets.ndim == 2 else targets  # mixup/cutmix: soft targets
        self.train_acc(logits, hard_targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(targets))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(targets))
        return loss

    def _evaluate(self, batch, metrics: MetricCollection, stage: str) -> dict[str, torch.Tensor]:
        """Seen-class metrics on images of training classes; every image's open-set and zero-shot scores kept
        for the epoch's end (targets >= the number of classes are novel: unseen classes of the test set).
        Returns the logits and targets, for callbacks (the confusion matrix and worst-mistakes grid)."""
        images, targets = batch
        logits = self(images)
        compat = self.compatibility()
        num_seen = len(self.class_names)
        seen = targets < num_seen
        if seen.any():
            # a metric, not self.log: summed over the ranks once, at the epoch's end (none of them may skip it)
            self.eval_loss[stage].update(self._loss(logits[seen], targets[seen]).detach(), weight=int(seen.sum()))
            metrics.update(logits[seen], targets[seen])
        stats = {"scores": openset.known_scores(logits).cpu(), "predicted": logits.argmax(1).cpu(),
                 "targets": targets.cpu()}
        if compat is not None:
            stats["compat"] = compat.float().cpu()
        self._stats.append(stats)
        return {"logits": logits.detach(), "targets": targets}

    def _gathered(self) -> dict[str, torch.Tensor]:
        """This epoch's per-image scores from every process (DDP), so each rank calibrates on all images."""
        stats, self._stats = self._stats, []
        stats = [batch for rank in gather_objects(stats) for batch in rank]
        return {key: torch.cat([s[key] for s in stats]) for key in stats[0]} if stats else {}

    def _calibrate(self) -> None:
        """Validation images are all seen: their score distributions set the unknown threshold and penalty."""
        stats = self._gathered()
        if not stats:
            return
        num_seen = len(self.class_names)
        compat = stats.get("compat")
        margins = openset.stacking_margin(compat, num_seen) if compat is not None and self.unseen_class_names \
            else None
        self.calibration = openset.calibrate(stats["scores"], margins)
        if compat is not None:
            hits = compat[:, :num_seen].argmax(1) == stats["targets"]
            self.log("val/acc_attributes", hits.float().mean())  # how well attributes alone name seen classes

    def _open_set_metrics(self) -> dict[str, float]:
        """Test images of classes outside training: AUROC of seen vs novel, and generalized zero-shot
        accuracy (seen, unseen, their harmonic mean H, per-class averaged as in Xian et al. 2017)."""
        stats = self._gathered()
        num_seen = len(self.class_names)
        if not stats or not (stats["targets"] >= num_seen).any():
            return {}
        keep, method = self.hparams.open_set_keep, self.hparams.open_set_score
        threshold = openset.known_threshold(self.calibration, method, keep) if self.calibration else None
        known_score = stats["scores"][:, openset.SCORES.index(method)]
        report = openset.open_set_report(known_score, stats["targets"], num_seen, threshold)
        values = {"auroc_unknown": report["auroc"], "novel_flagged_unknown": report.get("novel_flagged_unknown")}
        compat = stats.get("compat")
        if compat is not None and self.unseen_class_names and self.calibration:
            predicted = openset.gzsl_predict(stats["predicted"], compat, num_seen,
                                             openset.seen_penalty(self.calibration, keep))
            values.update(openset.zero_shot_report(predicted, stats["targets"], num_seen, len(self.all_class_names),
                                                   openset.best_unseen(compat, num_seen)))
        return {f"test/{name}": value for name, value in values.items() if value is not None}

    def validation_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._stats = []
        else:
            self._calibrate()
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log("val/loss", self.eval_loss["val"].compute(), prog_bar=True)
        self.eval_loss["val"].reset()
        self.log_dict({name: value for name, value in values.items() if name != "val/acc"})
        self.log("val/acc", values["val/acc"], prog_bar=True)
        if not self.trainer.sanity_checking:
            self.val_acc_best(values["val/acc"])
        self.log("val/acc_best", self.val_acc_best.compute() if self.val_acc_best.update_called
                 else values["val/acc"], prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        # Whether any process saw a test image of a training class: every rank must take the same branch,
        # since computing a metric is a collective operation under DDP.
        seen = torch.tensor(float(self.test_metrics["acc"].update_called), device=self.device)
        if float(self.trainer.strategy.reduce(seen, reduce_op="sum")) > 0:
            self.log_dict(self.test_metrics.compute())
            self.log("test/loss", self.eval_loss["test"].compute())
        self.test_metrics.reset()
        self.eval_loss["test"].reset()
        self.log_dict(self._open_set_metrics())

    predict_tta: str | None = None  # "hflip": average with the mirrored image (set by prediction)

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """probabilities (N x classes), the three open-set scores (N x 3), and with attributes the
        compatibility with every seen and unseen class; tta=hflip averages over the mirrored image."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        views = [images, images.flip(-1)] if self.predict_tta == "hflip" else [images]
        probabilities, logits, compat = [], [], []
        for view in views:
            out = self(view).float()
            probabilities.append(torch.softmax(out, dim=1))
            logits.append(out)
            compat.append(self.compatibility())
        result = {"probabilities": torch.stack(probabilities).mean(0),
                  "scores": openset.known_scores(torch.stack(logits).mean(0))}
        if compat[0] is not None:
            result["compat"] = torch.stack(compat).mean(0)
        return result

    # -- fine-tuning: start from a linear probe's head, or train the new head alone first ------------
    def on_fit_start(self) -> None:
        if self.hparams.head_init == "probe" and self.trainer.global_step == 0:  # not when resuming
            self._fit_probe_head()

    def probe_features(self, batches, autocast: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the class head receives for every image of `batches` (N x D, float32, CPU) and the labels.

        The network runs in eval mode under `autocast` (default: the Trainer's precision when attached,
        else full precision), on the model's device, with the model's own input preparation.
        """
        if autocast is None:
            autocast = self.trainer.precision_plugin.forward_context if self._trainer is not None \
                else contextlib.nullcontext
        return probe.head_inputs(self.net, self.class_head, batches, device=self.device, prepare=self._prepare,
                                 autocast=autocast)

    def _fit_probe_head(self) -> None:
        """LP-FT: the new head becomes a linear probe of the (pretrained) features before any step."""
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "probe_dataloader"):
            raise ModelConfigError("model.head_init=probe needs the project's DataModule (probe_dataloader): "
                                   "set model.head_init=random")
        start = time.perf_counter()
        train = self.probe_features(datamodule.probe_dataloader("train"))
        val = self.probe_features(datamodule.probe_dataloader("val"))
        weight, bias, info = probe.fit_linear_probe(train, val, len(self.class_names),
                                                    label_smoothing=self.hparams.label_smoothing)
        fitted = {self.class_head: (weight, bias)}
        if self.hparams.attributes:  # the attribute head too starts from what the features already tell
            attributes = self.attribute_targets[train[1]].cpu()
            fitted[self.attribute_head] = probe.fit_attribute_probe(train[0], attributes, info["l2"])
        # every process fitted the same data; the first one's heads are everyone's (identical start under DDP)
        fitted = dict(zip(fitted, self.trainer.strategy.broadcast(list(fitted.values()), src=0), strict=True))
        with torch.no_grad():
            for layer, (weight, bias) in fitted.items():
                layer.weight.copy_(weight.to(layer.weight.dtype).view_as(layer.weight))
                layer.bias.copy_(bias.to(layer.bias.dtype))
        self.probe_result = {**info, "images": len(train[1]), "seconds": round(time.perf_counter() - start, 1)}
        log.info("linear probe head: %d training images, %d features, L2 %g, validation accuracy %.4f (%.0f s)",
                 len(train[1]), train[0].shape[1], info["l2"], info["val_acc"], self.probe_result["seconds"])

    def on_train_epoch_start(self) -> None:
        frozen = self.current_epoch < self.hparams.freeze_backbone_epochs
        for parameter in self.net.parameters():
            if id(parameter) not in self._head_ids:
                parameter.requires_grad_(not frozen)
        # A frozen backbone keeps its BatchNorm statistics too: the head must see stable features.
        # Modes set here persist (Lightning restores them after validation), so thawing resets them.
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train(not (frozen or self.hparams.freeze_bn))
        if self.hparams.freeze_backbone_epochs and self.current_epoch == self.hparams.freeze_backbone_epochs:
            log.info("epoch %d: backbone unfrozen, training the whole network", self.current_epoch)

    # -- optimisation --------------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("AnimalClassifier needs an optimizer factory to train (the optimizer config group)")
        optimizer = self.optimizer_factory(params=parameter_groups(self, self._head_ids,
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
            "calibration": self.calibration,  # open-set threshold and stacking penalty, from validation
        }
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY) or {}
        self.calibration = meta.get("calibration")
        if meta.get("preprocess"):
            self.preprocess = PreprocessSpec.from_dict(meta["preprocess"])  # with its resize mode
        if RNG_KEY in checkpoint and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            # resuming: the random streams continue where they were, so the next epoch shuffles and augments as
            # it would have without the interruption (with data.num_workers=0; workers restart their own streams)
            set_rng_states(checkpoint[RNG_KEY])

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> tuple[AnimalClassifier, dict]:
        """Rebuild a trained model from its checkpoint alone: (model, the checkpoint's metadata).

        torch.load(weights_only=True) refuses pickled objects, so a planted payload cannot run; a
        file that is damaged, not a checkpoint, or not one of ours is a one-line CheckpointError.
        Pretrained weights are never downloaded: the state dict has the trained ones.
        """
        checkpoint, meta = read_checkpoint(path)
        hparams = dict(checkpoint["hyper_parameters"])
        model = cls(**hparams, load_weights=False)
        result = model.load_state_dict(checkpoint["state_dict"], strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f"checkpoint {path} does not match its own backbone {hparams.get('backbone')} "
                                  f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
        model.preprocess = PreprocessSpec.from_dict(meta["preprocess"])
        model.calibration = meta.get("calibration")
        return model.eval(), meta


def rng_states() -> dict:
    """torch's, numpy's and Python's global random states as tensors and plain numbers (what
    torch.load(weights_only=True) reads back)."""
    import random

    version, state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": [version, list(state), gauss],
              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()  # dropout and drop-path on the GPU draw from these
    return states


def set_rng_states(states: dict) -> None:
    """Put back what rng_states() saved."""
    import random

    torch.set_rng_state(states["torch"])
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> tuple[dict, dict]:
    """(the checkpoint, its animal-lightning metadata), loaded with torch.load(weights_only=True), which refuses
    pickled objects, so a planted payload cannot run. A file that is missing, damaged, not a checkpoint, or not
    one of ours is a one-line CheckpointError. mmap: leave the tensors on disk (to read the metadata only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: pass ckpt_path=/path/to/best.ckpt")
    damaged = f"checkpoint {path} is damaged or not a PyTorch checkpoint; pass a .ckpt written by train.py"
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(damaged)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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
    return checkpoint, meta


def check_resumable(path: str | os.PathLike, model: AnimalClassifier) -> None:
    """Resuming `path` into `model` must find the same classes and backbone; say so in one line if not
    (instead of Lightning's state-dict traceback)."""
    checkpoint, meta = read_checkpoint(path, mmap=True)
    saved_classes, backbone = list(meta.get("class_names") or []), checkpoint["hyper_parameters"].get("backbone")
    if backbone != model.hparams.backbone:
        raise CheckpointError(f"checkpoint {path} holds a {backbone} and this run builds a {model.hparams.backbone}: "
                              f"pass model=... for {backbone} to resume it, or drop ckpt_path to start afresh")
    if saved_classes != model.class_names:
        def preview(names: list[str]) -> str:
            return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")

        raise CheckpointError(f"checkpoint {path} was trained on {len(saved_classes)} classes "
                              f"({preview(saved_classes)}) and this run's data has {len(model.class_names)} "
                              f"({preview(model.class_names)}): "
                              "resume with the data it was trained on, or drop ckpt_path to start afresh")
    saved, own = checkpoint["state_dict"], model.state_dict()
    differences = [f"{k} is not in the checkpoint" for k in own if k not in saved] + \
        [f"{k} is only in the checkpoint" for k in saved if k not in own] + \
        [f"{k} is {tuple(saved[k].shape)} there and {tuple(own[k].shape)} here" for k in own
         if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
    if differences:  # e.g. attributes switched on or off, another attribute count, another ViT input size
        raise CheckpointError(f"checkpoint {path} does not fit this run's model ({differences[0]}; "
                              f"{len(differences)} difference(s)): resume with the settings it was trained with, "
                              "or drop ckpt_path to start afresh")


def _plain_attributes(attributes: dict | None, class_names: list[str]) -> dict | None:
    """The attribute table as plain lists (safe to load with weights_only), checked against the classes."""
    if not attributes:
        return None
    seen, unseen = [str(c) for c in attributes["seen"]], [str(c) for c in attributes["unseen"]]
    source = attributes.get("source") or "the attribute table"
    if seen != class_names:
        raise ModelConfigError(f"{source}: its seen classes {seen[:3]}... differ from the model's "
                               f"{class_names[:3]}...; pass the table made for these training classes")
    matrix = [[float(v) for v in row] for row in attributes["matrix"]]
    predicates = [str(p) for p in attributes["predicates"]]
    if len(matrix) != len(seen) + len(unseen) or any(len(row) != len(predicates) for row in matrix):
        raise ModelConfigError(f"{source}: attribute matrix is {len(matrix)} x {len(matrix[0]) if matrix else 0}, "
                               f"expected {len(seen) + len(unseen)} classes x {len(predicates)} attributes")
    return {"predicates": predicates, "seen": seen, "unseen": unseen, "matrix": matrix,
            "source": str(attributes.get("source", ""))}


def _attribute_targets(matrix: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class attribute values scaled into [0, 1] (AwA2's continuous matrix runs 0..100, the binary one 0/1),
    and the same rows at unit length."""
    values = torch.tensor(matrix, dtype=torch.float32)
    low, high = float(values.min()), float(values.max())
    scaled = (values - min(low, 0.0)) / max(high - min(low, 0.0), 1e-12)
    return scaled, F.normalize(scaled, dim=1)


def from_timm(name: str, **kwargs) -> AnimalClassifier:
    """`model=timm model.name=<any timm model>`: the classifier with backbone timm/<name>."""
    kwargs["backbone"] = f"timm/{name}"
    return AnimalClassifier(**kwargs)
