"""Grad-CAM: where in the photo the evidence for a class came from, as a heatmap over the image.

The CAM itself is captum's LayerGradCam (a maintained implementation: the gradient of the class
score with respect to the target layer's feature map, averaged per channel, weights the channels;
ReLU keeps the positive evidence). The target layer is named by the backbone factory
(`Recipe.cam_layer`, or timm's feature_info), so every backbone of the zoo works without a branch here;
a transformer block's tokens are shown to captum as a grid (`TokenGrid`). Heatmaps are drawn
over the image exactly as the network saw it (after resize and crop).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from animal_lightning.atomic import write_bytes_atomic
from animal_lightning.data.datasets import ImageFiles
from animal_lightning.data.workers import worker_context
from animal_lightning.errors import ModelConfigError
from animal_lightning.models import AnimalClassifier
from animal_lightning.reports import to_uint8_images

DISPLAY_SIZE = 224  # overlays of smaller inputs are enlarged to this, so a 64 px demo image is still legible


@dataclass(frozen=True)
class CamRequest:
    """One overlay to draw: image number `image` (position in the path list), for class `target`."""

    image: int
    target: int
    kind: str  # "predicted" or "true": part of the file name


class TokenGrid(nn.Module):
    """Shows captum a layer's output as a feature map: N x C x h x w passes through; the N x tokens x C output
    of a transformer block becomes N x C x side x side (leading class/register tokens set aside), which is
    what `grid` (the layer captum hooks) sees, and is put back into tokens unchanged for the layers after."""

    def __init__(self):
        super().__init__()
        self.grid = nn.Identity()

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        if output.ndim != 3:
            return self.grid(output)
        n, tokens, channels = output.shape
        side = math.isqrt(tokens)
        prefix = tokens - side * side
        spatial = self.grid(output[:, prefix:].transpose(1, 2).reshape(n, channels, side, side))
        return torch.cat([output[:, :prefix], spatial.flatten(2).transpose(1, 2)], dim=1)


def cam_cells(model: AnimalClassifier, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """N x h x w Grad-CAM at the target layer's own resolution (ReLU'd, fp32, unscaled), on the CPU.

    Runs the model in eval mode and fp32 whatever it was set to (a bf16-true prediction run leaves bf16
    weights behind), and puts its training mode back afterwards."""
    from captum.attr import LayerGradCam

    if not model.cam_layer_name:
        raise ModelConfigError(f"backbone {model.hparams.backbone} names no feature layer for Grad-CAM; "
                               "choose a model of the zoo or a timm model with feature_info")
    was_training = model.training
    model.float().eval()
    adapter = TokenGrid()
    hook = model.net.get_submodule(model.cam_layer_name).register_forward_hook(lambda _, __, out: adapter(out))
    try:
        cam = LayerGradCam(model, adapter.grid)
        with torch.autocast(images.device.type, enabled=False), torch.enable_grad():
            attribution = cam.attribute(images.float(), target=targets.long(), relu_attributions=True)
    finally:
        hook.remove()
        model.train(was_training)
    return attribution.detach()[:, 0].clamp(min=0).cpu()


def upsample(cells: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cells to N x H x W heatmaps in [0, 1], each scaled by its own maximum (bilinear, as captum does)."""
    from captum.attr import LayerAttribution

    maps = LayerAttribution.interpolate(cells[:, None], size, "bilinear")[:, 0].clamp(min=0)
    return maps / maps.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]


def gradcam(model: AnimalClassifier, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """N x H x W heatmaps in [0, 1] (each scaled by its own maximum) at the input's resolution, fp32."""
    return upsample(cam_cells(model, images, targets), tuple(images.shape[-2:]))


def peak(cells: torch.Tensor, size: tuple[int, int]) -> tuple[int, int]:
    """(x, y) input pixel at the centre of the strongest cell: upsampling spreads a border cell's value over
    a flat block, whose first pixel is not where the evidence is."""
    rows, columns = cells.shape[-2:]
    flat = int(cells.flatten().argmax())
    row, column = divmod(flat, columns)
    return int((column + 0.5) * size[1] / columns), int((row + 0.5) * size[0] / rows)


def overlay(picture: np.ndarray, heatmap: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """The picture (H x W x 3 uint8) blended with the heatmap in the jet colour map, enlarged for display."""
    colours = colormaps["jet"](heatmap.numpy())[..., :3]
    blended = (1 - alpha) * picture.astype(np.float32) / 255 + alpha * colours
    image = Image.fromarray((blended.clip(0, 1) * 255 + 0.5).astype(np.uint8))
    if image.width < DISPLAY_SIZE:
        scale = DISPLAY_SIZE / image.width
        image = image.resize((DISPLAY_SIZE, round(image.height * scale)), Image.Resampling.BICUBIC)
    return image


def safe_name(text: str, limit: int = 120) -> str:
    """Text (an image id, possibly a relative path, or a class name) as one safe file name part."""
    name = text.replace("/", "__").replace("\\", "__")
    name = re.sub(r"[^\w.+=@-]", "_", name).lstrip(".-") or "image"
    return name[-limit:]  # the end of a long path names the file best


def explain_images(model: AnimalClassifier, paths: Sequence[Path], image_ids: Sequence[str],
                   requests: Sequence[CamRequest], output_dir: Path, *, batch_size: int = 16, num_workers: int = 0,
                   device: str = "cpu") -> list[dict]:
    """Write `<image id>.<kind>-<class>.png` overlays into output_dir; returns one row per overlay (image_id,
    kind, class, probability, file, peak_x, peak_y: input pixel at the centre of the strongest cell, input_size).
    Ids that clean up to the same name (photo 1.jpg, photo_1.jpg) get -2, -3... so none is overwritten."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(device).float().eval()
    used: set[str] = set()
    wanted: dict[int, list[CamRequest]] = {}
    for request in requests:
        wanted.setdefault(request.image, []).append(request)
    order = sorted(wanted)
    loader = DataLoader(ImageFiles([paths[i] for i in order], model.preprocess), batch_size=batch_size,
                        num_workers=num_workers, multiprocessing_context=worker_context(num_workers))
    names, rows, done = model.class_names, [], 0
    for images, errors in loader:
        batch_ids = order[done: done + len(images)]
        done += len(images)
        jobs = [(k, request) for k, n in enumerate(batch_ids) if not errors[k] for request in wanted[n]]
        if not jobs:
            continue
        inputs = images[[k for k, _ in jobs]].to(device)
        targets = torch.tensor([request.target for _, request in jobs], device=device)
        with torch.no_grad():
            probabilities = torch.softmax(model(inputs).float(), dim=1).cpu()
        cells = cam_cells(model, inputs, targets)
        size = tuple(inputs.shape[-2:])
        maps = upsample(cells, size)
        pictures = to_uint8_images(inputs, model.preprocess)
        for j, (_, request) in enumerate(jobs):
            class_name = names[request.target]
            target = output_dir / _unique(f"{safe_name(image_ids[request.image])}.{request.kind}-"
                                          f"{safe_name(class_name)}", used)
            write_bytes_atomic(target, _png(overlay(pictures[j], maps[j])))
            x, y = peak(cells[j], size)
            rows.append({"image_id": image_ids[request.image], "kind": request.kind, "class": class_name,
                         "probability": round(float(probabilities[j, request.target]), 6), "file": target.name,
                         "peak_x": x, "peak_y": y, "input_size": int(inputs.shape[-1])})
    return rows


def _unique(stem: str, used: set[str]) -> str:
    name, number = f"{stem}.png", 1
    while name.lower() in used:  # case-insensitive file systems too
        number += 1
        name = f"{stem}-{number}.png"
    used.add(name.lower())
    return name


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
