"""A U-Net style decoder for ViT features (UNETR-like, in 2D per slice).

The deepest ViT feature (H/p) is upsampled by transposed convs level by level to the slice size; at
each level it is concatenated with a skip: the shallower ViT stage features brought up to that
level's resolution by transposed convs, and at full resolution a conv stem on the input slice.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def up_projection(cin: int, cout: int, steps: int) -> nn.Sequential:
    """``steps`` transposed convs (x2 each) from ``cin`` to ``cout`` channels."""
    layers: list[nn.Module] = []
    for i in range(steps):
        layers += [nn.ConvTranspose2d(cin if i == 0 else cout, cout, 2, stride=2), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ViTUNetDecoder(nn.Module):
    def __init__(self, in_dim: int, in_channels: int, num_classes: int, patch_size: int, width: int = 64) -> None:
        super().__init__()
        levels = int(round(math.log2(patch_size)))
        if 2 ** levels != patch_size or levels < 1:
            raise ValueError(f"the U-Net decoder needs a power-of-two patch size, not {patch_size}")
        self.levels = levels
        # channels at level l (resolution H / 2**l): width * 2**l, capped at 8 * width
        ch = [width * min(2 ** l, 8) for l in range(levels + 1)]
        self.stem = conv_block(in_channels, ch[0])
        # Skips for levels levels-1 .. 1 come from ViT stage features 2, 1, 0 (deepest first).
        self.skip_levels = list(range(levels - 1, 0, -1))[:3]
        self.skips = nn.ModuleList([up_projection(in_dim, ch[l], levels - l) for l in self.skip_levels])
        self.bottom = nn.Conv2d(in_dim, ch[levels], 1)
        self.ups = nn.ModuleList([nn.ConvTranspose2d(ch[l + 1], ch[l], 2, stride=2) for l in range(levels)])
        self.blocks = nn.ModuleList([conv_block(2 * ch[l], ch[l]) for l in range(levels)])
        self.classifier = nn.Conv2d(ch[0], num_classes, 1)

    def forward(self, feats: list[torch.Tensor], slices: torch.Tensor) -> torch.Tensor:
        x = self.bottom(feats[3])
        skip = {l: proj(feats[2 - k]) for k, (l, proj) in enumerate(zip(self.skip_levels, self.skips))}
        skip[0] = self.stem(slices)
        for l in reversed(range(self.levels)):
            x = self.ups[l](x)
            s = skip.get(l)
            x = self.blocks[l](torch.cat((x, s if s is not None else torch.zeros_like(x)), dim=1))
        return self.classifier(x)
