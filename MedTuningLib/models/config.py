"""Model settings: :class:`ModelConfig` (architecture, backbone, sizes, tuning method) and
:class:`AdapterConfig` (the Med-Adapter and its ablation switches, DESIGN.md "The method").

Both are plain dataclasses that round-trip through JSON (``to_dict`` / ``from_dict``) so a model
folder's ``medtuning.json`` can rebuild exactly the model that was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from MedTuningLib.errors import MedTuningError

GLOBAL_BRANCHES = ("fft", "dwconv9", "dwconv11", "none")
FUSIONS = ("concat", "add", "max", "none")

METHODS = ("scratch", "full", "head", "med_tuning", "vpt_shallow", "vpt_deep", "adapter", "adaptformer",
           "st_adapter", "pro_tuning")

# Per architecture: backbone family, default timm backbone (the paper's), decoder, default timm kwargs.
# Swin-UNet uses Swin-T in the "lite" shape: depths 2,2,2,2 (DESIGN.md); its window is set from the
# slice size in the factory (4 at 128x128, i.e. img_size // 32, as 7 at 224).
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit_upernet": {"family": "vit", "backbone": "vit_base_patch16_224.orig_in21k", "decoder": "upernet",
                    "backbone_kwargs": {}},
    "vit_setr_naive": {"family": "vit", "backbone": "vit_base_patch16_224.orig_in21k", "decoder": "setr_naive",
                       "backbone_kwargs": {}},
    "vit_setr_pup": {"family": "vit", "backbone": "vit_base_patch16_224.orig_in21k", "decoder": "setr_pup",
                     "backbone_kwargs": {}},
    "vit_setr_mla": {"family": "vit", "backbone": "vit_base_patch16_224.orig_in21k", "decoder": "setr_mla",
                     "backbone_kwargs": {}},
    "vit_unet": {"family": "vit", "backbone": "vit_base_patch16_224.orig_in21k", "decoder": "unet",
                 "backbone_kwargs": {}},
    "swin_unet": {"family": "swin", "backbone": "swin_tiny_patch4_window7_224.ms_in1k", "decoder": "swin_unet",
                  "backbone_kwargs": {"depths": (2, 2, 2, 2)}},
    # MONAI's 3D SwinUNETR (its own Swin encoder); backbone_kwargs go to monai SwinUNETR.
    "swin_unetr": {"family": "swin_unetr", "backbone": "monai_swin_unetr", "decoder": "swin_unetr",
                   "backbone_kwargs": {"feature_size": 48}},
}

# Methods every architecture supports; the paper archs (and all ViT decoders) support all of METHODS.
CORE_METHODS = ("scratch", "full", "head", "med_tuning")


@dataclass
class AdapterConfig:
    """The Med-Adapter: bottleneck ``h = int(C / alpha)`` and the paper's ablation switches."""

    alpha: float = 6.0
    local_branch: bool = True          # multi-scale depthwise 3D convs (k = 3 and 5)
    global_branch: str = "fft"         # fft | dwconv9 | dwconv11 | none
    mix: bool = True                   # the 1x1x1 Conv3d mixing the branch sum
    fusion: str = "concat"             # inter-stage fusion: concat | add | max | none

    def validate(self) -> None:
        if not self.alpha > 0:
            raise MedTuningError("INVALID_OPTION", f"adapter alpha must be positive, not {self.alpha}",
                                 "use e.g. --alpha 6 (the paper's default)")
        if self.global_branch not in GLOBAL_BRANCHES:
            raise MedTuningError("INVALID_OPTION", f"unknown adapter global branch {self.global_branch!r}",
                                 f"choose one of {', '.join(GLOBAL_BRANCHES)}")
        if self.fusion not in FUSIONS:
            raise MedTuningError("INVALID_OPTION", f"unknown inter-stage fusion {self.fusion!r}",
                                 f"choose one of {', '.join(FUSIONS)}")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (not its weights)."""

    arch: str = "vit_upernet"
    backbone: str | None = None        # timm name; None -> the paper's backbone for the arch
    in_channels: int = 4
    num_classes: int = 4
    img_size: int = 128                # slice H = W the model is built for
    depth: int = 128                   # crop depth D the FFT filters are sized for
    method: str = "med_tuning"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    backbone_kwargs: dict = field(default_factory=dict)
    decoder_width: int | None = None   # None -> the paper's decoder widths

    @property
    def family(self) -> str:
        return ARCH_DEFAULTS[self.arch]["family"]

    @property
    def decoder(self) -> str:
        return ARCH_DEFAULTS[self.arch]["decoder"]

    @property
    def backbone_name(self) -> str:
        return self.backbone or ARCH_DEFAULTS[self.arch]["backbone"]

    def resolved_backbone_kwargs(self) -> dict:
        """The arch's default kwargs overlaid with the user's ``backbone_kwargs``."""
        kwargs = dict(ARCH_DEFAULTS[self.arch]["backbone_kwargs"])
        kwargs.update(self.backbone_kwargs or {})
        return kwargs

    def validate(self) -> None:
        if self.arch not in ARCH_DEFAULTS:
            raise MedTuningError("UNKNOWN_ARCH", f"unknown architecture {self.arch!r}",
                                 f"choose one of {', '.join(ARCH_DEFAULTS)}")
        if self.method not in METHODS:
            raise MedTuningError("UNKNOWN_METHOD", f"unknown tuning method {self.method!r}",
                                 f"choose one of {', '.join(METHODS)}")
        if self.family == "swin_unetr" and self.method not in CORE_METHODS:
            raise MedTuningError("INVALID_OPTION", f"method {self.method!r} is not available for swin_unetr",
                                 f"use one of {', '.join(CORE_METHODS)} with swin_unetr")
        for name in ("in_channels", "num_classes", "img_size", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise MedTuningError("INVALID_OPTION", f"{name} must be a positive integer, not {value!r}")
        if self.decoder_width is not None and self.decoder_width < 1:
            raise MedTuningError("INVALID_OPTION", f"decoder_width must be positive, not {self.decoder_width}")
        self.adapter.validate()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["backbone_kwargs"] = _json_safe(d["backbone_kwargs"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        adapter = d.pop("adapter", None) or {}
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known},
                  adapter=adapter if isinstance(adapter, AdapterConfig) else AdapterConfig(
                      **{k: v for k, v in adapter.items() if k in {f.name for f in fields(AdapterConfig)}}))
        cfg.backbone_kwargs = dict(cfg.backbone_kwargs or {})
        return cfg


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
