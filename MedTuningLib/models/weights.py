"""Loading pretrained base weights into a model's backbone (``--weights hub|FILE|none``).

Sources: ``hub`` (the timm / Hugging Face cache, downloading only where the machine can),
a local ``.safetensors`` file holding a timm-format state dict of the backbone (for swin_unetr:
MONAI's ``swinViT`` weights), or ``none`` (random, recorded as not pretrained). Nothing is unpickled.

Conversion, as timm's ``checkpoint_filter_fn`` does for its own models (docs/method.md):
ViT: class token dropped, position embedding resampled to the slice grid, patch embedding adapted
to the input channels (and resampled to another patch size); Swin: relative-position tables resized
to the window in use, blocks beyond the model's stage depths dropped (Swin-T -> lite: stage 3 keeps
its first two blocks), patch embedding adapted. Only the backbone receives weights; what trains is
left as the method set it.

``init="official"`` (``--base-init official``, part of ``--recipe paper``) loads instead as the official
Med-Tuning code does (github jessie-chen99/Med-Tuning-Official @82dea1e): ViT (``_load_weights`` of the
.npz): everything but the position embedding, which stays random (``randn · 0.02``) and is learned; Swin
(``load_from``): every tensor whose shape fits, anything else left random (with 4 input channels the
patch-embedding weight; with window 4 every relative-position table), and the Swin-UNet decoder's Swin
blocks initialised from the encoder stage of the same width (stage i -> decoder level i, 4.66 M parameters
for Swin-T). Tensors left random in the frozen backbone cannot be rebuilt from the base weights, so the
model records them (``random_base_keys``) and they are stored with the tuned weights. docs/method.md
lists these differences.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from MedTuningLib.errors import MedTuningError

DERIVED_BUFFERS = ("relative_position_index", "attn_mask")
BASE_INITS = ("project", "official")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".pkl", ".pickle", ".ckpt", ".tar", ".pth.tar")


@dataclass
class BaseWeights:
    """Where a model's base weights came from (recorded in the model folder)."""

    id: str
    source: str  # "hub" | "file" | "none"
    sha256: str | None
    pretrained: bool
    path: str | None = None
    init: str = "project"  # "official": loaded as the official Med-Tuning code does (see the module docstring)
    random: list[str] | None = None  # official init: backbone tensors left random (stored with the model)

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; refuse pickles (UNSAFE_FILE) and anything else (WEIGHTS_INCOMPATIBLE)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from MedTuningLib.fileio import is_pickle_file

    name = path.name.lower()
    if name.endswith(PICKLE_SUFFIXES) or is_pickle_file(path):
        raise MedTuningError(
            "UNSAFE_FILE", f"{path} is a pickle-based checkpoint; MedTuning never unpickles files",
            "convert it once where you trust it: python -c \"import torch, safetensors.torch as s; "
            f"sd = torch.load('{path.name}', map_location='cpu', weights_only=True); "
            "sd = sd.get('model', sd.get('state_dict', sd)); "
            f"s.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.stem}.safetensors')\"",
            path=str(path))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MedTuningError("WEIGHTS_INCOMPATIBLE", f"{path} is not a readable safetensors file ({exc})",
                             "give a .safetensors state dict of the backbone (timm format)", path=str(path)) from exc


def _hub_id(name: str) -> str:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        raise MedTuningError("WEIGHTS_DOWNLOAD_FAILED", f"timm has no Hugging Face weights for {name!r}",
                             hint="use --weights FILE or --weights none")
    return hub_id


def cached_hub_file(name: str) -> Path | None:
    """The pretrained weights of a timm model if already in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(_hub_id(name), filename="model.safetensors")
    except MedTuningError:
        return None
    return Path(found) if isinstance(found, str) else None


def _hub_file(name: str) -> Path:
    """The cached (or downloaded) safetensors weights of a timm model, through timm's pretrained config."""
    from huggingface_hub import hf_hub_download

    hub_id = _hub_id(name)
    try:
        return Path(hf_hub_download(hub_id, filename="model.safetensors"))
    except Exception as exc:  # offline, not cached, network error, no such file
        raise MedTuningError("WEIGHTS_DOWNLOAD_FAILED",
                             f"pretrained weights for {name!r} ({hub_id}) are not in the Hugging Face cache "
                             f"and could not be downloaded ({type(exc).__name__})",
                             hint="use --weights FILE or --weights none") from exc


# -- conversion ------------------------------------------------------------------------------------
def _strip_prefixes(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-conv weight ``[O, I, *k]`` to ``in_chans`` input channels (timm's rule, any ndim).

    3-channel weights go through timm's ``adapt_input_conv`` (sum for 1 channel; repeat and rescale
    by 3 / N otherwise); other source channel counts are repeated and rescaled the same way.
    """
    src = weight.shape[1]
    if src == in_chans:
        return weight
    if weight.ndim == 4 and src == 3:
        from timm.models import adapt_input_conv

        return adapt_input_conv(in_chans, weight)
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_chans // src)
        w = w.repeat(1, reps, *([1] * (w.ndim - 2)))[:, :in_chans] * (src / in_chans)
    return w.to(weight.dtype)


def convert_vit(sd: dict[str, torch.Tensor], backbone: torch.nn.Module,
                progress: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    sd = _strip_prefixes(sd, ("module.", "backbone.", "encoder.backbone."))
    out = {}
    grid = list(backbone.patch_embed.grid_size)
    for k, v in sd.items():
        if k in ("cls_token", "reg_token", "dist_token") or k.startswith(("head.", "fc_norm.", "pre_logits.")):
            continue  # no class token in the slice encoder; no classifier
        if k == "pos_embed":
            n = v.shape[1]
            prefix = n - int(round((n ** 0.5))) ** 2 if int(n ** 0.5) ** 2 != n else 0
            if prefix:  # drop the class token's position
                v = v[:, prefix:]
            old = int(round(v.shape[1] ** 0.5))
            if [old, old] != grid:
                _say(progress, f"position embedding resized from {old}x{old} to {grid[0]}x{grid[1]}")
            v = resample_abs_pos_embed(v, new_size=grid, old_size=[old, old], num_prefix_tokens=0)
        elif k == "patch_embed.proj.weight":
            target = backbone.patch_embed.proj.weight
            if v.shape[1] != target.shape[1]:
                _say(progress, f"patch embedding adapted from {v.shape[1]} to {target.shape[1]} input channels")
                v = adapt_input_channels(v, target.shape[1])
            if tuple(v.shape[-2:]) != tuple(target.shape[-2:]):
                _say(progress, f"patch embedding resampled from {tuple(v.shape[-2:])} to {tuple(target.shape[-2:])}")
                v = resample_patch_embed(v, list(target.shape[-2:]))
        elif (m := re.match(r"blocks\.(\d+)\.", k)) and int(m.group(1)) >= len(backbone.blocks):
            continue  # a deeper checkpoint than the model: keep the first blocks
        out[k] = v
    return out


def convert_swin(sd: dict[str, torch.Tensor], backbone: torch.nn.Module,
                 progress: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    from timm.layers import resample_patch_embed, resize_rel_pos_bias_table
    from timm.models.swin_transformer import checkpoint_filter_fn

    sd = _strip_prefixes(sd, ("module.", "backbone.", "encoder.backbone."))
    # Blocks beyond the model's stage depths are dropped first (Swin-T 2,2,6,2 -> lite 2,2,2,2).
    depths = [len(stage.blocks) for stage in backbone.layers]
    trimmed = {}
    dropped = 0
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m and (int(m.group(1)) >= len(depths) or int(m.group(2)) >= depths[int(m.group(1))]):
            dropped += 1
            continue
        if k.startswith("head."):
            continue
        trimmed[k] = v
    if dropped:
        _say(progress, f"dropped {dropped} tensors of blocks beyond the stage depths {depths}")
    target = backbone.patch_embed.proj.weight
    pe = trimmed.get("patch_embed.proj.weight")
    if pe is not None and pe.shape[1] != target.shape[1]:
        _say(progress, f"patch embedding adapted from {pe.shape[1]} to {target.shape[1]} input channels")
        trimmed["patch_embed.proj.weight"] = adapt_input_channels(pe, target.shape[1])
    out = {}
    resized = 0
    for k, v in trimmed.items():
        if k.endswith("relative_position_bias_table"):
            attn = backbone.get_submodule(k[: -len(".relative_position_bias_table")])
            if v.shape != attn.relative_position_bias_table.shape:
                resized += 1
                v = resize_rel_pos_bias_table(v, new_window_size=attn.window_size,
                                              new_bias_shape=attn.relative_position_bias_table.shape)
            out[k] = v
        elif k == "patch_embed.proj.weight" and tuple(v.shape[-2:]) != tuple(target.shape[-2:]):
            out[k] = resample_patch_embed(v, list(target.shape[-2:]))
        else:
            out[k] = v
    if resized:
        _say(progress, f"resized {resized} relative-position tables to the windows in use")
    # timm's own filter converts original (Microsoft) layouts; timm-format tensors pass through it as they are.
    return checkpoint_filter_fn(out, backbone)


def convert_swin_unetr(sd: dict[str, torch.Tensor], backbone: torch.nn.Module,
                       progress: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    sd = _strip_prefixes(sd, ("module.swinViT.", "swinViT.", "module.", "encoder.backbone."))
    out = {k: v for k, v in sd.items() if not k.endswith(DERIVED_BUFFERS)}
    target = backbone.patch_embed.proj.weight
    pe = out.get("patch_embed.proj.weight")
    if pe is not None and pe.shape[1] != target.shape[1]:
        _say(progress, f"patch embedding adapted from {pe.shape[1]} to {target.shape[1]} input channels")
        out["patch_embed.proj.weight"] = adapt_input_channels(pe, target.shape[1])
    return out


CONVERTERS = {"vit": convert_vit, "swin": convert_swin, "swin_unetr": convert_swin_unetr}


def convert_vit_official(sd: dict[str, torch.Tensor], backbone: torch.nn.Module,
                         progress: Callable[[str], None] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """As :func:`convert_vit`, but the position embedding is not loaded (official ``_load_weights``)."""
    out = convert_vit(sd, backbone, None)
    out.pop("pos_embed", None)
    if "pos_embed" in dict(backbone.named_parameters()):
        with torch.no_grad():  # the official initialisation: torch.randn(1, L, C) * .02
            backbone.pos_embed.copy_(torch.randn_like(backbone.pos_embed) * 0.02)
        _say(progress, "official initialisation: position embedding left random (randn * 0.02), to be learned")
        return out, ["pos_embed"]
    return out, []


def _swin_trimmed(sd: dict[str, torch.Tensor], backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors of blocks that exist in ``backbone`` (Swin-T -> lite), without the classifier."""
    sd = _strip_prefixes(sd, ("module.", "backbone.", "encoder.backbone."))
    if "layers.0.downsample.reduction.weight" in sd:  # the original (Microsoft) layout: merging ends a stage
        sd = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k): v
              for k, v in sd.items()}
    depths = [len(stage.blocks) for stage in backbone.layers]
    out = {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m and (int(m.group(1)) >= len(depths) or int(m.group(2)) >= depths[int(m.group(1))]):
            continue
        if not k.startswith("head."):
            out[k] = v
    return out


def convert_swin_official(sd: dict[str, torch.Tensor], backbone: torch.nn.Module,
                          progress: Callable[[str], None] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official ``load_from``: every tensor whose shape fits; the others stay random (nothing is adapted)."""
    own = backbone.state_dict()
    out, left = {}, []
    for k, v in _swin_trimmed(sd, backbone).items():
        if k in own and tuple(v.shape) == tuple(own[k].shape):
            out[k] = v
    for k in own:
        if k not in out and not k.endswith(DERIVED_BUFFERS):
            left.append(k)
    if left:
        _say(progress, f"official initialisation: {len(left)} backbone tensors of another shape left random "
                       f"(e.g. {', '.join(left[:2])})")
    return out, left


OFFICIAL_CONVERTERS = {"vit": convert_vit_official, "swin": convert_swin_official}


def init_swin_decoder_from_encoder(model: torch.nn.Module, sd: dict[str, torch.Tensor],
                                   progress: Callable[[str], None] | None = None) -> int:
    """Official Swin-UNet ``load_from``: decoder level i's Swin blocks take encoder stage i's pretrained
    tensors (official ``layers_up.{3-i}`` <- ``layers.{i}``), where shapes fit; returns the parameters set."""
    decoder = model.decoder
    stages = getattr(decoder, "stages", None)
    if stages is None:
        return 0
    source = _swin_trimmed(sd, model.encoder.backbone)
    top = len(stages)  # decoder.stages[0] is level top-1 (the widest), the last is level 0
    own = decoder.state_dict()
    update = {}
    for k, v in source.items():
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)$", k)
        if not m or int(m.group(1)) >= top or k.endswith(DERIVED_BUFFERS):
            continue
        target = f"stages.{top - 1 - int(m.group(1))}.{m.group(2)}.{m.group(3)}"
        if target in own and tuple(own[target].shape) == tuple(v.shape):
            update[target] = v
    with torch.no_grad():
        decoder.load_state_dict(update, strict=False)
    count = sum(v.numel() for v in update.values())
    _say(progress, f"official initialisation: {len(update)} decoder tensors ({count:,} parameters) from the "
                   "pretrained encoder stages")
    return count


def _load_into_backbone(backbone: torch.nn.Module, sd: dict[str, torch.Tensor], source: str,
                        keep: Sequence[str] = ()) -> int:
    own = backbone.state_dict()
    # Index buffers follow from the model's own window sizes: always the model's, never the file's;
    # ``keep``: tensors the official initialisation leaves as they are (random).
    sd = {**sd, **{k: v for k, v in own.items() if k.endswith(DERIVED_BUFFERS) or k in keep}}
    missing = sorted(k for k in own if k not in sd)
    wrong = sorted(k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} backbone tensors missing (e.g. {', '.join(missing[:3])})")
        if wrong:
            details.append("wrong shapes: " + ", ".join(
                f"{k} {list(sd[k].shape)} vs {list(own[k].shape)}" for k in wrong[:3]))
        raise MedTuningError("WEIGHTS_INCOMPATIBLE", f"{source} does not fit this backbone: " + "; ".join(details),
                             "give weights of the same backbone family and size (timm-format state dict), "
                             "or --weights none")
    with torch.no_grad():
        backbone.load_state_dict({k: sd[k] for k in own}, strict=True)
    return len(own)


def load_base_weights(model: torch.nn.Module, weights: str,
                      progress: Callable[[str], None] | None = None, init: str = "project") -> BaseWeights:
    """Fill ``model``'s backbone from ``weights`` ("hub", a .safetensors path, or "none").

    ``progress`` (optional) receives short human-readable notes on what was converted. ``init="official"``
    loads as the official code does (module docstring); the backbone tensors it leaves random are listed in
    ``model.random_base_keys`` (stored with the tuned weights) and in the returned record.
    """
    cfg = model.config
    family = model.encoder.family
    if init not in BASE_INITS:
        raise MedTuningError("INVALID_OPTION", f"unknown base-weight initialisation {init!r}",
                             f"use one of {', '.join(BASE_INITS)}")
    if init == "official" and family not in OFFICIAL_CONVERTERS:
        raise MedTuningError("INVALID_OPTION", f"--base-init official exists for the paper's ViT and Swin models, "
                             f"not for {cfg.arch}", "use --base-init project with this architecture")
    if weights is None or str(weights).lower() == "none":
        return BaseWeights(id="none", source="none", sha256=None, pretrained=False)
    if cfg.method == "scratch":
        _say(progress, "method scratch trains from random initialisation: base weights are not loaded")
        return BaseWeights(id="none", source="none", sha256=None, pretrained=False)
    if str(weights).lower() == "hub":
        if family == "swin_unetr":
            raise MedTuningError("WEIGHTS_DOWNLOAD_FAILED", "swin_unetr has no hub weights in MedTuning",
                                 hint="use --weights FILE (MONAI swinViT weights as .safetensors) or --weights none")
        name = cfg.backbone_name
        path = _hub_file(name)
        source, ident = "hub", name
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MedTuningError("WEIGHTS_NOT_FOUND", f"base-weights file {path} does not exist",
                                 "check the path, or use --weights hub / --weights none", path=str(path))
        source, ident = "file", path.name
    sd = read_safetensors(path)
    left: list[str] = []
    if init == "official":
        converted, left = OFFICIAL_CONVERTERS[family](sd, model.encoder.backbone, progress)
        if family == "swin":
            init_swin_decoder_from_encoder(model, sd, progress)
    else:
        converted = CONVERTERS[family](sd, model.encoder.backbone, progress)
    count = _load_into_backbone(model.encoder.backbone, converted, str(path), keep=left)
    # Random tensors of the backbone are not in the base file: the model folder stores them.
    model.random_base_keys = [f"encoder.backbone.{k}" for k in left]
    _say(progress, f"loaded {count - len(left)} backbone tensors from {path}")
    return BaseWeights(id=ident, source=source, sha256=sha256_file(path), pretrained=True, path=str(path),
                       init=init, random=left or None)
