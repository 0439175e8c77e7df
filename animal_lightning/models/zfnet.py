"""ZFNet, the ImageNet 2013 winner the report compared against, written out layer by layer.

Zeiler, M. D. and Fergus, R. "Visualizing and Understanding Convolutional Networks", ECCV 2014
(arXiv:1311.2901, 2013). It is AlexNet with the first layer fixed after the authors looked at what it
learned: a 7x7 stride-2 first convolution instead of 11x11 stride 4 (fewer dead and aliased filters),
then the AlexNet-style stack: 5x5 stride-2 convolution, three 3x3 convolutions, two 4096-wide fully
connected layers with dropout. Local contrast normalisation follows the first two layers, as in the
paper (here torch's LocalResponseNorm).

Two departures, both so that it runs on any image size and fits this project: every max-pool pads by
one (a 32 px image still reaches the classifier), and an adaptive average pool to 6x6 sits before the
classifier (as in torchvision's AlexNet), so the fully connected layers do not fix the input size.
No ImageNet weights are published for it: it trains from scratch (`model.pretrained=false`) or from
a state dict of your own (`model.weights_path`).
"""

from __future__ import annotations

import torch
from torch import nn


class ZFNet(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=1),  # layer 1: 7x7/2 (AlexNet: 11x11/4)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0),
            nn.Conv2d(96, 256, kernel_size=5, stride=2, padding=2),  # layer 2: 5x5/2
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),  # layers 3-5: 3x3/1
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),  # features.13: the last feature map (Grad-CAM's layer)
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 6 * 6, 4096),  # layer 6
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),  # layer 7
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),  # layer 8: the classifier head
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def zfnet(**kwargs) -> ZFNet:
    return ZFNet(**kwargs)
