"""``build_model(config)``: backbone + slice-wise encoder + decoder, with the tuning method applied.

The returned :class:`MedTuningModel` maps ``[B, C, D, H, W]`` volumes to ``[B, K, D, H, W]`` logits.
Base weights are random until :func:`MedTuningLib.models.load_base_weights` fills the backbone.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from MedTuningLib.errors import MedTuningError
from MedTuningLib.models.base import InsertedModule
from MedTuningLib.models.config import ModelConfig
from MedTuningLib.models.decoders import (SETRMLA, SETRNaive, SETRPUP, SwinUNetDecoder, SwinUNETRDecoder,
                                          UPerNet, ViTUNetDecoder)
from MedTuningLib.models.encoders import SliceEncoder, SwinSliceEncoder, SwinUNETREncoder, ViTSliceEncoder
from MedTuningLib.models.methods import apply_method


class MedTuningModel(nn.Module):
    """A segmentation model: ``encoder`` (backbone + inserted modules) and ``decoder``."""

    def __init__(self, config: ModelConfig, encoder: SliceEncoder, decoder: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.decoder = decoder
        # Frozen backbone tensors that the base weights do not give (official initialisation, see
        # models/weights.py): stored with the tuned weights so that the model folder rebuilds this model.
        self.random_base_keys: list[str] = []

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise MedTuningError("INVALID_OPTION", f"expected a [B, {self.config.in_channels}, D, H, W] input, "
                                 f"got {list(x.shape)}")
        b, _, d, h, w = x.shape
        if self.encoder.family == "swin_unetr":
            if any(s % 32 for s in (d, h, w)):
                raise MedTuningError("INVALID_OPTION", f"SwinUNETR needs D, H, W divisible by 32, got {d}x{h}x{w}")
            return self.decoder(self.encoder(x), x)
        if h != self.config.img_size or w != self.config.img_size:
            raise MedTuningError("INVALID_OPTION", f"slices are {h}x{w} but the model is built for "
                                 f"{self.config.img_size}x{self.config.img_size}",
                                 "crop or tile the volume to the model's slice size")
        feats = self.encoder(x)
        if isinstance(self.decoder, ViTUNetDecoder):
            logits = self.decoder(feats, x.transpose(1, 2).reshape(b * d, -1, h, w))
        else:
            logits = self.decoder(feats)
        return logits.reshape(b, d, -1, h, w).transpose(1, 2)

    # -- what is what -------------------------------------------------------------------------------
    def inserted_parameter_names(self) -> set[str]:
        names: set[str] = set()
        for prefix, module in self.named_modules():
            if isinstance(module, InsertedModule):
                names.update(f"{prefix}.{n}" for n, _ in module.named_parameters())
        return names

    def head_parameter_names(self) -> set[str]:
        """What head tuning trains: the decoder and the backbone's leftovers."""
        names = {f"decoder.{n}" for n, _ in self.decoder.named_parameters()}
        names.update(f"encoder.backbone.{n}" for n in self.encoder.leftover_parameter_names())
        return names

    def param_report(self) -> dict:
        from MedTuningLib.models.params import parameter_report

        return parameter_report(self)

    # -- tuned weights ------------------------------------------------------------------------------
    def _tuned_keys(self) -> list[str]:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        owners = {n.rsplit(".", 1)[0] for n in trainable}
        inserted = {prefix for prefix, m in self.named_modules() if isinstance(m, InsertedModule)}
        params = {n for n, _ in self.named_parameters()}
        keys = []
        random_base = set(self.random_base_keys)
        for key in self.state_dict().keys():
            if key in trainable or key in random_base:
                keys.append(key)
                continue
            owner = key.rsplit(".", 1)[0]
            # Buffers (e.g. BatchNorm running statistics) of tuned or inserted modules.
            if key not in params and (
                    owner in owners or any(owner == p or owner.startswith(p + ".") for p in inserted)):
                keys.append(key)
        return keys

    def tuned_state_dict(self) -> dict[str, torch.Tensor]:
        """Tuned parameters and the buffers of tuned / inserted modules; never the frozen base weights."""
        sd = self.state_dict()
        return {k: sd[k].detach().clone() for k in self._tuned_keys()}

    def load_tuned_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict()
        keys = set(self._tuned_keys())
        missing = sorted(keys - set(state))
        unexpected = sorted(set(state) - keys)
        wrong = sorted(k for k in keys & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
            if wrong:
                parts.append("shape mismatch: " + ", ".join(
                    f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}" for k in wrong[:3]))
            raise MedTuningError("WEIGHTS_INCOMPATIBLE", "the tuned weights do not fit this model: " + "; ".join(parts),
                                 "use the model folder's own settings (architecture, method, sizes) to rebuild it")
        self.load_state_dict(state, strict=False)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute the backbone blocks in backward instead of storing their activations."""
        self.encoder.checkpointing = bool(enabled)


def _check_backbone(name: str) -> None:
    base = name.split(".", 1)[0]
    if not timm.is_model(base):
        raise MedTuningError("UNKNOWN_BACKBONE", f"{name!r} is not a timm model",
                             "use a timm ViT (e.g. vit_base_patch16_224.orig_in21k) or Swin "
                             "(e.g. swin_tiny_patch4_window7_224.ms_in1k) name")


def _create_timm(cfg: ModelConfig, kind: type, **extra: Any) -> nn.Module:
    name = cfg.backbone_name
    _check_backbone(name)
    kwargs = dict(extra)
    kwargs.update(cfg.resolved_backbone_kwargs())
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", img_size=cfg.img_size,
                                  in_chans=cfg.in_channels, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise MedTuningError("UNKNOWN_BACKBONE", f"cannot build {name!r} for {cfg.arch}: {exc}",
                             "check --backbone and the backbone settings") from exc
    if not isinstance(model, kind):
        raise MedTuningError("UNKNOWN_BACKBONE", f"{name!r} is a {type(model).__name__}, but {cfg.arch} needs a "
                             f"{kind.__name__}", "pick a backbone of the architecture's family")
    return model


def swin_window(cfg: ModelConfig) -> int:
    """The Swin window for the slice size: 4 at 128 (paper), 7 at 224 (img_size // 32, at least 2)."""
    return int(cfg.resolved_backbone_kwargs().get("window_size", max(2, cfg.img_size // 32)))


def build_model(config: ModelConfig) -> MedTuningModel:
    """Build the model the configuration describes, random base weights, method applied."""
    cfg = config
    cfg.validate()
    width = cfg.decoder_width
    if cfg.family == "vit":
        from timm.models.vision_transformer import VisionTransformer

        backbone = _create_timm(cfg, VisionTransformer, class_token=False)
        if cfg.norm_eps is not None:  # timm's ViT uses 1e-6; the official Med-Tuning ViT nn.LayerNorm's 1e-5
            if isinstance(cfg.norm_eps, bool) or not isinstance(cfg.norm_eps, (int, float)) \
                    or not 0 < cfg.norm_eps < 1:
                raise MedTuningError("INVALID_OPTION", f"norm_eps must be a number between 0 and 1, not "
                                     f"{cfg.norm_eps!r}", "use e.g. --norm-eps 1e-5 (the official ViT's)")
            for module in backbone.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = float(cfg.norm_eps)
        encoder: SliceEncoder = ViTSliceEncoder(backbone)
        dim, patch = encoder.embed_dim, encoder.patch_size
        if cfg.img_size % patch:  # timm pads or truncates silently; the decoders then misalign (issue 15)
            fit = max(patch, cfg.img_size // patch * patch)
            raise MedTuningError("INVALID_OPTION", f"the slice size {cfg.img_size} is not a multiple of the "
                                 f"backbone's patch size {patch}", f"use a crop of Dx{fit}x{fit}")
        if len(encoder.stage_ends) != 4:
            raise MedTuningError("INVALID_OPTION", "the ViT decoders need at least 4 transformer blocks")
        decoder: nn.Module = {
            "upernet": lambda: UPerNet(dim, cfg.num_classes, cfg.img_size, width or 256),
            "setr_naive": lambda: SETRNaive(dim, cfg.num_classes, cfg.img_size, width or 256),
            "setr_pup": lambda: SETRPUP(dim, cfg.num_classes, cfg.img_size, patch, width or 256),
            "setr_mla": lambda: SETRMLA(dim, cfg.num_classes, cfg.img_size, width or 256),
            "unet": lambda: ViTUNetDecoder(dim, cfg.in_channels, cfg.num_classes, patch, width or 64),
        }[cfg.decoder]()
    elif cfg.family == "swin":
        from timm.models.swin_transformer import SwinTransformer

        window = swin_window(cfg)
        backbone = _create_timm(cfg, SwinTransformer, window_size=window)
        encoder = SwinSliceEncoder(backbone)
        heads = [stage.blocks[0].attn.num_heads for stage in backbone.layers]
        decoder = SwinUNetDecoder(encoder.embed_dim, len(backbone.layers), encoder.stage_sizes, heads,
                                  encoder.grid_size[0], window, encoder.patch_size, cfg.num_classes)
    else:
        from monai.networks.nets import SwinUNETR

        kwargs = cfg.resolved_backbone_kwargs()
        try:
            net = SwinUNETR(in_channels=cfg.in_channels, out_channels=cfg.num_classes, **kwargs)
        except (TypeError, ValueError) as exc:
            raise MedTuningError("INVALID_OPTION", f"cannot build SwinUNETR: {exc}",
                                 "check the backbone settings (feature_size must be divisible by 12)") from exc
        encoder = SwinUNETREncoder(net.swinViT, net.normalize)
        decoder = SwinUNETRDecoder(net)
    model = MedTuningModel(cfg, encoder, decoder)
    apply_method(model)
    return model
