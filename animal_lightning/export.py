"""Export a trained model for serving: ONNX or TorchScript, dynamic batch, probabilities out.

Beside the model goes `<name>.json` with the class names and preprocessing, which is all a server
needs to turn a photo into the model's input and its output into a class.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from animal_lightning.errors import ModelConfigError
from animal_lightning.models import AnimalClassifier

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


class Probabilities(nn.Module):
    """The backbone plus softmax, in fp32 and the default memory layout (portable to any runtime)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(images), dim=1)


def export_model(model: AnimalClassifier, checkpoint: Path, fmt: str) -> list[Path]:
    """Write the model next to `checkpoint` as `<stem><suffix>` plus `<stem>.json`; return both paths."""
    if fmt not in FORMATS:
        raise ModelConfigError(f"export={fmt!r} is not one of: {', '.join(FORMATS)}")
    target = checkpoint.with_name(checkpoint.stem + FORMATS[fmt])
    wrapper = Probabilities(model.net.float().to(memory_format=torch.contiguous_format)).eval()
    size = model.preprocess.input_size
    example = torch.randn(2, 3, size, size)
    with torch.no_grad():
        if fmt == "onnx":
            torch.onnx.export(wrapper, (example,), str(target), input_names=["images"],
                              output_names=["probabilities"], opset_version=17, dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}})
        else:
            torch.jit.trace(wrapper, example).save(str(target))
    sidecar = checkpoint.with_name(checkpoint.stem + ".json")
    sidecar.write_text(json.dumps({"model": target.name, "input": "images: float32 N x 3 x H x W, RGB, normalised",
                                   "output": "probabilities: N x classes", "class_names": model.class_names,
                                   "backbone": model.hparams.backbone, "preprocess": model.preprocess.to_dict()},
                                  indent=1) + "\n")
    return [target, sidecar]
