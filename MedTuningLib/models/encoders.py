"""Slice-wise encoders: a timm 2D backbone run on ``[B*D, C, H, W]`` with insertion points.

A volume ``[B, C, D, H, W]`` is encoded slice by slice by a 2D transformer (docs/method.md "The method").
The encoder iterates the backbone's blocks itself so that tuning methods can insert modules at
fixed points without touching the backbone (its state-dict keys stay timm's, so base weights load
as they are):

- ``before[i]`` / ``after[i]``: modules ``m(x, state)`` run before / after block ``i`` (ST-Adapter,
  Med-Adapter, Pro-tuning); ``state`` carries the token grid (B, D, H', W') and the inter-stage
  interaction;
- ``inner[i]``: per-token modules inside block ``i``: ``"attn_out"`` (after attention),
  ``"mlp_out"`` (after the MLP), ``"mlp_parallel"`` (AdaptFormer, parallel to the MLP);
- ``prompts``: VPT prompt tokens.

The 3D baseline (MONAI SwinUNETR) has its own 3D Swin encoder: :class:`SwinUNETREncoder`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from MedTuningLib.models.base import EncoderState, TokenGrid


class SliceEncoder(nn.Module):
    """Common insertion points and the block loop of the slice-wise encoders."""

    family = ""

    def __init__(self, backbone: nn.Module, blocks: list[nn.Module], block_dims: list[int],
                 stage_ends: list[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self._blocks = blocks  # plain list: the blocks are registered under backbone
        self.block_dims = block_dims
        self.stage_ends = stage_ends
        n = len(blocks)
        self.before = nn.ModuleList([nn.ModuleList() for _ in range(n)])
        self.after = nn.ModuleList([nn.ModuleList() for _ in range(n)])
        self.inner = nn.ModuleList([nn.ModuleDict() for _ in range(n)])
        self.prompts: nn.Module | None = None
        self.checkpointing = False

    @property
    def blocks(self) -> list[nn.Module]:
        return self._blocks

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def stage_of_block(self, index: int) -> int:
        return sum(1 for end in self.stage_ends if end < index)

    def leftover_parameter_names(self) -> list[str]:
        """Backbone parameters (names under ``backbone.``) that head tuning also trains."""
        return []

    def _run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._run_block, index, x, use_reentrant=False)
        return self._run_block(index, x)


class ViTSliceEncoder(SliceEncoder):
    """timm VisionTransformer without class token; returns the features of the four stage ends.

    Stages end at blocks 2, 5, 8, 11 for 12 blocks (evenly spaced for other depths). The final norm
    follows the last block's inserted modules, as in the official code.
    """

    family = "vit"

    def __init__(self, backbone: nn.Module) -> None:
        depth = len(backbone.blocks)
        ends = sorted({max(0, (depth * (k + 1)) // 4 - 1) for k in range(4)})
        super().__init__(backbone, list(backbone.blocks), [backbone.embed_dim] * depth, ends)
        self.embed_dim = backbone.embed_dim
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.grid_size = tuple(backbone.patch_embed.grid_size)

    def leftover_parameter_names(self) -> list[str]:
        # The position embedding is re-learned and the final norm trained (docs/method.md "head" itemisation).
        return ["pos_embed"] + [f"norm.{n}" for n, _ in self.backbone.norm.named_parameters()]

    def _run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        blk = self._blocks[index]
        inner = self.inner[index]
        if len(inner) == 0:
            return blk(x)
        y = blk.attn(blk.norm1(x))
        if "attn_out" in inner:
            y = inner["attn_out"](y)
        x = x + blk.drop_path1(blk.ls1(y))
        y = blk.mlp(blk.norm2(x))
        if "mlp_out" in inner:
            y = inner["mlp_out"](y)
        if "mlp_parallel" in inner:
            y = y + inner["mlp_parallel"](x)
        return x + blk.drop_path2(blk.ls2(y))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, c, d, h, w = x.shape
        bb = self.backbone
        t = bb.patch_embed(x.transpose(1, 2).reshape(b * d, c, h, w))
        t = bb.norm_pre(bb.patch_drop(bb._pos_embed(t)))
        gh, gw = self.grid_size
        state = EncoderState(TokenGrid(b, d, gh, gw))
        prefix = 0  # number of VPT prompt tokens in front of the patch tokens
        feats = []
        last = self.num_blocks - 1
        for i in range(self.num_blocks):
            if self.prompts is not None:
                p = self.prompts.for_block(i)
                if p is not None:  # shallow: once before block 0; deep: replaced before every block
                    t = torch.cat((p.unsqueeze(0).expand(t.shape[0], -1, -1).to(t.dtype), t[:, prefix:]), dim=1)
                    prefix = p.shape[0]
            for m in self.before[i]:
                t = self._on_patches(m, t, prefix, state)
            t = self._block(i, t)
            for m in self.after[i]:
                t = self._on_patches(m, t, prefix, state)
            if i == last:
                t = bb.norm(t)
            if i in self.stage_ends:
                feats.append(t[:, prefix:].reshape(b * d, gh, gw, -1).permute(0, 3, 1, 2))
        return feats

    @staticmethod
    def _on_patches(m: nn.Module, t: torch.Tensor, prefix: int, state: EncoderState) -> torch.Tensor:
        if prefix == 0:
            return m(t, state)
        return torch.cat((t[:, :prefix], m(t[:, prefix:], state)), dim=1)


class SwinSliceEncoder(SliceEncoder):
    """timm SwinTransformer (NHWC tokens); returns the four stage inputs (skips) and the normed output.

    timm downsamples at the start of stages 1..3; the skip of stage s is its input after patch merging,
    which is what the official Swin-UNet keeps (``x_downsample``).
    """

    family = "swin"

    def __init__(self, backbone: nn.Module) -> None:
        blocks, dims, ends = [], [], []
        for stage in backbone.layers:
            for blk in stage.blocks:
                blocks.append(blk)
                dims.append(blk.norm1.normalized_shape[0])
            ends.append(len(blocks) - 1)
        super().__init__(backbone, blocks, dims, ends)
        self.stage_sizes = [len(stage.blocks) for stage in backbone.layers]
        self.embed_dim = backbone.embed_dim
        self.num_features = backbone.num_features
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.grid_size = tuple(backbone.patch_embed.grid_size)

    def leftover_parameter_names(self) -> list[str]:
        return [f"norm.{n}" for n, _ in self.backbone.norm.named_parameters()]

    def _run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        blk = self._blocks[index]
        inner = self.inner[index]
        prompts = self.prompts.for_block(index) if self.prompts is not None else None
        if len(inner) == 0 and prompts is None:
            return blk(x)
        b, h, w, c = x.shape
        y = _swin_attention(blk, blk.norm1(x), prompts)
        if "attn_out" in inner:
            y = inner["attn_out"](y)
        x = (x + blk.drop_path1(y)).reshape(b, -1, c)
        y = blk.mlp(blk.norm2(x))
        if "mlp_out" in inner:
            y = inner["mlp_out"](y)
        if "mlp_parallel" in inner:
            y = y + inner["mlp_parallel"](x)
        return (x + blk.drop_path2(y)).reshape(b, h, w, c)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        b, c, d, h, w = x.shape
        bb = self.backbone
        t = bb.patch_embed(x.transpose(1, 2).reshape(b * d, c, h, w))  # [B*D, H', W', C]
        state = EncoderState(TokenGrid(b, d, t.shape[1], t.shape[2]))
        skips = []
        index = 0
        for stage in bb.layers:
            t = stage.downsample(t)
            skips.append(t)
            state.grid = TokenGrid(b, d, t.shape[1], t.shape[2])
            for _ in stage.blocks:
                for m in self.before[index]:
                    t = m(t, state)
                t = self._block(index, t)
                for m in self.after[index]:
                    t = m(t, state)
                index += 1
        return {"skips": skips, "out": bb.norm(t)}


def _swin_attention(blk: nn.Module, x: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
    """timm ``SwinTransformerBlock._attn`` with optional VPT prompt tokens as extra keys / values.

    Prompts are prepended to every window's tokens (shared across windows, VPT for Swin); only the
    window tokens are queried, and the relative-position bias and shift mask are zero for prompts.
    """
    if prompts is None:
        return blk._attn(x)
    b, h, w, c = x.shape
    shift = blk.shift_size
    ws = blk.window_size
    has_shift = any(shift)
    if has_shift:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    pad_h = (ws[0] - h % ws[0]) % ws[0]
    pad_w = (ws[1] - w % ws[1]) % ws[1]
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = x.shape[1], x.shape[2]
    windows = x.reshape(b, hp // ws[0], ws[0], wp // ws[1], ws[1], c).permute(0, 1, 3, 2, 4, 5)
    windows = windows.reshape(-1, ws[0] * ws[1], c)
    attn = blk.attn
    n_win, n = windows.shape[0], windows.shape[1]
    p = prompts.shape[0]
    tokens = torch.cat((prompts.unsqueeze(0).expand(n_win, -1, -1).to(windows.dtype), windows), dim=1)
    qkv = attn.qkv(tokens).reshape(n_win, p + n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = q[:, :, p:]
    bias = F.pad(attn._get_rel_pos_bias(), (p, 0))  # [1, heads, N, P+N]: no bias towards prompts
    mask = blk.attn_mask
    if mask is not None:
        nw = mask.shape[0]
        full = F.pad(mask, (p, 0)).view(1, nw, 1, n, p + n)
        bias = (bias.unsqueeze(1) + full).expand(n_win // nw, -1, -1, -1, -1).reshape(n_win, -1, n, p + n)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                       dropout_p=attn.attn_drop.p if attn.training else 0.0)
    y = attn.proj_drop(attn.proj(y.transpose(1, 2).reshape(n_win, n, -1)))
    y = y.reshape(b, hp // ws[0], wp // ws[1], ws[0], ws[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    y = y[:, :h, :w].contiguous()
    if has_shift:
        y = torch.roll(y, shifts=shift, dims=(1, 2))
    return y


class SwinUNETREncoder(SliceEncoder):
    """MONAI SwinUNETR's 3D Swin encoder (``swinViT``) with insertion points after every block.

    The blocks are iterated here (as MONAI's ``BasicLayer.forward`` does) so that Med-Adapters can work
    on the 3D tokens ``[B, D', H', W', C]`` directly. Returns MONAI's five hidden states. (Reimplementing
    the loop also avoids MONAI's optional einops dependency.)
    """

    family = "swin_unetr"

    def __init__(self, swin_vit: nn.Module, normalize: bool = True) -> None:
        blocks, dims, ends, layers = [], [], [], []
        for name in ("layers1", "layers2", "layers3", "layers4"):
            layer = getattr(swin_vit, name)[0]
            layers.append(layer)
            for blk in layer.blocks:
                blocks.append(blk)
                dims.append(blk.dim)
            ends.append(len(blocks) - 1)
        super().__init__(swin_vit, blocks, dims, ends)
        self._layers = layers
        self.normalize = normalize
        self.embed_dim = swin_vit.embed_dim

    def _run_block(self, index: int, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._blocks[index](x, mask)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        from monai.networks.nets.swin_unetr import compute_mask, get_window_size

        bb = self.backbone
        t = bb.pos_drop(bb.patch_embed(x))  # [B, C, D', H', W']
        outs = [self._proj_out(t)]
        state = EncoderState(TokenGrid(t.shape[0], t.shape[2], t.shape[3], t.shape[4]))
        index = 0
        for layer in self._layers:
            b, c, d, h, w = t.shape
            window, shift = get_window_size((d, h, w), layer.window_size, layer.shift_size)
            dp, hp, wp = (int(-(-s // ws) * ws) for s, ws in zip((d, h, w), window))
            mask = compute_mask([dp, hp, wp], window, shift, t.device)
            t = t.permute(0, 2, 3, 4, 1)
            state.grid = TokenGrid(b, d, h, w)
            for _ in layer.blocks:
                for m in self.before[index]:
                    t = m(t, state)
                if self.checkpointing and self.training and torch.is_grad_enabled():
                    t = checkpoint(self._run_block, index, t, mask, use_reentrant=False)
                else:
                    t = self._run_block(index, t, mask)
                for m in self.after[index]:
                    t = m(t, state)
                index += 1
            t = t.reshape(b, d, h, w, -1)
            if layer.downsample is not None:
                t = layer.downsample(t)
            t = t.permute(0, 4, 1, 2, 3)
            outs.append(self._proj_out(t))
        return outs

    def _proj_out(self, t: torch.Tensor) -> torch.Tensor:
        """MONAI ``SwinTransformer.proj_out``: a parameter-free LayerNorm over channels (no einops needed)."""
        if not self.normalize:
            return t
        return F.layer_norm(t.permute(0, 2, 3, 4, 1), [t.shape[1]]).permute(0, 4, 1, 2, 3)
