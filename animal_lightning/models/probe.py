"""A linear probe: the pretrained network's frozen features and an L2-regularised logistic regression.

Fine-tuning every layer from a random head damages pretrained features before the head is any good
(Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"); starting from the probe's head
(LP-FT) keeps what the features know. `model.head_init=probe` fits this head before the first
training step: one pass over the training images with the evaluation transform, then L-BFGS on
the standardised features, the regularisation chosen on the validation images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # penalties tried (per image, on standardised features)


@contextlib.contextmanager
def capture_inputs(module: nn.Module):
    """Within the block, each call of `module` appends its (first) input to the list this yields; the hook
    is removed on leaving, so nothing outlives the forward pass that needed it."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _, inputs, output: captured.append(inputs[0]))
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()  # not inference_mode: the features then feed an autograd fit
def head_inputs(net: nn.Module, head: nn.Linear, batches: Iterable, device: torch.device,
                prepare=lambda images: images, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """What `head` receives for every image of `batches` (N x D, float32 on the CPU) and the labels."""
    features, labels = [], []
    was_training = net.training
    net.eval()
    try:
        with capture_inputs(head) as captured:
            for images, targets in batches:
                with autocast():
                    net(prepare(images.to(device)))
                features.append(captured.pop().flatten(1).float().cpu())
                labels.append(targets.cpu())
    finally:
        net.train(was_training)
    return torch.cat(features), torch.cat(labels)


def _fit(features: torch.Tensor, targets: torch.Tensor, outputs: int, l2: float, max_iter: int,
         loss=F.cross_entropy) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(outputs, features.shape[1], requires_grad=True)
    bias = torch.zeros(outputs, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = loss(features @ weight.T + bias, targets) + 0.5 * l2 * weight.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _standardise(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return features.mean(0), features.std(0).clamp_min(1e-6)


def fit_linear_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None,
                     num_classes: int, max_iter: int = 300,
                     label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A Linear layer's (weight, bias) for raw features, and what was chosen: {"l2", "val_acc", "train_acc"}.

    Features are standardised for the fit (one penalty suits every backbone) and the scaling is folded
    back into the weights. `label_smoothing` fits the loss that fine-tuning will use, so training starts
    where it would put the head on these features (an over-confident head would first be shrunk). Each
    penalty of L2_GRID is fitted; the best validation accuracy wins (the strongest penalty on ties);
    without validation images, 1e-3.
    """
    features, labels = train
    mean, std = _standardise(features)
    standard = (features - mean) / std
    best: tuple | None = None
    for l2 in (L2_GRID if val is not None and len(val[1]) else (1e-3,)):
        weight, bias = _fit(standard, labels, num_classes, l2, max_iter,
                            loss=partial(F.cross_entropy, label_smoothing=label_smoothing))
        score = float((((val[0] - mean) / std @ weight.T + bias).argmax(1) == val[1]).float().mean()) \
            if val is not None and len(val[1]) else float("nan")
        if best is None or score >= best[0]:
            best = (score, l2, weight, bias)
    score, l2, weight, bias = best
    train_acc = float(((standard @ weight.T + bias).argmax(1) == labels).float().mean())
    folded = weight / std
    return folded, bias - folded @ mean, {"l2": l2, "val_acc": score, "train_acc": train_acc}


def fit_attribute_probe(features: torch.Tensor, attributes: torch.Tensor, l2: float,
                        max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """The attribute head's (weight, bias) for raw features: each attribute an L2-regularised logistic
    regression on the standardised features, against each image's class attribute values in [0, 1]."""
    mean, std = _standardise(features)
    weight, bias = _fit((features - mean) / std, attributes, attributes.shape[1], l2, max_iter,
                        loss=F.binary_cross_entropy_with_logits)
    folded = weight / std
    return folded, bias - folded @ mean
