"""UPerNet on the four ViT stage features (docs/method.md "ViT+UPerNet", as the official code).

All four ViT features sit on the same H/16 grid. The block-2 feature first goes through a 1x1 conv
C -> 256 with BatchNorm and GELU; PSP (bins 1, 2, 4, 6; C/4 channels each; 3x3 bottleneck back to C)
runs on the last feature; the FPN (width 256) has 1x1 lateral convs for the other three features, one
3x3 smoothing conv shared by all levels, and a 3x3 fusion conv; a 3x3 conv gives the class logits,
upsampled bilinearly to the slice size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class PyramidPooling(nn.Module):
    """PSP: adaptive average pools, 1x1 conv (no bias) + BN + ReLU each, concat, 3x3 bottleneck."""

    def __init__(self, channels: int, bins: tuple[int, ...] = (1, 2, 4, 6)) -> None:
        super().__init__()
        branch = channels // len(bins)
        self.stages = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *conv_bn_relu(channels, branch, 1)) for b in bins])
        self.bottleneck = nn.Sequential(*conv_bn_relu(channels + branch * len(bins), channels, 3), nn.Dropout2d(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pyramids = [x] + [F.interpolate(s(x), size=size, mode="bilinear", align_corners=True) for s in self.stages]
        return self.bottleneck(torch.cat(pyramids, dim=1))


class UPerNet(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, out_size: int, width: int = 256) -> None:
        super().__init__()
        self.out_size = out_size
        # The block-2 feature: 1x1 conv C -> width, BN, GELU (official ``fpn`` module).
        self.neck = nn.Sequential(nn.Conv2d(in_dim, width, 1), nn.BatchNorm2d(width), nn.GELU())
        self.psp = PyramidPooling(in_dim)
        self.lateral = nn.ModuleList([nn.Conv2d(in_dim, width, 1) for _ in range(3)])
        self.smooth = nn.Conv2d(width, width, 3, padding=1)  # one conv shared by all levels
        self.fusion = conv_bn_relu(4 * width, width, 3)
        self.classifier = nn.Conv2d(width, num_classes, 3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        f0 = self.neck(feats[0])
        f3 = self.psp(feats[3])
        levels = [f0] + [conv(f) for conv, f in zip(self.lateral, (feats[1], feats[2], f3))]
        # Top-down: P_i = smooth(up(L_{i+1}) + L_i) for i = 2, 1, 0; the top level stays as it is.
        merged = [self.smooth(_up_add(levels[i + 1], levels[i])) for i in range(3)]
        merged.append(levels[3])
        size = merged[0].shape[-2:]
        merged = [merged[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=True) for m in merged[1:]]
        x = self.classifier(self.fusion(torch.cat(merged, dim=1)))
        return F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)


def _up_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y
