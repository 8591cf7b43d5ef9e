"""Small shared pieces: the marker for inserted modules and the token context passed to them.

A tuning method inserts modules into a slice-wise encoder (DESIGN.md "The method"). Every such module
derives from :class:`InsertedModule`, which is how parameter reports tell "inserted" parameters
from the base model's, wherever the module sits in the tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class InsertedModule(nn.Module):
    """Marker base class for modules a tuning method inserts (adapters, prompts, ...)."""

    kind: str = "inserted"


@dataclass
class TokenGrid:
    """Where the tokens of one block live: ``batch`` volumes of ``depth`` slices of ``height x width`` tokens.

    Slice-wise encoders carry ``[batch * depth, ...]`` token tensors; 3D-aware inserted modules
    (Med-Adapter, ST-Adapter) reshape them to ``[batch, channels, depth, height, width]``.
    """

    batch: int
    depth: int
    height: int
    width: int


@dataclass
class EncoderState:
    """Mutable state threaded through one encoder forward pass."""

    grid: TokenGrid
    # The previous stage's inter-stage interaction output ([B, h, D, H', W']); None before the first.
    interaction: torch.Tensor | None = None


def to_volume(x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """Tokens ``[B*D, L, C]`` / ``[B*D, H, W, C]`` / ``[B, D, H, W, C]`` -> ``[B, C, D, H, W]``."""
    channels = x.shape[-1]
    return x.reshape(grid.batch, grid.depth, grid.height, grid.width, channels).permute(0, 4, 1, 2, 3)


def from_volume(v: torch.Tensor, like_shape: torch.Size) -> torch.Tensor:
    """``[B, C, D, H, W]`` -> tokens of shape ``like_shape[:-1] + (C,)``."""
    return v.permute(0, 2, 3, 4, 1).reshape(*like_shape[:-1], v.shape[1])
