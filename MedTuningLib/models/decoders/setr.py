"""SETR decoders on ViT features (Zheng et al., SETR): Naive, PUP (progressive upsampling) and MLA
(multi-level feature aggregation). Widths follow SETR (256; MLA streams 128); ``width`` scales them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from MedTuningLib.models.decoders.upernet import conv_bn_relu


def _upsample(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    size = (size, size) if isinstance(size, int) else size
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SETRNaive(nn.Module):
    """Last feature -> 1x1 conv + BN + ReLU -> 1x1 classifier -> bilinear upsampling."""

    def __init__(self, in_dim: int, num_classes: int, out_size: int, width: int = 256) -> None:
        super().__init__()
        self.out_size = out_size
        self.head = nn.Sequential(*conv_bn_relu(in_dim, width, 1), nn.Conv2d(width, num_classes, 1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return _upsample(self.head(feats[-1]), self.out_size)


class SETRPUP(nn.Module):
    """Last feature -> log2(patch) stages of 3x3 conv + BN + ReLU and 2x upsampling -> 1x1 classifier."""

    def __init__(self, in_dim: int, num_classes: int, out_size: int, patch_size: int, width: int = 256) -> None:
        super().__init__()
        self.out_size = out_size
        steps = max(1, int(round(math.log2(patch_size))))
        self.stages = nn.ModuleList([conv_bn_relu(in_dim if i == 0 else width, width, 3) for i in range(steps)])
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for stage in self.stages:
            x = F.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)
        return _upsample(self.classifier(x), self.out_size)


class SETRMLA(nn.Module):
    """Four stage features: 1x1 reduce, top-down aggregation, 3x3 conv per stream, per-stream heads
    (3x3 conv to width/2, 4x upsampling), concatenated and classified, upsampled to the slice size."""

    def __init__(self, in_dim: int, num_classes: int, out_size: int, width: int = 256) -> None:
        super().__init__()
        self.out_size = out_size
        half = max(1, width // 2)
        self.reduce = nn.ModuleList([conv_bn_relu(in_dim, width, 1) for _ in range(4)])
        self.aggregate = nn.ModuleList([conv_bn_relu(width, width, 3) for _ in range(4)])
        self.heads = nn.ModuleList([nn.Sequential(*conv_bn_relu(width, half, 3), *conv_bn_relu(half, half, 3))
                                    for _ in range(4)])
        self.classifier = nn.Conv2d(4 * half, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        reduced = [r(f) for r, f in zip(self.reduce, feats)]
        # Top-down: the deepest feature first, each shallower one adds the running sum.
        streams, running = [], None
        for i in reversed(range(4)):
            running = reduced[i] if running is None else reduced[i] + running
            streams.append(self.aggregate[i](running))
        streams.reverse()
        outs = [F.interpolate(h(s), scale_factor=4, mode="bilinear", align_corners=False)
                for h, s in zip(self.heads, streams)]
        return _upsample(self.classifier(torch.cat(outs, dim=1)), self.out_size)
