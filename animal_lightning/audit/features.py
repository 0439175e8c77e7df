"""Image features for the audit: a frozen network's penultimate layer, computed once per photo and cached.

The network is the packaged ImageNet backbone (EfficientNet-Lite0 by default: its weights install as
a Python package, so this works offline) or, with ckpt_path=, the backbone of a trained checkpoint.
Each photo's feature vector is stored under its content digest in shards of a folder keyed by the
network, its weights and its preprocessing; a second audit of the same photos runs no network at all.
Shards are numpy arrays (no pickle) written atomically, the digest list last, so a killed audit
leaves complete shards only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from animal_lightning.atomic import atomic_file, write_text_atomic
from animal_lightning.audit.fingerprints import file_digest
from animal_lightning.data.datasets import ImageFiles
from animal_lightning.data.transforms import PreprocessSpec
from animal_lightning.data.workers import loader_workers, worker_context
from animal_lightning.errors import ModelConfigError
from animal_lightning.hardware import cpu_has_fast_bf16
from animal_lightning.models import probe
from animal_lightning.models.backbones import create_backbone
from animal_lightning.models.classifier import AnimalClassifier

log = logging.getLogger(__name__)

FEATURE_VERSION = 1


@dataclass
class FeatureNetwork:
    net: nn.Module
    head: nn.Module  # the layer whose input is the feature vector
    spec: PreprocessSpec
    key: str  # what the features depend on: network, weights, preprocessing (and the precision, added below)
    description: str
    bf16: bool = False  # bf16 autocast (where the CPU computes bf16 natively)

    def with_precision(self, precision: str) -> FeatureNetwork:
        """precision: auto (bf16 where the CPU has it natively, else fp32) or 32. Part of the cache key: bf16
        and fp32 features differ in their last digits, and a cache shared by two machines must not mix them."""
        if str(precision) not in ("auto", "32"):
            raise ModelConfigError(f"features.precision={precision!r} is not one of: auto, 32")
        bf16 = str(precision) == "auto" and cpu_has_fast_bf16()
        return replace(self, bf16=bf16, key=json.dumps({"network": self.key, "bf16": bf16}),
                       description=f"{self.description}, {'bf16' if bf16 else 'fp32'}")

    @classmethod
    def from_backbone(cls, name: str, pretrained: bool = True, image_size: int | None = None,
                      resize_mode: str = "crop") -> FeatureNetwork:
        backbone = create_backbone(name, 2, pretrained=pretrained, image_size=image_size)
        spec = replace(backbone.spec, resize_mode=resize_mode)
        weights = "ImageNet" if pretrained else "random (untrained)"
        key = json.dumps({"backbone": name, "pretrained": bool(pretrained), "spec": spec.to_dict(),
                          "version": FEATURE_VERSION}, sort_keys=True)
        return cls(backbone.net, backbone.net.get_submodule(backbone.head_names[0]), spec, key,
                   f"{name} ({weights} weights, {spec.input_size} px)")

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> FeatureNetwork:
        model, _ = AnimalClassifier.from_checkpoint(path)
        key = json.dumps({"checkpoint": file_digest(path), "spec": model.preprocess.to_dict(),
                          "version": FEATURE_VERSION}, sort_keys=True)
        return cls(model.net, model.class_head, model.preprocess, key,
                   f"{model.hparams.backbone} of checkpoint {path} ({model.preprocess.input_size} px)")

    @property
    def folder_name(self) -> str:
        return "features-" + hashlib.sha256(self.key.encode()).hexdigest()[:16]


class FeatureCache:
    """Feature vectors by content digest: <cache>/features-<key>/NNNNN.npy + NNNNN.json (its digests)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.vectors: dict[str, np.ndarray] = {}
        for listing in sorted(folder.glob("*.json")):
            with contextlib.suppress(Exception):  # a damaged shard is skipped (its photos are computed again)
                digests = json.loads(listing.read_text())
                array = np.load(listing.with_suffix(".npy"), allow_pickle=False)
                if isinstance(digests, list) and array.ndim == 2 and len(array) == len(digests):
                    self.vectors.update(zip(map(str, digests), array, strict=True))

    def add(self, digests: Sequence[str], array: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        number = len(list(self.folder.glob("*.json")))
        while (self.folder / f"{number:05d}.json").exists():
            number += 1
        with atomic_file(self.folder / f"{number:05d}.npy") as handle:
            np.save(handle, array.astype(np.float32), allow_pickle=False)
        write_text_atomic(self.folder / f"{number:05d}.json", json.dumps(list(digests)))
        self.vectors.update(zip(digests, array, strict=True))


@torch.no_grad()
def _compute(network: FeatureNetwork, paths: Sequence[str], batch_size: int, num_workers: int | str
             ) -> tuple[np.ndarray, list[str]]:
    """Features of `paths` and, per photo, why it could not be decoded now ("" when it was)."""
    workers = loader_workers(num_workers, len(paths), batch_size)
    loader = DataLoader(ImageFiles([Path(p) for p in paths], network.spec), batch_size=batch_size,
                        num_workers=workers, multiprocessing_context=worker_context(workers))
    net = network.net.eval().to(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if network.bf16 else contextlib.nullcontext()
    chunks, reasons = [], []
    with probe.capture_inputs(network.head) as captured:
        for images, errors in loader:
            with autocast:
                net(images.contiguous(memory_format=torch.channels_last))
            chunks.append(captured.pop().flatten(1).float().numpy())
            reasons.extend(errors)
    return np.concatenate(chunks), reasons


def image_features(network: FeatureNetwork, paths: Sequence[str], digests: Sequence[str], cache_root: Path | None,
                   batch_size: int = 32, num_workers: int | str = "auto") -> tuple[np.ndarray, int]:
    """N x D features of `paths` (each a decodable image) and how many were computed (not cached)."""
    cache = FeatureCache(cache_root / network.folder_name) if cache_root is not None else None
    known = cache.vectors if cache else {}
    todo = list(dict.fromkeys(d for d in digests if d not in known))  # a photo stored twice is computed once
    fresh: dict[str, np.ndarray] = {}
    if todo:
        path_of = {d: p for p, d in zip(paths, digests, strict=True)}
        log.info("features of %d photos with %s", len(todo), network.description)
        array, reasons = _compute(network, [path_of[d] for d in todo], batch_size, num_workers)
        fresh = dict(zip(todo, array, strict=True))
        decoded = [n for n, reason in enumerate(reasons) if not reason]  # a file changed since it was fingerprinted
        if cache is not None and decoded:
            cache.add([todo[n] for n in decoded], array[decoded])
    vectors = [fresh[d] if d in fresh else known[d] for d in digests]
    return (np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)), len(todo)


def rooted(features: np.ndarray) -> np.ndarray:
    """Square-rooted (Hellinger) features: a few strong activations no longer decide a cosine alone. Near
    duplicates and the unknown estimate compare these (both measured better on Caltech-101, docs/benchmarks.md)."""
    return np.sqrt(np.maximum(features, 0.0)).astype(np.float32)
