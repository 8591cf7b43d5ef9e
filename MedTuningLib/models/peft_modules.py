"""The modules the other tuning methods insert (docs/method.md "Other tuning methods compared").

- :class:`BottleneckAdapter`: Houlsby adapter (reduction 8, after attention and after the MLP) and,
  with a scale, the AdaptFormer branch (bottleneck 64, scale 0.1, parallel to the MLP).
- :class:`STAdapter`: before attention; width C/2, depthwise Conv3d (3,1,1) across slices.
- :class:`ProTuningBlock`: stage-wise convolutional prompt block on each slice's feature map.
- :class:`VisualPrompts`: VPT prompt tokens (shallow: one set at the input; deep: one set per block).
"""

from __future__ import annotations

import torch
from torch import nn

from MedTuningLib.models.base import EncoderState, InsertedModule, from_volume, to_volume


class BottleneckAdapter(InsertedModule):
    """``x -> up(act(down(x))) * scale`` (+ x when ``residual``): Houlsby / AdaptFormer bottleneck."""

    kind = "adapter"

    def __init__(self, dim: int, hidden: int, scale: float = 1.0, residual: bool = True,
                 zero_init: bool = False, kind: str | None = None) -> None:
        super().__init__()
        if kind:
            self.kind = kind
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        self.scale = scale
        self.residual = residual
        if zero_init:  # AdaptFormer starts as the identity of the frozen model
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.act(self.down(x))) * self.scale
        return x + y if self.residual else y


class STAdapter(InsertedModule):
    """ST-Adapter: ``x + up(dwconv_(3,1,1)(down(x)))`` with a depthwise conv across slices."""

    kind = "st_adapter"

    def __init__(self, dim: int, hidden: int | None = None, kernel: int = 3) -> None:
        super().__init__()
        hidden = hidden or dim // 2
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv3d(hidden, hidden, (kernel, 1, 1), padding=(kernel // 2, 0, 0), groups=hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, state: EncoderState) -> torch.Tensor:
        v = self.conv(to_volume(self.down(x), state.grid))
        return x + self.up(from_volume(v, x.shape))


class ProTuningBlock(InsertedModule):
    """Pro-tuning prompt block: a small conv bottleneck on each slice's feature map, added residually.

    ``x + conv1x1(GELU(dwconv5x5(GELU(conv1x1(x)))))`` with a C/4 bottleneck, one per stage.
    """

    kind = "pro_tuning"

    def __init__(self, dim: int, reduction: int = 4, kernel: int = 5) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.body = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.GELU(),
            nn.Conv2d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden), nn.GELU(),
            nn.Conv2d(hidden, dim, 1),
        )

    def forward(self, x: torch.Tensor, state: EncoderState) -> torch.Tensor:
        g = state.grid
        c = x.shape[-1]
        maps = x.reshape(g.batch * g.depth, g.height, g.width, c).permute(0, 3, 1, 2)
        prompt = self.body(maps).permute(0, 2, 3, 1).reshape(x.shape)
        return x + prompt


class VisualPrompts(InsertedModule):
    """VPT prompt tokens: one set of ``tokens`` learnable tokens per entry of ``dims``.

    Shallow VPT has one set (inserted before the first block); deep VPT one set per block (each of
    that block's width: Swin widths change from stage to stage).
    """

    kind = "vpt"

    def __init__(self, dims: list[int], tokens: int = 10) -> None:
        super().__init__()
        self.tokens = tokens
        self.prompts = nn.ParameterList([nn.Parameter(torch.empty(tokens, d)) for d in dims])
        for p in self.prompts:
            nn.init.uniform_(p, -0.02, 0.02)

    def for_block(self, index: int) -> torch.Tensor | None:
        """The prompt set (re)inserted before / inside block ``index``; None when there is none."""
        if index < len(self.prompts):
            return self.prompts[index]
        return None
