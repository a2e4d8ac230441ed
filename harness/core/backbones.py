"""Backbones: torchvision ResNets with the CIFAR stem, and a small ConvNet for fast tests.

A backbone maps images to pooled features and exposes their size as ``feat_dim``.
"""

from __future__ import annotations

import torch
from torch import nn


class ResNet(nn.Module):
    """torchvision's ResNet-18/50 for small images: 3×3 stride-1 first conv, no max-pool, no fc.

    `stem=imagenet` keeps the original 7×7/stride-2 conv and max-pool (for 224 px folders);
    `stem=mid` keeps the max-pool after a 3×3 stride-1 conv (for 64 px images).
    """

    def __init__(self, depth: int = 18, stem: str = "cifar"):
        super().__init__()
        # Imported here, not at the top: torchvision's import (about 0.9 s, it pulls in torch._dynamo)
        # is then paid only by jobs that build a ResNet, not by every ConvNet job and Slurm task.
        from harness.core.tv import torchvision

        make = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
        net = make(weights=None)
        if stem in ("cifar", "mid"):
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if stem == "cifar":
            net.maxpool = nn.Identity()
        self.feat_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """Four conv-BN-ReLU blocks with pooling: a few seconds per epoch on a laptop CPU."""

    def __init__(self, width: int = 32, feat_dim: int = 256):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, feat_dim]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            layers.append(nn.MaxPool2d(2) if i < 3 else nn.AdaptiveAvgPool2d(1))
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.feat_dim = feat_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
