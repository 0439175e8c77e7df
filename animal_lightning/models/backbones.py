"""Backbone factory: a name gives a network with a fresh head for our classes, plus its preprocessing.

Every architecture-specific fact lives in one `Recipe` row: which torchvision builder, which weights
enum (whose metadata also gives the input size, resize, mean and std), and which Linear layers are
the classifier head. Nothing downstream branches on the architecture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from animal_lightning.data.transforms import PreprocessSpec
from animal_lightning.errors import ModelConfigError, WeightsError


@dataclass(frozen=True)
class Recipe:
    builder: str  # torchvision.models builder name
    weights: type[tvm.WeightsEnum]
    heads: tuple[str, ...]  # dotted paths of the Linear layers re-made for our number of classes
    cam_layer: str  # the last spatial feature map, where Grad-CAM looks (dotted path)
    # Builder arguments that match how the ImageNet weights were trained (used with weights_path too).
    pretrained_kwargs: dict = field(default_factory=dict)
    scratch_kwargs: dict = field(default_factory=dict)
    min_input_size: int = 32  # smaller inputs shrink a feature map below a kernel somewhere


RECIPES: dict[str, Recipe] = {
    "resnet18": Recipe("resnet18", tvm.ResNet18_Weights, ("fc",), "layer4"),
    "resnet50": Recipe("resnet50", tvm.ResNet50_Weights, ("fc",), "layer4"),
    "resnet101": Recipe("resnet101", tvm.ResNet101_Weights, ("fc",), "layer4"),
    "vgg16": Recipe("vgg16", tvm.VGG16_Weights, ("classifier.6",), "features.29"),  # ReLU of the last conv
    # Inception v3 trains with an auxiliary classifier; its ImageNet weights expect transform_input.
    "inception_v3": Recipe("inception_v3", tvm.Inception_V3_Weights, ("fc", "AuxLogits.fc"), "Mixed_7c",
                           pretrained_kwargs={"aux_logits": True, "transform_input": True, "init_weights": False},
                           scratch_kwargs={"aux_logits": True, "init_weights": True},
                           min_input_size=299),  # the auxiliary classifier's 5x5 pooling needs 299 px
}


@dataclass
class Backbone:
    net: nn.Module
    spec: PreprocessSpec
    head_names: tuple[str, ...]
    cam_layer: str  # dotted path of the layer Grad-CAM explains

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for name in self.head_names for p in self.net.get_submodule(name).parameters()]


def available() -> list[str]:
    return sorted(RECIPES)


def recipe_for(name: str) -> Recipe:
    if name not in RECIPES:
        raise ModelConfigError(f"unknown backbone {name!r}: choose one of {', '.join(available())} "
                               "(e.g. model=resnet50)")
    return RECIPES[name]


def preprocess_spec(name: str, image_size: int | None = None) -> PreprocessSpec:
    """The backbone's own preprocessing (from its weights metadata), optionally at another input size."""
    meta = recipe_for(name).weights.DEFAULT.transforms()
    minimum = recipe_for(name).min_input_size
    spec = PreprocessSpec(input_size=int(meta.crop_size[0]), resize_size=int(meta.resize_size[0]),
                          mean=tuple(meta.mean), std=tuple(meta.std), interpolation=meta.interpolation.value,
                          min_input_size=minimum)
    if image_size is None:
        return spec
    if int(image_size) < minimum:
        raise ModelConfigError(f"model.image_size={image_size} is too small for {name}: use at least {minimum}")
    return spec.scaled_to(int(image_size))


def _load_local_weights(net: nn.Module, name: str, weights_path: str | os.PathLike) -> None:
    path = Path(weights_path).expanduser()
    hint = f"model.weights_path should be a torchvision {name} ImageNet state dict (e.g. {_weights_file(name)})"
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found: {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"cannot read weights file {path} ({type(error).__name__}): {hint}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} is not a state dict of tensors: {hint}")
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys[:3], result.unexpected_keys[:3]
        raise WeightsError(f"weights file {path} does not fit {name} (missing {missing}, unexpected {unexpected}): "
                           f"{hint}")


def _weights_file(name: str) -> str:
    return os.path.basename(recipe_for(name).weights.DEFAULT.url)


def _replace_heads(net: nn.Module, heads: tuple[str, ...], num_classes: int) -> None:
    for dotted in heads:
        parent_name, _, child = dotted.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"head {dotted} of {type(net).__name__} is {type(old).__name__}, expected Linear")
        setattr(parent, child, nn.Linear(old.in_features, num_classes))


def create_backbone(name: str, num_classes: int, *, pretrained: bool = False,
                    weights_path: str | os.PathLike | None = None, image_size: int | None = None,
                    load_weights: bool = True) -> Backbone:
    """Build `name` for `num_classes`, starting from ImageNet weights (downloaded or local) or from scratch.

    load_weights=False builds the same architecture (ImageNet variant included, e.g. Inception's
    input transform) without fetching weights: for restoring a checkpoint that has its own.
    """
    recipe = recipe_for(name)
    if num_classes < 2:
        raise ModelConfigError(f"a classifier needs at least two classes, got {num_classes}")
    if (pretrained or weights_path) and not load_weights:
        net = tvm.get_model(recipe.builder, weights=None, **recipe.pretrained_kwargs)
    elif weights_path:
        net = tvm.get_model(recipe.builder, weights=None, **recipe.pretrained_kwargs)
        _load_local_weights(net, name, weights_path)
    elif pretrained:
        weights = recipe.weights.DEFAULT
        try:
            net = tvm.get_model(recipe.builder, weights=weights)
        except Exception as error:  # URLError, HTTPError, hash mismatch, disk full...
            raise WeightsError(
                f"could not get pretrained {name} weights from {weights.url} ({type(error).__name__}: {error}); "
                f"offline? set model.pretrained=false to train from scratch, or download {_weights_file(name)} "
                "elsewhere and set model.weights_path=/path/to/it") from error
    else:
        net = tvm.get_model(recipe.builder, weights=None, **recipe.scratch_kwargs)
    _replace_heads(net, recipe.heads, num_classes)
    return Backbone(net=net, spec=preprocess_spec(name, image_size), head_names=recipe.heads,
                    cam_layer=recipe.cam_layer)
