"""Grad-CAM: where in the photo the evidence for a class came from, as a heatmap over the image.

The CAM itself is captum's LayerGradCam (a maintained implementation: the gradient of the class
score with respect to the target layer's feature map, averaged per channel, weights the channels;
ReLU keeps the positive evidence). The target layer is named by the backbone factory
(`Recipe.cam_layer`), so every backbone of the zoo works without a branch here. Heatmaps are drawn
over the image exactly as the network saw it (after resize and crop).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch.utils.data import DataLoader

from animal_lightning.atomic import write_bytes_atomic
from animal_lightning.models import AnimalClassifier
from animal_lightning.reports import to_uint8_images

DISPLAY_SIZE = 224  # overlays of smaller inputs are enlarged to this, so a 64 px demo image is still legible


@dataclass(frozen=True)
class CamRequest:
    """One overlay to draw: image number `image` (position in the path list), for class `target`."""

    image: int
    target: int
    kind: str  # "predicted" or "true": part of the file name


def gradcam(model: AnimalClassifier, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """N x H x W heatmaps in [0, 1] (each scaled by its own maximum) at the input's resolution, fp32."""
    from captum.attr import LayerAttribution, LayerGradCam

    layer = model.net.get_submodule(model.cam_layer_name)
    cam = LayerGradCam(model, layer)
    with torch.autocast(images.device.type, enabled=False), torch.enable_grad():
        attribution = cam.attribute(images.float(), target=targets.long(), relu_attributions=True)
        model._features = None  # the attribute head's hook kept this pass's features; not needed
        maps = LayerAttribution.interpolate(attribution.detach(), tuple(images.shape[-2:]), "bilinear")
    maps = maps[:, 0].clamp(min=0)
    peaks = maps.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
    return (maps / peaks).cpu()


def peak(heatmap: torch.Tensor) -> tuple[int, int]:
    """(x, y) pixel of the heatmap's maximum."""
    flat = int(heatmap.flatten().argmax())
    return flat % heatmap.shape[-1], flat // heatmap.shape[-1]


def overlay(picture: np.ndarray, heatmap: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """The picture (H x W x 3 uint8) blended with the heatmap in the jet colour map, enlarged for display."""
    colours = colormaps["jet"](heatmap.numpy())[..., :3]
    blended = (1 - alpha) * picture.astype(np.float32) / 255 + alpha * colours
    image = Image.fromarray((blended.clip(0, 1) * 255 + 0.5).astype(np.uint8))
    if image.width < DISPLAY_SIZE:
        scale = DISPLAY_SIZE / image.width
        image = image.resize((DISPLAY_SIZE, round(image.height * scale)), Image.Resampling.BICUBIC)
    return image


def file_stem(image_id: str) -> str:
    """An image id (possibly a relative path) as one safe file name part, without its extension."""
    stem = re.sub(r"\.[A-Za-z0-9]{2,5}$", "", image_id).replace("/", "__").replace("\\", "__")
    return re.sub(r"[^\w.+=@-]", "_", stem).lstrip(".-") or "image"


def explain_images(model: AnimalClassifier, paths: Sequence[Path], image_ids: Sequence[str],
                   requests: Sequence[CamRequest], output_dir: Path, *, batch_size: int = 16, num_workers: int = 0,
                   device: str = "cpu") -> list[dict]:
    """Write `<image>.<kind>-<class>.png` overlays into output_dir; returns one row per overlay (image_id,
    kind, class, probability, file, peak_x, peak_y in input pixels, input_size)."""
    from animal_lightning.prediction import ImageFiles

    output_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    wanted: dict[int, list[CamRequest]] = {}
    for request in requests:
        wanted.setdefault(request.image, []).append(request)
    order = sorted(wanted)
    loader = DataLoader(ImageFiles([paths[i] for i in order], model.preprocess), batch_size=batch_size,
                        num_workers=num_workers)
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
        maps = gradcam(model, inputs, targets)
        pictures = to_uint8_images(inputs, model.preprocess)
        for j, (_, request) in enumerate(jobs):
            class_name = names[request.target]
            target = output_dir / f"{file_stem(image_ids[request.image])}.{request.kind}-{file_stem(class_name)}.png"
            picture = overlay(pictures[j], maps[j])
            buffer = _png(picture)
            write_bytes_atomic(target, buffer)
            x, y = peak(maps[j])
            rows.append({"image_id": image_ids[request.image], "kind": request.kind, "class": class_name,
                         "probability": round(float(probabilities[j, request.target]), 6), "file": target.name,
                         "peak_x": x, "peak_y": y, "input_size": int(inputs.shape[-1])})
    return rows


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
