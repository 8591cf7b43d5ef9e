"""The Med-Adapter (docs/method.md "The method", checked against the official code).

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
import torch.nn.functional as F
from torch import nn

from MedTuningLib.errors import MedTuningError
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
        """On a volume ``[B, C, D, H, W]`` (the literal formulation; the adapter uses :meth:`forward_tokens`)."""
        return self.act(self.norm(self.axial(self.spatial(x))))

    def forward_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """The same on channels-last tokens ``[B, D, H, W, C]`` (contiguous), returned in that layout.

        The separable depthwise 3D convs run as depthwise 2D convs on channels-last views (``1xkxk`` on
        ``[B*D, C, H, W]``, ``kx1x1`` as ``kx1`` on ``[B, C, D, H*W]``): the same sums with the same weights,
        several times faster on CPU than depthwise Conv3d, and no layout copies between token and volume.
        """
        b, d, h, w, c = t.shape
        k = self.spatial.kernel_size[1]
        pad = k // 2
        y = F.conv2d(t.reshape(b * d, h, w, c).permute(0, 3, 1, 2), self.spatial.weight.squeeze(2),
                     self.spatial.bias, padding=pad, groups=c)                       # [B*D, C, H, W]
        y = y.permute(0, 2, 3, 1).reshape(b, d, h * w, c).permute(0, 3, 1, 2)      # [B, C, D, H*W]
        y = F.conv2d(y, self.axial.weight.squeeze(-1), self.axial.bias, padding=(pad, 0), groups=c)
        y = self.act(self.norm(y.unsqueeze(-1)))                                    # BatchNorm3d on [B, C, D, HW, 1]
        return y.squeeze(-1).permute(0, 2, 3, 1).reshape(b, d, h, w, c)


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
        self._cached: tuple | None = None  # (key, operator, bias term) while the filter is not being trained

    def filters(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias (each ``[length]``), resampled when ``length`` differs from the built depth."""
        w = resample_frequency_filter(self.weight.reshape(-1).float(), length)
        b = resample_frequency_filter(self.bias.reshape(-1).float(), length)
        return w, b

    def depth_operator(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted term as a matrix along D, and the bias term.

        ``ifft(fft(x) * w)`` along D is ``M @ x`` with the circulant ``M = F^-1 diag(w) F`` (D x D, complex);
        returned as ``[Re M; Im M]`` (2D x D, float32) and ``ifft(b)`` as ``[2, D]`` (real, imaginary). With
        D = 16 that is a tiny matmul instead of two complex FFTs, and it runs on the token layout as it is.
        """
        if not torch.is_grad_enabled():
            # Inference: the operator is a constant of the weights; build it once, not once per window.
            key = (length, self.weight.device, self.weight._version, self.bias._version,
                   self.weight.data_ptr(), self.bias.data_ptr())
            if self._cached is None or self._cached[0] != key:
                with torch.inference_mode(False), torch.no_grad():
                    self._cached = (key, *self._depth_operator(length))
            return self._cached[1], self._cached[2]
        self._cached = None
        return self._depth_operator(length)

    def _depth_operator(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = self.filters(length)
        eye = torch.eye(length, device=w.device, dtype=torch.complex64)
        # M[:, j] = ifft(w * fft(e_j)); built through differentiable FFTs of the identity.
        m = torch.fft.ifft(torch.fft.fft(eye, dim=0) * w.view(length, 1), dim=0)
        bias_term = torch.fft.ifft(b.to(torch.complex64))
        return torch.cat((m.real, m.imag), dim=0), torch.stack((bias_term.real, bias_term.imag))

    def forward_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """The branch on channels-last tokens ``[B, D, H, W, C]``, returned in that layout (float32 inside)."""
        b, d, h, w, c = t.shape
        dtype = t.dtype
        with torch.autocast(device_type=t.device.type, enabled=False):
            op, bias = self.depth_operator(d)
            y = torch.matmul(op, t.reshape(b, d, h * w * c).float())                # [B, 2D, HWC]
            # The bias term lives at spatial position (0, 0) only: the first C entries of every depth row.
            y = y + F.pad(bias.reshape(2 * d, 1).expand(2 * d, c), (0, h * w * c - c))
            mag = torch.complex(y[:, :d], y[:, d:]).abs()
        return mag.reshape(b, d, h, w, c).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """On a volume ``[B, C, D, H, W]``."""
        return self.forward_tokens(x.permute(0, 2, 3, 4, 1).contiguous()).permute(0, 4, 1, 2, 3)

    def forward_fft(self, x: torch.Tensor) -> torch.Tensor:
        """Factorised FFT form on a volume (1D FFT along D plus the bias at (0, 0)); kept for tests."""
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
            raise MedTuningError("INVALID_OPTION", f"--alpha {config.alpha:g} leaves the Med-Adapter bottleneck "
                                 f"int({dim} / {config.alpha:g}) empty", f"use an alpha below {dim} (paper: 6)")
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
        """The previous stage's interaction, aligned to this stage, on tokens ``[B, D, H', W', h]``."""
        assert self.align is not None
        if state.interaction is None:
            # First stage: the "previous stage" is zeros (official code), so the aligned input is exactly
            # the conv's bias; the weight stays in the graph with the zero gradient a conv on zeros gives.
            bias = self.align.bias + 0.0 * self.align.weight.sum()
            return bias.to(like.dtype).expand_as(like)
        prev = state.interaction.permute(0, 2, 3, 4, 1)                 # [B, D, H, W, c] (a view)
        weight = self.align.weight
        if self.align_kind == "vit":                                     # 1x1x1 conv == a linear on tokens
            return F.linear(prev, weight.flatten(1), self.align.bias)
        if self.align_kind == "swin":                                    # (1,3,3) stride (1,2,2): a 2D conv per slice
            b, d, h, w, c = prev.shape
            y = F.conv2d(prev.reshape(b * d, h, w, c).permute(0, 3, 1, 2), weight.squeeze(2), self.align.bias,
                         stride=2, padding=1)
            return y.permute(0, 2, 3, 1).reshape(like.shape)
        return self.align(state.interaction).permute(0, 2, 3, 4, 1)    # swin3d: a real 3D conv

    def forward(self, x: torch.Tensor, state: EncoderState) -> torch.Tensor:
        shortcut = x
        g = state.grid
        # X' as channels-last tokens [B, D, H', W', h]: the volume [B, h, D, H', W'] is a view of it, and every
        # branch works on this layout (docs/method.md formulation, computed without layout copies).
        z = self.act(self.down(x)).reshape(g.batch, g.depth, g.height, g.width, self.hidden)
        m = None
        if self.local3 is not None:
            m = self.local3.forward_tokens(z) + self.local5.forward_tokens(z)
        if self.global_branch is not None:
            y = self.global_branch.forward_tokens(z)
            m = y if m is None else m + y
        if m is None:
            m = torch.zeros_like(z)
        if self.mix is not None:                                         # 1x1x1 conv == a linear on tokens
            m = F.linear(m, self.mix.weight.flatten(1), self.mix.bias)
        if self.fusion != "none":
            prev = self._aligned_previous(state, m)
            if self.fusion == "concat":
                m = F.linear(torch.cat((m, prev), dim=-1), self.fuse.weight.flatten(1), self.fuse.bias)
            elif self.fusion == "add":
                m = m + prev
            else:  # max
                m = torch.maximum(m, prev)
            state.interaction = m.permute(0, 4, 1, 2, 3)                # [B, h, D, H', W'] (a view)
        out = (z + m).reshape(*x.shape[:-1], self.hidden)
        return shortcut + self.act(self.up(out))

    def forward_volume(self, x: torch.Tensor, state: EncoderState) -> torch.Tensor:
        """The literal formulation on volumes (Conv3d, 3D FFT); :meth:`forward` computes the same. For tests."""
        shortcut = x
        v = to_volume(self.act(self.down(x)), state.grid)       # X' [B, h, D, H', W']
        branches = []
        if self.local3 is not None:
            branches += [self.local3(v), self.local5(v)]
        if self.global_branch is not None:
            gb = self.global_branch
            branches.append(gb.reference(v) if isinstance(gb, FrequencyFilter) else gb(v))
        m = sum(branches) if branches else torch.zeros_like(v)
        if self.mix is not None:
            m = self.mix(m)
        if self.fusion != "none":
            if state.interaction is None:
                prev = (self.align.bias + 0.0 * self.align.weight.sum()).view(1, -1, 1, 1, 1).to(m.dtype).expand_as(m)
            else:
                prev = self.align(state.interaction)
            if self.fusion == "concat":
                m = self.fuse(torch.cat((m, prev), dim=1))
            elif self.fusion == "add":
                m = m + prev
            else:
                m = torch.maximum(m, prev)
            state.interaction = m
        z = from_volume(v + m, x.shape)
        return shortcut + self.act(self.up(z))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, fusion={self.fusion}, align={self.align_kind}"

