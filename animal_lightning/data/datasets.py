"""Datasets of image files that never stop a run on a bad file, and the batch-level mixing collate."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import v2

from animal_lightning.data.folders import Sample
from animal_lightning.data.images import load_rgb
from animal_lightning.data.transforms import PreprocessSpec, eval_transform
from animal_lightning.errors import DataError

log = logging.getLogger(__name__)


class ImageSamples(Dataset):
    """(path, label) pairs decoded to tensors; a file that breaks after the set-up check is replaced.

    The set-up check has already left out unreadable files. A file that is deleted or damaged during
    training must still not kill an hour of work, so the next readable sample stands in and the path
    is logged once (per worker process).
    """

    def __init__(self, samples: list[Sample], transform):
        self.samples = samples
        self.transform = transform
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(min(len(self.samples), 10)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                return self.transform(load_rgb(path)), label
            except Exception as error:  # any decoder failure: report, then use a neighbour
                if path not in self._reported:
                    self._reported.add(path)
                    log.warning("unreadable image %s replaced by another sample (%s)", path, error)
        raise DataError(f"10 consecutive unreadable images from {self.samples[index][0]}: "
                        "check the dataset folder (was it moved or deleted?)")


class MixCollate:
    """Collates a batch, then mixes it with MixUp or CutMix: the targets become soft (rows sum to 1).

    A module-level class (not a closure) so that DataLoader worker processes can pickle it.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        mixes = []
        if mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=float(mixup_alpha), num_classes=num_classes))
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=float(cutmix_alpha), num_classes=num_classes))
        if not mixes:
            raise ValueError("MixCollate needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def __call__(self, batch):
        images, labels = default_collate(batch)
        return self.mix(images, labels)


class ImageFiles(Dataset):
    """Decoded, preprocessed images; an undecodable file yields zeros and its reason (the row gets the error)."""

    def __init__(self, paths: Sequence[Path], spec: PreprocessSpec):
        self.paths = [str(p) for p in paths]
        self.transform = eval_transform(spec)
        self.blank_shape = (3, spec.input_size, spec.input_size)  # what the transform returns

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_rgb(self.paths[index])), ""
        except Exception as error:
            reason = f"{type(error).__name__}: {error}".strip().replace("\n", " ")
            return torch.zeros(self.blank_shape), reason
