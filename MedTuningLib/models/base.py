"""Small shared pieces: the marker for inserted modules and the token context passed to them.

A tuning method inserts modules into a slice-wise encoder (docs/method.md "The method"). Every such module
derives from :class:`InsertedModule`, which is how parameter reports tell "inserted" parameters
from the base model's, wherever the module sits in the tree.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

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


# Layers whose weights autocast feeds to matmuls / convolutions in the low-precision dtype anyway: storing
# them in that dtype gives the same results under autocast, without a cast per call (issue 5).
_MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d)


def _matmul_tensors(model: nn.Module, frozen_only: bool) -> list[nn.Parameter]:
    found: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, _MATMUL_LAYERS):
            continue
        for p in (module.weight, module.bias):
            if p is None or id(p) in seen or not p.is_floating_point():
                continue
            if frozen_only and p.requires_grad:
                continue
            seen.add(id(p))
            found.append(p)
    return found


def compact_frozen_weights(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Store the frozen Linear / Conv weights in ``dtype`` (the autocast dtype); returns the count.

    Only for a model that runs under autocast to ``dtype``: autocast rounds those weights to ``dtype``
    before every matmul / convolution anyway, so the results are the same, the frozen backbone takes
    half the memory and no per-call casts are made. Norms, embeddings and tuned weights stay float32.
    ``dtype=None`` (plain fp32) leaves the model as it is.
    """
    if dtype is None:
        return 0
    params = _matmul_tensors(model, frozen_only=True)
    for p in params:
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    release_freed_memory()
    return len(params)


@contextlib.contextmanager
def compact_weights(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Inference: every Linear / Conv weight in ``dtype`` for the duration, restored afterwards.

    Under autocast to ``dtype`` the results are the same (autocast casts these weights before each call;
    frozen weights are not cached by autocast, so a sliding window would cast the whole backbone again for
    every window). The original tensors are put back untouched, so a training model can be validated.
    """
    if dtype is None:
        yield
        return
    originals = []
    try:
        for p in _matmul_tensors(model, frozen_only=False):
            if p.dtype != dtype:
                originals.append((p, p.data))
                p.data = p.data.to(dtype)
        yield
    finally:
        for p, data in originals:
            p.data = data


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
