"""Image transforms built from the backbone's preprocessing spec, so nobody repeats 224 or ImageNet's mean."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """How a backbone wants its input: what the transforms read and what a checkpoint carries."""

    input_size: int  # side of the square crop the network sees
    resize_size: int  # eval: shorter side resized to this, then centre-cropped to input_size
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    resize_mode: str = "crop"  # how evaluation fits the image to the square: crop or squash (data.resize_mode)
    min_input_size: int = 16  # the smallest input the network accepts (Inception v3 in training: 299)

    def scaled_to(self, input_size: int) -> PreprocessSpec:
        """The same recipe at another input size, keeping the crop ratio (e.g. 224/256)."""
        ratio = self.resize_size / self.input_size
        return replace(self, input_size=input_size, resize_size=round(input_size * ratio))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessSpec:
        return cls(int(values["input_size"]), int(values["resize_size"]), tuple(values["mean"]),
                   tuple(values["std"]), str(values.get("interpolation", "bilinear")),
                   str(values.get("resize_mode", "crop")),  # checkpoints from before resize_mode: crop
                   int(values.get("min_input_size", 16)))


def _tail(spec: PreprocessSpec) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]


def eval_transform(spec: PreprocessSpec, resize_mode: str | None = None) -> v2.Compose:
    """crop: shorter side to resize_size, centre crop (torchvision's eval recipe);
    squash: straight to input_size x input_size, aspect ratio lost (the report's recipe).
    resize_mode None: the spec's own (what the model was trained and validated with)."""
    resize_mode = resize_mode or spec.resize_mode
    interpolation = InterpolationMode(spec.interpolation)
    if resize_mode == "crop":
        head = [v2.Resize(spec.resize_size, interpolation=interpolation, antialias=True),
                v2.CenterCrop(spec.input_size)]
    elif resize_mode == "squash":
        head = [v2.Resize((spec.input_size, spec.input_size), interpolation=interpolation, antialias=True)]
    else:
        raise ValueError(f"data.resize_mode={resize_mode!r} is not one of: crop, squash")
    return v2.Compose(head + _tail(spec))


POLICIES = ("trivial_augment", "randaugment", "none")
RESIZE_MODES = ("crop", "squash")


def train_transform(spec: PreprocessSpec, *, enabled: bool = True, crop_scale: Sequence[float] = (0.35, 1.0),
                    hflip: bool = True, policy: str = "none", random_erasing: float = 0.0,
                    train_crop_ratio: float = 1.0) -> v2.Compose:
    """RandomResizedCrop + flip + an auto-augment policy + random erasing; enabled=False: the eval transform.
    The arguments are `data.augment` (conf/data/animals.yaml), with the same defaults.

    train_crop_ratio < 1 trains on smaller crops than the evaluation crop (FixRes, as in torchvision's
    recipe: 176 px training crops for a 224 px evaluation): faster steps, and the apparent object size
    at test time matches training better. MixUp/CutMix (`data.mix`) mix whole batches: the DataModule's collate.
    """
    if policy not in POLICIES:
        raise ValueError(f"data.augment.policy={policy!r} is not one of: {', '.join(POLICIES)}")
    if not 0.0 <= random_erasing <= 1.0:
        raise ValueError(f"data.augment.random_erasing={random_erasing} must be a probability in [0, 1]")
    if not enabled:
        return eval_transform(spec)
    interpolation = InterpolationMode(spec.interpolation)
    # never below the backbone's minimum: Inception's auxiliary head fails on crops under 299 px
    size = max(spec.min_input_size, round(spec.input_size * train_crop_ratio))
    steps: list = [v2.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=interpolation, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if policy == "trivial_augment":
        steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
    elif policy == "randaugment":
        steps.append(v2.RandAugment(interpolation=interpolation))
    steps += _tail(spec)
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value=0))  # after Normalize: 0 is the mean colour
    return v2.Compose(steps)
