"""The Med-Adapter (DESIGN.md "The method", checked against the official code).

On tokens ``X`` of width ``C`` with bottleneck ``h = int(C / alpha)``::

    Z  = GELU(Linear(C, h)(X))                  -> volume X' [B, h, D, H', W']
    M  = mix( local3(X') + local5(X') + global(X') )      (intra-stage enhancement)
    M  = fuse(M, align(previous stage's M))               (inter-stage, last adapter of a stage only)
    X  = X + GELU(Linear(h, C)(X' + M))                   (inner and outer residuals)

Local paths: depthwise ``1xkxk`` then ``kx1x1`` Conv3d (with bias), BatchNorm3d, ReLU (k = 3, 5).
Global branch: 3D FFT over (D, H', W'), times a real per-depth-frequency weight, plus a real bias
(both ``[1, 1, D, 1, 1]``, initialised to 1), inverse FFT, magnitude.
"""

from __future__ import annotations

import torch
from torch import nn

from MedTuningLib.models.base import EncoderState, InsertedModule, from_volume, to_volume
from MedTuningLib.models.config import AdapterConfig


class DepthwiseCascade(nn.Module):
    """Depthwise ``1xkxk`` then ``kx1x1`` Conv3d (both with bias), BatchNorm3d, ReLU."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        pad = kernel // 2
        self.spatial = nn.Conv3d(channels, channels, (1, kernel, kernel), padding=(0, pad, pad), groups=channels)
        self.axial = nn.Conv3d(channels, channels, (kernel, 1, 1), padding=(pad, 0, 0), groups=channels)
        self.norm = nn.BatchNorm3d(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.axial(self.spatial(x))))


def resample_frequency_filter(values: torch.Tensor, length: int) -> torch.Tensor:
    """Resample a per-frequency filter of length D0 to ``length`` (periodic linear interpolation).

    Index k of a length-D DFT is the normalised frequency k / D (cyclic), so frequency k of the new
    length sits at position k * D0 / D on the old grid; values are interpolated with wrap-around.
    """
    old = values.shape[0]
    if old == length:
        return values
    pos = torch.arange(length, device=values.device, dtype=torch.float32) * (old / length)
    lo = pos.floor().long() % old
    hi = (lo + 1) % old
    frac = (pos - pos.floor()).to(values.dtype)
    return values[lo] * (1 - frac) + values[hi] * frac


class FrequencyFilter(nn.Module):
    """The FFT global branch: ``|ifftn(fftn(x) * w[k_d] + b[k_d])|`` over (D, H', W').

    ``w`` and ``b`` are real, one value per depth frequency (official code: shape [1, 1, D, 1, 1],
    initialised to 1). Because they are constant along the H', W' frequencies the 3D transform
    factorises exactly: the weighted term is a 1D FFT along D only, and the bias term (a constant
    over the H', W' frequencies) transforms back to ``ifft(b)[d]`` at spatial position (0, 0) only.
    This gives the same result as the literal 3D FFT at a fraction of the cost (tested).
    The transform runs in float32 (FFTs do not support bf16 on all devices).
    """

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.weight = nn.Parameter(torch.ones(1, 1, depth, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, 1, depth, 1, 1))

    def filters(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias (each ``[length]``), resampled when ``length`` differs from the built depth."""
        w = resample_frequency_filter(self.weight.reshape(-1).float(), length)
        b = resample_frequency_filter(self.bias.reshape(-1).float(), length)
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        length = x.shape[2]
        w, b = self.filters(length)
        spectrum = torch.fft.fft(x.float(), dim=2)
        y = torch.fft.ifft(spectrum * w.view(1, 1, length, 1, 1), dim=2)
        bias_term = torch.fft.ifft(b.to(torch.complex64))  # [D]: the bias, back in the spatial domain
        y = y.clone()
        y[:, :, :, 0, 0] = y[:, :, :, 0, 0] + bias_term.view(1, 1, length)
        return y.abs().to(dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The literal official formulation (3D FFT); used by tests to check :meth:`forward`."""
        length = x.shape[2]
        w, b = self.filters(length)
        spectrum = torch.fft.fftn(x.float(), dim=(2, 3, 4))
        y = spectrum * w.view(1, 1, length, 1, 1) + b.view(1, 1, length, 1, 1)
        return torch.fft.ifftn(y, dim=(2, 3, 4)).abs().to(x.dtype)

    def extra_repr(self) -> str:
        return f"depth={self.depth}"


class MedAdapter(InsertedModule):
    """One Med-Adapter after a transformer block.

    Args:
        dim: token width C.
        depth: the crop depth D the FFT filter is built for.
        config: bottleneck ratio and ablation switches.
        inter_stage: this is the last adapter of a stage (does inter-stage fusion unless fusion="none").
        align: how the previous stage's interaction is aligned: "vit" (1x1x1 conv h -> h, same grid),
            "swin" (Conv3d (1,3,3) stride (1,2,2), h/2 -> h: the previous stage has twice the H', W'),
            "swin3d" (Conv3d 3x3x3 stride 2, h/2 -> h: 3D Swin halves D too).
    """

    kind = "med_adapter"

    def __init__(self, dim: int, depth: int, config: AdapterConfig | None = None, inter_stage: bool = False,
                 align: str = "vit") -> None:
        super().__init__()
        config = config or AdapterConfig()
        self.dim = dim
        self.hidden = hidden = int(dim / config.alpha)
        if hidden < 1:
            raise ValueError(f"adapter bottleneck int({dim} / {config.alpha}) is empty; lower alpha")
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.act = nn.GELU()
        # Intra-stage enhancement branches.
        self.local3 = DepthwiseCascade(hidden, 3) if config.local_branch else None
        self.local5 = DepthwiseCascade(hidden, 5) if config.local_branch else None
        if config.global_branch == "fft":
            self.global_branch: nn.Module | None = FrequencyFilter(depth)
        elif config.global_branch in ("dwconv9", "dwconv11"):
            # Ablation: a large-kernel depthwise conv in place of the FFT (same cascade as the local paths).
            self.global_branch = DepthwiseCascade(hidden, int(config.global_branch[len("dwconv"):]))
        else:
            self.global_branch = None
        self.mix = nn.Conv3d(hidden, hidden, 1) if config.mix else None
        # Inter-stage interaction (only the last adapter of each stage).
        self.fusion = config.fusion if inter_stage else "none"
        self.align_kind = align
        self.align: nn.Conv3d | None = None
        self.fuse: nn.Conv3d | None = None
        if self.fusion != "none":
            if align == "vit":
                self.align = nn.Conv3d(hidden, hidden, 1)
            elif align == "swin":
                self.align = nn.Conv3d(hidden // 2, hidden, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
            elif align == "swin3d":
                self.align = nn.Conv3d(hidden // 2, hidden, 3, stride=2, padding=1)
            else:
                raise ValueError(f"unknown align kind {align!r}")
            if self.fusion == "concat":
                self.fuse = nn.Conv3d(2 * hidden, hidden, 1)

    @property
    def inter_stage(self) -> bool:
        return self.fusion != "none"

    def _aligned_previous(self, state: EncoderState, like: torch.Tensor) -> torch.Tensor:
        assert self.align is not None
        if state.interaction is None:
            # First stage: the "previous stage" is zeros (official code), so the aligned input is exactly
            # the conv's bias; the weight stays in the graph with the zero gradient a conv on zeros gives.
            bias = self.align.bias + 0.0 * self.align.weight.sum()
            return bias.view(1, -1, 1, 1, 1).to(like.dtype).expand_as(like)
        return self.align(state.interaction)

    def forward(self, x: torch.Tensor, state: EncoderState) -> torch.Tensor:
        shortcut = x
        v = to_volume(self.act(self.down(x)), state.grid)       # X' [B, h, D, H', W']
        branches = []
        if self.local3 is not None:
            branches += [self.local3(v), self.local5(v)]
        if self.global_branch is not None:
            branches.append(self.global_branch(v))
        m = sum(branches) if branches else torch.zeros_like(v)
        if self.mix is not None:
            m = self.mix(m)
        if self.fusion != "none":
            prev = self._aligned_previous(state, m)
            if self.fusion == "concat":
                m = self.fuse(torch.cat((m, prev), dim=1))
            elif self.fusion == "add":
                m = m + prev
            else:  # max
                m = torch.maximum(m, prev)
            state.interaction = m
        z = from_volume(v + m, x.shape)
        return shortcut + self.act(self.up(z))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, fusion={self.fusion}, align={self.align_kind}"

