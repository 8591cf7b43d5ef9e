"""Tuning methods (PEFT-style): a method decides what is inserted into the encoder and what trains.

``apply_method(model)`` inserts the method's modules at the encoder's insertion points and sets
``requires_grad`` (docs/method.md "Other tuning methods compared"):

| method | inserted | trained |
|---|---|---|
| scratch | nothing (random base weights) | everything |
| full | nothing | everything |
| head | nothing | decoder + leftovers (ViT: position embedding, final norm; Swin: final norm) |
| med_tuning | a Med-Adapter after every block (last of each stage: inter-stage fusion) | head + adapters |
| vpt_shallow / vpt_deep | 10 prompt tokens before the first block / before every block | head + prompts |
| adapter | Houlsby: bottleneck C/8 after attention and after the MLP of every block | head + adapters |
| adaptformer | bottleneck 64, scale 0.1, parallel to every MLP | head + adapters |
| st_adapter | before every block: C/2, depthwise Conv3d (3,1,1) across slices | head + adapters |
| pro_tuning | a conv prompt block at the end of every stage | head + prompt blocks |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from MedTuningLib.errors import MedTuningError
from MedTuningLib.models.med_adapter import MedAdapter
from MedTuningLib.models.peft_modules import BottleneckAdapter, ProTuningBlock, STAdapter, VisualPrompts

if TYPE_CHECKING:
    from MedTuningLib.models.factory import MedTuningModel

VPT_TOKENS = 10
HOULSBY_REDUCTION = 8
ADAPTFORMER_WIDTH = 64
ADAPTFORMER_SCALE = 0.1

# Methods whose backbone starts from pretrained weights (scratch trains from random initialisation).
PRETRAINED_METHODS = ("full", "head", "med_tuning", "vpt_shallow", "vpt_deep", "adapter", "adaptformer",
                      "st_adapter", "pro_tuning")


def insert_med_adapters(model: "MedTuningModel") -> None:
    cfg, enc = model.config, model.encoder
    align = {"vit": "vit", "swin": "swin", "swin_unetr": "swin3d"}[enc.family]
    for i, dim in enumerate(enc.block_dims):
        depth = cfg.depth
        if enc.family == "swin_unetr":
            # 3D Swin: patch size 2, then every stage halves D: the FFT filter fits that stage's depth.
            depth = max(1, cfg.depth // (2 * 2 ** enc.stage_of_block(i)))
        enc.after[i].append(MedAdapter(dim, depth, cfg.adapter, inter_stage=i in enc.stage_ends, align=align))


def _insert(model: "MedTuningModel") -> None:
    method, enc = model.config.method, model.encoder
    if method == "med_tuning":
        insert_med_adapters(model)
    elif method in ("vpt_shallow", "vpt_deep"):
        dims = enc.block_dims if method == "vpt_deep" else enc.block_dims[:1]
        enc.prompts = VisualPrompts(list(dims), VPT_TOKENS)
    elif method == "adapter":
        for i, dim in enumerate(enc.block_dims):
            enc.inner[i]["attn_out"] = BottleneckAdapter(dim, max(1, dim // HOULSBY_REDUCTION))
            enc.inner[i]["mlp_out"] = BottleneckAdapter(dim, max(1, dim // HOULSBY_REDUCTION))
    elif method == "adaptformer":
        for i, dim in enumerate(enc.block_dims):
            enc.inner[i]["mlp_parallel"] = BottleneckAdapter(dim, ADAPTFORMER_WIDTH, scale=ADAPTFORMER_SCALE,
                                                             residual=False, zero_init=True, kind="adaptformer")
    elif method == "st_adapter":
        for i, dim in enumerate(enc.block_dims):
            enc.before[i].append(STAdapter(dim, max(1, dim // 2)))
    elif method == "pro_tuning":
        for i in enc.stage_ends:
            enc.after[i].append(ProTuningBlock(enc.block_dims[i]))


def apply_method(model: "MedTuningModel") -> None:
    """Insert the configured method's modules and mark what trains (idempotent only on a fresh model)."""
    method = model.config.method
    if method in ("vpt_shallow", "vpt_deep", "adapter", "adaptformer", "st_adapter", "pro_tuning") \
            and model.encoder.family == "swin_unetr":
        raise MedTuningError("INVALID_OPTION", f"method {method!r} is not available for swin_unetr",
                             "use scratch, full, head or med_tuning with swin_unetr")
    _insert(model)
    if method in ("scratch", "full"):
        for p in model.parameters():
            p.requires_grad_(True)
        return
    leftovers = set(model.encoder.leftover_parameter_names())
    for name, p in model.encoder.backbone.named_parameters():
        p.requires_grad_(name in leftovers)
    for name, p in model.named_parameters():
        if not name.startswith("encoder.backbone."):
            p.requires_grad_(True)  # decoder and inserted modules
