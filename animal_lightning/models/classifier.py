"""The LightningModule: a backbone from the factory, cross-entropy, torchmetrics, optimizer and schedule.

Its hyperparameters are plain data (class names, backbone name, sizes), so a checkpoint can be
loaded with torch.load(weights_only=True) and still rebuild the model and its preprocessing.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from animal_lightning.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_KEY,
    RNG_KEY,
    read_checkpoint,
    rng_states,
    set_rng_states,
)
from animal_lightning.data.transforms import RESIZE_MODES, PreprocessSpec
from animal_lightning.errors import CheckpointError, ModelConfigError
from animal_lightning.models import openset, probe
from animal_lightning.models.backbones import IMAGENET_CLASSES, create_backbone
from animal_lightning.models.metrics import PerImageScores, eval_metrics
from animal_lightning.models.optim import parameter_groups
from animal_lightning.quiet import quiet_lightning

log = logging.getLogger(__name__)

HEAD_INITS = ("random", "probe")
# head: the pretrained ImageNet-1k classifier reads the fine-tuned features; copy: a frozen copy of the whole
# pretrained network reads the image (twice the forward passes, immune to fine-tuning drift); none
IMAGENET_MODES = ("head", "copy", "none")


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
        label_smoothing: float = 0.1,
        aux_loss_weight: float = 0.4,  # Inception v3's auxiliary classifier loss (set in conf/model/inception_v3.yaml)
        channels_last: bool = True,
        class_weights: list[float] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        attributes: dict | None = None,  # AttributeTable.to_dict(seen): adds the zero-shot attribute head
        attribute_loss_weight: float = 1.0,
        open_set_score: str = "msp",
        open_set_keep: float = 0.95,
        unseen_classes: list[str] | None = None,  # zero-shot candidates without attributes (ImageNet knowledge only)
        imagenet_map: dict | None = None,  # class name -> ImageNet-1k class indices (data/imagenet_names.py)
        imagenet_knowledge: str = "copy",  # copy | head | none: what of the pretrained ImageNet network to keep
        zero_shot_sources: str = "both",  # which sources name unseen classes: both | imagenet | attributes
        zero_shot_keep: float = 0.98,  # calibrated stacking's penalty keeps this share of validation images seen
        resize_mode: str = "crop",  # data.resize_mode: how evaluation fits an image to the square (crop | squash)
        load_weights: bool = True,  # False: the checkpoint being restored has the weights; fetch none
    ):
        super().__init__()
        # Lightning saves the arguments as they are when this is called: plain data (str, numbers, lists,
        # dicts), which a checkpoint loaded with weights_only=True reads back.
        class_names = [str(name) for name in class_names]
        weights_path = str(weights_path) if weights_path else None
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if len(class_weights) != len(class_names):
                raise ValueError(f"{len(class_weights)} class weights for {len(class_names)} classes")
        attributes = _plain_attributes(attributes, class_names)
        unseen_classes = [str(name) for name in unseen_classes or []
                          if not attributes or str(name) not in attributes["unseen"]]
        imagenet_map = _plain_imagenet_map(imagenet_map)
        imagenet_knowledge = _imagenet_mode(imagenet_knowledge)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "load_weights"])
        if open_set_score not in openset.SCORES:  # a typo fails here, before any training
            raise ModelConfigError(f"model.open_set_score={open_set_score!r} is not one of: "
                                   f"{', '.join(openset.SCORES)}")
        if head_init not in HEAD_INITS:
            raise ModelConfigError(f"model.head_init={head_init!r} is not one of: {', '.join(HEAD_INITS)}")
        if not 0.0 < float(open_set_keep) < 1.0:
            raise ModelConfigError(f"model.open_set_keep={open_set_keep} must be between 0 and 1 (e.g. 0.95)")
        if not 0.0 < float(zero_shot_keep) < 1.0:
            raise ModelConfigError(f"model.zero_shot_keep={zero_shot_keep} must be between 0 and 1 (e.g. 0.98)")
        if resize_mode not in RESIZE_MODES:
            raise ModelConfigError(f"data.resize_mode={resize_mode!r} is not one of: {', '.join(RESIZE_MODES)}")
        if zero_shot_sources not in openset.SOURCE_MODES:
            raise ModelConfigError(f"model.zero_shot_sources={zero_shot_sources!r} is not one of: "
                                   f"{', '.join(openset.SOURCE_MODES)}")
        if set(unseen_classes) & set(class_names):
            raise ModelConfigError(f"data.unseen_classes lists {sorted(set(unseen_classes) & set(class_names))}, which "
                                   "have training images: list only classes without a train/ folder")
        built = create_backbone(backbone, len(class_names), pretrained=pretrained, weights_path=weights_path,
                                image_size=image_size, load_weights=load_weights)
        self.net = built.net
        # the one computation of the preprocessing: the backbone's, with the data's resize mode; the DataModule
        # and prediction read it from here, and the checkpoint records it
        self.preprocess: PreprocessSpec = replace(built.spec, resize_mode=resize_mode)
        # what the model summary runs once at the start of fitting: its FLOPs and in/out sizes columns
        self.example_input_array = torch.zeros(2, 3, built.spec.input_size, built.spec.input_size)
        self._head_ids = {id(p) for p in built.head_parameters()}
        self.head_names = built.head_names  # the classifier layers, named by the backbone factory
        self.cam_layer_name = built.cam_layer  # Grad-CAM's target layer, named by the backbone factory
        self.calibration: dict | None = None  # open-set and stacking quantiles from the last validation
        self.probe_result: dict | None = None  # what head_init=probe fitted (l2, val_acc, images, seconds)
        self.zero_shot_table: list[dict] | None = None  # the last test's per-unseen-class answers (openset.named_by)
        self._keep_imagenet_head(built.imagenet_head, load_weights)
        attributes = self.hparams.attributes
        if attributes:
            # The image features are the classifier head's input (the factory names the head): see run().
            head = self.class_head
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
        # every image's open-set (and zero-shot) scores over an evaluation epoch: calibration and open-set report
        self.image_scores = nn.ModuleDict({"val": PerImageScores(), "test": PerImageScores()})
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # saved in checkpoints, so a resumed run remembers its best
        if self.hparams.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
            if hasattr(self, "imagenet_net"):
                self.imagenet_net = self.imagenet_net.to(memory_format=torch.channels_last)

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    @property
    def unseen_class_names(self) -> list[str]:
        """Classes without training images, the zero-shot candidates: those with attributes, then those named by
        data.unseen_classes alone (ImageNet knowledge only)."""
        return self.attribute_unseen_names + list(self.hparams.unseen_classes or [])

    @property
    def attribute_unseen_names(self) -> list[str]:
        """The unseen classes with attributes: the first unseen columns of compat."""
        return list(self.hparams.attributes["unseen"]) if self.hparams.attributes else []

    @property
    def all_class_names(self) -> list[str]:
        """Seen then unseen: the generalized zero-shot labels (compat's columns are a prefix of them)."""
        return self.class_names + self.unseen_class_names

    @property
    def zero_shot_modes(self) -> list[str]:
        """The source modes this model can name unseen classes with (openset.SOURCE_MODES), "both" first."""
        modes = []
        if self.has_imagenet_evidence:
            modes.append("imagenet")
        if self.attribute_unseen_names:
            modes.append("attributes")
        return ["both", *modes] if modes else []

    @property
    def has_imagenet_evidence(self) -> bool:
        return hasattr(self, "imagenet_members")

    def _keep_imagenet_head(self, head: tuple[torch.Tensor, torch.Tensor] | None, load_weights: bool) -> None:
        """What the pretrained network knew of ImageNet's classes, kept frozen and saved in checkpoints: the original
        head (buffers) or a copy of the whole pretrained network (model.imagenet_knowledge=copy), and which of its
        classes each unseen class stands for (hparams.imagenet_map)."""
        mode = self.hparams.imagenet_knowledge
        if load_weights and mode != "none" and head is None:
            if self.hparams.pretrained or self.hparams.weights_path:
                log.info("%s: its pretrained head is not an ImageNet-1k classifier: no ImageNet knowledge for "
                         "unseen classes", self.hparams.backbone)
            mode = "none"
        names = self.unseen_class_names
        mapped = {name: self.hparams.imagenet_map.get(name) for name in names} if self.hparams.imagenet_map else {}
        available = mode != "none"
        blind = [name for name in self.hparams.unseen_classes if not (available and mapped.get(name))]
        keeps = available and any(mapped.values())  # no unseen class it could name: nothing to keep (nor to save)
        mode = mode if keeps else "none"
        if keeps and head is None:  # restoring: the checkpoint has the values
            head = (torch.zeros(IMAGENET_CLASSES, self.class_head.in_features), torch.zeros(IMAGENET_CLASSES))
        self.hparams.imagenet_knowledge = mode  # what the checkpoint records: whether (and how) it was kept
        if blind:
            why = "the model keeps no ImageNet head (it needs model.pretrained=true with ImageNet weights and " \
                "model.imagenet_knowledge=copy or head)" if not available else "they match no ImageNet class"
            raise ModelConfigError(f"unseen classes {', '.join(blind[:5])} have no attributes and {why}: give them "
                                   "attribute rows (data.attributes) or ImageNet classes (data.class_map), or drop "
                                   "them from data.unseen_classes")
        if mode == "head":
            self.register_buffer("imagenet_weight", head[0].float())
            self.register_buffer("imagenet_bias", head[1].float())
        if mode == "copy":  # the network as pretrained, its own head put back; never trained
            network = copy.deepcopy(self.net)
            parent, _, child = self.head_names[0].rpartition(".")
            layer = nn.Linear(head[0].shape[1], IMAGENET_CLASSES)
            layer.weight.data.copy_(head[0])
            layer.bias.data.copy_(head[1])
            setattr(network.get_submodule(parent) if parent else network, child, layer)
            self.imagenet_net = network.requires_grad_(False).eval()
        if keeps:
            # one row per unseen class (its ImageNet classes), then one for every ImageNet class that no class of
            # the model, seen or unseen, stands for: the mass attributes share out (openset.unseen_evidence)
            members = torch.zeros(len(names) + 1, IMAGENET_CLASSES)
            for k, name in enumerate(names):
                members[k, list(mapped.get(name) or [])] = 1.0
            claimed = [i for indices in self.hparams.imagenet_map.values() for i in indices]
            members[-1] = 1.0
            members[-1, claimed] = 0.0
            self.register_buffer("imagenet_members", members, persistent=False)
            # constant: DDP need not broadcast them with the BatchNorm statistics at every step (8 MB for ResNet-50)
            self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()
                                                      if name.startswith("imagenet_")]
        modes = self.zero_shot_modes
        if self.hparams.zero_shot_sources not in modes and names:
            raise ModelConfigError(f"model.zero_shot_sources={self.hparams.zero_shot_sources} but this model can "
                                   f"only use: {', '.join(modes) or 'none'}")

    # -- forward and loss ---------------------------------------------------------------------------
    @property
    def class_head(self) -> nn.Linear:
        """The last Linear layer, which gives the class logits (named by the backbone factory)."""
        return self.net.get_submodule(self.head_names[0])

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits; an auxiliary head's output (Inception in training) is not part of the answer."""
        return _logits(self.net(self._prepare(images)))

    def run(self, images: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        """The network's raw output (Inception v3 in training: logits and aux_logits) and, with an attribute
        head or the ImageNet head, the image features they read (what the class head received, N x D); None
        without either."""
        if not self.hparams.attributes and self.hparams.imagenet_knowledge != "head":
            return self.net(self._prepare(images)), None
        with probe.capture_inputs(self.class_head) as captured:
            output = self.net(self._prepare(images))
        return output, captured[-1].flatten(1)

    def attribute_logits(self, features: torch.Tensor | None) -> torch.Tensor | None:
        """N x attributes logits of the image features (each attribute predicted on its own, as in DAP);
        None without an attribute head."""
        if not self.hparams.attributes or features is None:
            return None
        return self.attribute_head(features).float()

    def compatibility(self, attribute_logits: torch.Tensor | None) -> torch.Tensor | None:
        """N x (seen + unseen classes with attributes) compatibility scores of attribute_logits(); None without
        attributes.

        Each attribute is predicted independently (sigmoid, trained by binary cross-entropy against the
        class's attribute values, which is what lets unseen combinations of known attributes be named),
        and the cosine between the predicted attribute vector and each class's vector, times a learned
        temperature, scores the class (trained by cross-entropy over the seen classes).
        """
        if attribute_logits is None:
            return None
        with torch.autocast(self.device.type, enabled=False):  # fp32: bf16 would round the stacking margins
            predicted = F.normalize(torch.sigmoid(attribute_logits.float()), dim=1)
            scale = self.attribute_logit_scale.float().exp().clamp(max=100.0)
            return scale * predicted @ self.class_attributes.float().T

    def imagenet_logits(self, images: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor | None:
        """N x 1000 ImageNet-1k logits of the pretrained head (reading run()'s `features`) or, with
        imagenet_knowledge=copy, of the frozen pretrained network (reading `images`); None without ImageNet
        knowledge of any unseen class."""
        if not self.has_imagenet_evidence:
            return None
        if self.hparams.imagenet_knowledge == "copy":
            return _logits(self.imagenet_net(self._prepare(images))).float()
        if features is None:
            return None
        with torch.autocast(self.device.type, enabled=False):
            return features.float() @ self.imagenet_weight.float().T + self.imagenet_bias.float()

    def imagenet_evidence(self, imagenet_logits: torch.Tensor | None) -> torch.Tensor | None:
        """N x (unseen + 1): imagenet_logits()'s probability mass on each unseen class's ImageNet classes (0 for a
        class without any), then on the ImageNet classes no class of the model stands for; None without them."""
        if imagenet_logits is None:
            return None
        with torch.autocast(self.device.type, enabled=False):
            return torch.softmax(imagenet_logits.float(), dim=1) @ self.imagenet_members.float().T

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class indices, or against class probabilities (mixed batches)."""
        return F.cross_entropy(logits.float(), targets, weight=self.class_weights,
                               label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        output, features = self.run(images)
        if hasattr(output, "aux_logits"):  # Inception v3's auxiliary classifier, trained alongside
            logits = output.logits
            loss = self._loss(logits, targets)
            if output.aux_logits is not None:
                loss = loss + self.hparams.aux_loss_weight * self._loss(output.aux_logits, targets)
        else:
            logits, loss = output, self._loss(output, targets)
        attribute_logits = self.attribute_logits(features)
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
        output, features = self.run(images)
        logits = _logits(output)
        compat = self.compatibility(self.attribute_logits(features))
        probabilities = torch.softmax(logits.float(), dim=1) if self.unseen_class_names else None
        num_seen = len(self.class_names)
        seen = targets < num_seen
        if seen.any():
            # a metric, not self.log: summed over the ranks once, at the epoch's end (none of them may skip it)
            self.eval_loss[stage].update(self._loss(logits[seen], targets[seen]).detach(), weight=int(seen.sum()))
            metrics.update(logits[seen], targets[seen])
        self.image_scores[stage].update(openset.known_scores(logits), logits.argmax(1), targets, compat,
                                        probabilities, self.imagenet_evidence(self.imagenet_logits(images, features)))
        return {"logits": logits.detach(), "targets": targets}

    def _gathered(self, stage: str) -> dict[str, torch.Tensor]:
        """This epoch's per-image scores from every process (DDP), so each rank calibrates on all images."""
        metric = self.image_scores[stage]
        distributed = self._trainer is not None and self.trainer.world_size > 1  # every rank must take part
        values = metric.compute() if metric.update_called or distributed else {}
        metric.reset()
        return values

    def _calibrate(self) -> None:
        """Validation images are all seen: their score distributions set the unknown threshold and penalty."""
        stats = self._gathered("val")
        if not stats:
            return
        num_seen = len(self.class_names)
        margins = {mode: openset.stacking_margin(self.zero_shot_scores(stats, mode)[0], num_seen)
                   for mode in self.zero_shot_modes}
        self.calibration = openset.calibrate(stats["scores"], margins)
        compat = stats.get("compat")
        if compat is not None:
            hits = compat[:, :num_seen].argmax(1) == stats["targets"]
            self.log("val/acc_attributes", hits.float().mean())  # how well attributes alone name seen classes

    def _open_set_metrics(self) -> dict[str, float]:
        """Test images of classes outside training: AUROC of seen vs novel, and generalized zero-shot
        accuracy (seen, unseen, their harmonic mean H, per-class averaged as in Xian et al. 2017)."""
        stats = self._gathered("test")
        num_seen = len(self.class_names)
        if not stats or not (stats["targets"] >= num_seen).any():
            return {}
        keep, method = self.hparams.open_set_keep, self.hparams.open_set_score
        threshold = openset.known_threshold(self.calibration, method, keep) if self.calibration else None
        known_score = stats["scores"][:, openset.SCORES.index(method)]
        report = openset.open_set_report(known_score, stats["targets"], num_seen, threshold)
        values = {"auroc_unknown": report["auroc"], "novel_flagged_unknown": report.get("novel_flagged_unknown")}
        mode = self.hparams.zero_shot_sources
        if self.unseen_class_names and self.calibration and mode in (self.calibration.get("stacking_quantiles") or {}):
            stacked, source = self.zero_shot_scores(stats, mode)
            predicted = openset.gzsl_predict(stats["predicted"], stacked, num_seen,
                                             openset.seen_penalty(self.calibration, self.hparams.zero_shot_keep, mode))
            values.update(openset.zero_shot_report(predicted, stats["targets"], num_seen, len(self.all_class_names),
                                                   openset.best_unseen(stacked, num_seen)))
            self.zero_shot_table = openset.named_by(predicted, source, stats["targets"], num_seen,
                                                    self.unseen_class_names)
            log.info("zero-shot on the test set (sources: %s), per unseen class:\n%s", mode,
                     openset.format_named_by(self.zero_shot_table))
        return {f"test/{name}": value for name, value in values.items() if value is not None}

    def zero_shot_scores(self, values: dict[str, torch.Tensor], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated stacking's scores (N x seen+unseen log-probabilities, before the penalty) and each unseen
        class's source (N x unseen) from outputs() or the per-image scores: probabilities, compat, imagenet."""
        num_seen = len(self.class_names)
        unseen, source = openset.unseen_evidence(values.get("compat"), values.get("imagenet"), num_seen,
                                                 len(self.unseen_class_names), mode)
        return openset.stacked_scores(values["probabilities"], unseen), source

    def validation_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.image_scores["val"].reset()
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

    def network_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the networks compute from a batch, which outputs() turns into answers: the class logits, the
        features an attribute head reads (with attributes), and the ImageNet logits (with ImageNet knowledge of
        unseen classes). An inference engine (animal_lightning/engines.py) computes exactly these."""
        output, features = self.run(images)
        result = {"logits": _logits(output).float()}
        if self.hparams.attributes and features is not None:
            result["features"] = features.float()
        imagenet = self.imagenet_logits(images, features)
        if imagenet is not None:
            result["imagenet_logits"] = imagenet.float()
        return result

    def outputs(self, images: torch.Tensor, tta: str | None = None,
                engine: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """What prediction needs of a batch: probabilities (N x classes), the three open-set scores (N x 3),
        with attributes the compatibility with every seen class and unseen class that has attributes (compat) and
        each attribute's predicted probability (attributes, N x attributes), and with
        ImageNet knowledge of unseen classes their ImageNet evidence (imagenet, N x (unseen + 1)).
        tta="hflip" averages each over the image and its mirror. `engine` computes network_outputs() in its
        place (a compiled or int8 graph)."""
        if tta not in (None, "hflip"):
            raise ValueError(f"tta={tta!r} is not one of: None, hflip")
        views = [images, images.flip(-1)] if tta == "hflip" else [images]
        probabilities, logits, compat, imagenet, attributes = [], [], [], [], []
        for view in views:
            raw = engine(view) if engine is not None else self.network_outputs(view)
            out = raw["logits"].float()
            probabilities.append(torch.softmax(out, dim=1))
            logits.append(out)
            attribute_logits = self.attribute_logits(raw.get("features"))
            compat.append(self.compatibility(attribute_logits))
            attributes.append(None if attribute_logits is None else torch.sigmoid(attribute_logits))
            imagenet.append(self.imagenet_evidence(raw.get("imagenet_logits")))
        result = {"probabilities": torch.stack(probabilities).mean(0),
                  "scores": openset.known_scores(torch.stack(logits).mean(0))}
        if compat[0] is not None:
            result["compat"] = torch.stack(compat).mean(0)
            result["attributes"] = torch.stack(attributes).mean(0)  # each attribute's probability (the page shows them)
        if imagenet[0] is not None:
            result["imagenet"] = torch.stack(imagenet).mean(0)
        return result

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """outputs() of the batch's images (a batch may also carry file names or errors)."""
        return self.outputs(batch[0] if isinstance(batch, (list, tuple)) else batch)

    # -- fine-tuning: start from a linear probe's head, or train the new head alone first ------------
    def setup(self, stage: str) -> None:
        quiet_lightning()  # also in processes that DDP spawned, which never ran the entry point's set-up

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
        frozen = {id(p) for p in self.imagenet_net.parameters()} if hasattr(self, "imagenet_net") else set()
        optimizer = self.optimizer_factory(params=parameter_groups(self, self._head_ids,
                                                                   self.hparams.backbone_lr_mult, exclude=frozen))
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
            # the validation images (relative to data_root): predict.py's int8 engine calibrates on them
            "val_images": getattr(datamodule, "validation_images", None),
            "calibration": self.calibration,  # open-set threshold and stacking penalty, from validation
        }
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY) or {}
        self.calibration = meta.get("calibration")
        if meta.get("preprocess"):  # as the weights were trained (a newer timm may describe the backbone otherwise)
            self.preprocess = PreprocessSpec.from_dict(meta["preprocess"])
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
        # checkpoints from before resize_mode was a model argument: the mode their recorded preprocessing used
        hparams.setdefault("resize_mode", PreprocessSpec.from_dict(meta["preprocess"]).resize_mode)
        hparams.setdefault("imagenet_knowledge", "none")  # from before the ImageNet head was kept
        model = cls(**hparams, load_weights=False)
        result = model.load_state_dict(checkpoint["state_dict"], strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f"checkpoint {path} does not match its own backbone {hparams.get('backbone')} "
                                  f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
        model.on_load_checkpoint(checkpoint)  # the preprocessing and calibration recorded there
        return model.eval(), meta


def _logits(output) -> torch.Tensor:
    """The class logits of a network's output (Inception v3 in training returns them with aux_logits)."""
    return output.logits if hasattr(output, "logits") else output


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


def _imagenet_mode(value) -> str:
    """model.imagenet_knowledge as one of IMAGENET_MODES (true and false, as YAML may give them: head and none)."""
    if value is None or value is False:
        mode = "none"
    elif value is True:
        mode = "head"
    else:
        mode = str(value)
    if mode not in IMAGENET_MODES:
        raise ModelConfigError(f"model.imagenet_knowledge={value!r} is not one of: {', '.join(IMAGENET_MODES)}")
    return mode


def _plain_imagenet_map(imagenet_map: dict | None) -> dict | None:
    """{class name: [ImageNet-1k class indices]} as plain lists, each index checked."""
    if not imagenet_map:
        return None
    plain = {}
    for name, indices in dict(imagenet_map).items():
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < IMAGENET_CLASSES for i in indices):
            raise ModelConfigError(f"model.imagenet_map[{name!r}] has an index outside 0-{IMAGENET_CLASSES - 1} "
                                   "(a list of ImageNet-1k class indices): map classes with data.class_map instead")
        plain[str(name)] = sorted({int(i) for i in indices})
    return plain


def _attribute_targets(matrix: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class attribute values scaled into [0, 1] (AwA2's continuous matrix runs 0..100, the binary one 0/1),
    and the same rows at unit length."""
    values = torch.tensor(matrix, dtype=torch.float32)
    low, high = float(values.min()), float(values.max())
    scaled = (values - min(low, 0.0)) / max(high - min(low, 0.0), 1e-12)
    return scaled, F.normalize(scaled, dim=1)
