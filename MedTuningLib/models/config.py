"""Model settings: :class:`ModelConfig` (architecture, backbone, sizes, tuning method) and
:class:`AdapterConfig` (the Med-Adapter and its ablation switches, docs/method.md "The method").

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
# Swin-UNet uses Swin-T in the "lite" shape: depths 2,2,2,2 (docs/method.md); its window is set from the
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

# Backbone keyword arguments that --backbone-args or a model folder's medtuning.json may set: sizes, rates
# and switches only (issue 15). timm's checkpoint_path / pretrained_cfg make it torch.load a file or reach
# a hub: anything naming a file or a hub is refused with UNSAFE_FILE, any other unknown name with
# INVALID_OPTION, so that nothing is ever unpickled or downloaded through configuration.
_SIZE, _RATE, _RATIO, _FLAG = "a positive integer (or a list of them)", "a number from 0 to below 1", \
    "a positive number", "true or false"
_COMMON = {"patch_size": _SIZE, "embed_dim": _SIZE, "num_heads": _SIZE, "img_size": _SIZE, "mlp_ratio": _RATIO,
           "qkv_bias": _FLAG, "drop_rate": _RATE, "attn_drop_rate": _RATE, "proj_drop_rate": _RATE,
           "drop_path_rate": _RATE}
BACKBONE_KWARGS: dict[str, dict[str, str]] = {
    "vit": {**_COMMON, "depth": _SIZE, "qk_norm": _FLAG, "init_values": _RATIO, "no_embed_class": _FLAG,
            "pre_norm": _FLAG},
    "swin": {**_COMMON, "depths": _SIZE, "window_size": _SIZE, "ape": _FLAG, "patch_norm": _FLAG},
    "swin_unetr": {"feature_size": _SIZE, "depths": _SIZE, "num_heads": _SIZE, "window_size": _SIZE,
                   "patch_size": _SIZE, "mlp_ratio": _RATIO, "qkv_bias": _FLAG, "drop_rate": _RATE,
                   "attn_drop_rate": _RATE, "dropout_path_rate": _RATE, "normalize": _FLAG, "patch_norm": _FLAG,
                   "use_checkpoint": _FLAG, "use_v2": _FLAG},
}
_UNSAFE_WORDS = ("checkpoint", "pretrained", "path", "file", "hub", "url", "cache", "cfg", "config", "load", "dir",
                 "repo")
MAX_SIZE = 65536  # any size of a backbone, crop or decoder stays below this
_SETTINGS_HINT = ("check the model options (--crop, --decoder-width, --backbone); a model folder with such a value "
                  "is damaged or was edited: train it again")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fits(value: Any, kind: str) -> bool:
    import math

    if kind == _SIZE:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        return bool(values) and all(_is_int(v) and 1 <= v <= MAX_SIZE for v in values)
    if kind == _FLAG:
        return isinstance(value, bool)
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        return False
    return 0 <= value < 1 if kind == _RATE else 0 < value <= 1000


def check_backbone_kwargs(family: str, kwargs: Any) -> None:
    """Refuse backbone keyword arguments outside :data:`BACKBONE_KWARGS` (see there why)."""
    where = "(from --backbone-args or a model folder's medtuning.json)"
    if not isinstance(kwargs, dict):
        raise MedTuningError("INVALID_OPTION", f"backbone settings {where} must be KEY=VALUE pairs, not {kwargs!r}",
                             'write e.g. --backbone-args "depth=4,embed_dim=192,num_heads=3"')
    allowed = BACKBONE_KWARGS.get(family, {})
    for key, value in kwargs.items():
        if key not in allowed:
            if any(word in str(key).lower() for word in _UNSAFE_WORDS) or isinstance(value, str):
                raise MedTuningError("UNSAFE_FILE", f"backbone setting {key}={value!r} {where} would make the "
                                     "backbone library load a file or reach a hub; MedTuning never loads weights "
                                     "through settings (a checkpoint could run code when unpickled)",
                                     "give base weights with --weights FILE (safetensors), and only sizes in "
                                     "--backbone-args: " + ", ".join(sorted(allowed)))
            raise MedTuningError("INVALID_OPTION", f"unknown backbone setting {key!r} {where}",
                                 "use only " + ", ".join(sorted(allowed)))
        if not _fits(value, allowed[key]):
            raise MedTuningError("INVALID_OPTION", f"backbone setting {key} must be {allowed[key]}, not {value!r} "
                                 f"{where}", "e.g. depth=4,embed_dim=192,num_heads=3,patch_size=8")


@dataclass
class AdapterConfig:
    """The Med-Adapter: bottleneck ``h = int(C / alpha)`` and the paper's ablation switches."""

    alpha: float = 6.0
    local_branch: bool = True          # multi-scale depthwise 3D convs (k = 3 and 5)
    global_branch: str = "fft"         # fft | dwconv9 | dwconv11 | none
    mix: bool = True                   # the 1x1x1 Conv3d mixing the branch sum
    fusion: str = "concat"             # inter-stage fusion: concat | add | max | none

    def validate(self) -> None:
        import math

        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha) \
                or not self.alpha > 0:
            raise MedTuningError("INVALID_OPTION", f"adapter alpha must be a positive number, not {self.alpha!r}",
                                 "use e.g. --alpha 6 (the paper's default)")
        for name in ("local_branch", "mix"):
            if not isinstance(getattr(self, name), bool):
                raise MedTuningError("INVALID_OPTION", f"adapter {name} must be true or false, not "
                                     f"{getattr(self, name)!r}", "the model folder is damaged or was edited: train it "
                                     "again")
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
    norm_eps: float | None = None      # ViT LayerNorm eps; None -> timm's 1e-6 (official code: 1e-5)

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
        if not isinstance(self.arch, str) or self.arch not in ARCH_DEFAULTS:
            raise MedTuningError("UNKNOWN_ARCH", f"unknown architecture {self.arch!r}",
                                 f"choose one of {', '.join(ARCH_DEFAULTS)}")
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise MedTuningError("UNKNOWN_METHOD", f"unknown tuning method {self.method!r}",
                                 f"choose one of {', '.join(METHODS)}")
        if self.family == "swin_unetr" and self.method not in CORE_METHODS:
            raise MedTuningError("INVALID_OPTION", f"method {self.method!r} is not available for swin_unetr",
                                 f"use one of {', '.join(CORE_METHODS)} with swin_unetr")
        for name in ("in_channels", "num_classes", "img_size", "depth"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= MAX_SIZE:
                raise MedTuningError("INVALID_OPTION", f"{name} must be a positive integer up to {MAX_SIZE}, not "
                                     f"{value!r}", _SETTINGS_HINT)
        if self.decoder_width is not None and (not _is_int(self.decoder_width)
                                               or not 1 <= self.decoder_width <= MAX_SIZE):
            raise MedTuningError("INVALID_OPTION", f"decoder_width must be a positive integer, not {self.decoder_width!r}",
                                 _SETTINGS_HINT)
        if self.backbone is not None and not isinstance(self.backbone, str):
            raise MedTuningError("UNKNOWN_BACKBONE", f"backbone must be a timm name, not {self.backbone!r}",
                                 _SETTINGS_HINT)
        check_backbone_kwargs(self.family, self.backbone_kwargs)
        self.adapter.validate()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["backbone_kwargs"] = _json_safe(d["backbone_kwargs"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise MedTuningError("MODEL_FOLDER_INVALID", f"the architecture must be a JSON object, not {d!r}",
                                 "the model folder is damaged: train it again or copy it again")
        d = dict(d)
        adapter = d.pop("adapter", None) or {}
        if not isinstance(adapter, (dict, AdapterConfig)):
            raise MedTuningError("MODEL_FOLDER_INVALID", f"the adapter settings must be a JSON object, not {adapter!r}",
                                 "the model folder is damaged: train it again or copy it again")
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known},
                  adapter=adapter if isinstance(adapter, AdapterConfig) else AdapterConfig(
                      **{k: v for k, v in adapter.items() if k in {f.name for f in fields(AdapterConfig)}}))
        if isinstance(cfg.backbone_kwargs, dict) or cfg.backbone_kwargs is None:  # else refused by validate()
            cfg.backbone_kwargs = dict(cfg.backbone_kwargs or {})
        return cfg


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
