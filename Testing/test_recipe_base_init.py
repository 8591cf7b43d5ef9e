"""--base-init official leaves random exactly what the official code leaves random (a weight file made
here): ViT _load_weights never loads the position embedding; Swin-UNet load_from loads every tensor
whose shape fits, decoder stage i from encoder stage i, and drops the rest (4-channel patch embedding,
relative-position tables of another window). Random frozen tensors travel in the model's tuned weights."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import adapt_input_conv

from MedTuningLib.models import ModelConfig, build_model, load_base_weights
from MedTuningLib.models.weights import init_swin_decoder_from_encoder


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save(model: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_vit_official_init_leaves_only_the_position_embedding_random(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=48, depth=4, embed_dim=48, num_heads=3)
    path = save(src, tmp_path / "vit.safetensors")
    cfg = ModelConfig(arch="vit_upernet", in_channels=4, num_classes=4, img_size=32, depth=4, decoder_width=16,
                      backbone_kwargs={"depth": 4, "embed_dim": 48, "num_heads": 3, "patch_size": 16})
    model = build_model(cfg)
    info = load_base_weights(model, path, init="official")
    bb = model.encoder.backbone
    file = src.state_dict()
    # The official loader: patch embedding adapted by timm's adapt_input_conv, every block and the final norm.
    expected = {k: v for k, v in file.items() if k in bb.state_dict()}
    expected["patch_embed.proj.weight"] = adapt_input_conv(4, file["patch_embed.proj.weight"])
    own = bb.state_dict()
    left_random = sorted(k for k in own if k not in expected or expected[k].shape != own[k].shape
                         or not torch.allclose(own[k], expected[k]))
    assert left_random == ["pos_embed"]
    assert 0.012 < float(bb.pos_embed.detach().std()) < 0.028  # the official torch.randn(...) * .02, not the file's
    assert bb.pos_embed.requires_grad and model.random_base_keys == ["encoder.backbone.pos_embed"]
    assert info.init == "official" and info.random == ["pos_embed"] and info.to_dict()["init"] == "official"


def test_swin_official_init_random_set_decoder_from_encoder_and_storage(tmp_path):
    torch.manual_seed(0)
    heads = (1, 2, 4, 8)
    src = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24, num_heads=heads)
    path = save(src, tmp_path / "swin.safetensors")
    cfg = ModelConfig(arch="swin_unet", in_channels=4, num_classes=4, img_size=32, depth=4,
                      backbone_kwargs={"embed_dim": 24, "num_heads": heads, "window_size": 2})
    model = build_model(cfg)
    before = snapshot(model)
    load_base_weights(model, path, init="official")
    after = model.state_dict()
    file = src.state_dict()

    tables = [f"layers.{i}.blocks.{j}.attn.relative_position_bias_table" for i in range(4) for j in range(2)]
    official_random = sorted(["patch_embed.proj.weight", *tables])  # 3 -> 4 channels; window 7 -> 2
    backbone = {k[len("encoder.backbone."):]: v for k, v in after.items() if k.startswith("encoder.backbone.")}
    derived = ("relative_position_index", "attn_mask")
    from_file = sorted(k for k in backbone if not k.endswith(derived) and k in file
                       and torch.equal(backbone[k], file[k]))
    random = sorted(k for k in backbone if not k.endswith(derived) and k not in from_file)
    assert random == official_random
    for k in random:  # left as built (random), not adapted or resized from the file
        assert torch.equal(backbone[k], before[f"encoder.backbone.{k}"]), k
    assert "patch_embed.proj.bias" in from_file and "layers.2.blocks.1.mlp.fc2.weight" in from_file

    # Decoder level i (our stages[2 - i]) takes encoder stage i's blocks; its own tables stay random.
    copied = 0
    for name, value in after.items():
        if not name.startswith("decoder."):
            continue
        parts = name.split(".")
        if parts[1] == "stages" and not name.endswith(("relative_position_bias_table", *derived)):
            source = f"layers.{2 - int(parts[2])}.blocks.{parts[3]}.{'.'.join(parts[4:])}"
            assert torch.equal(value, file[source]), name
            copied += value.numel()
        elif not name.endswith(derived):
            assert torch.equal(value, before[name]), name  # concat linears, expands, norms, classifier
    # 12 C^2 + 13 C per Swin block (norms, qkv, proj, MLP), two blocks at C = 96, 48, 24.
    assert copied == sum(2 * (12 * c * c + 13 * c) for c in (96, 48, 24))

    # The random frozen tensors are stored with the tuned weights, and rebuild the model exactly.
    assert not model.encoder.backbone.patch_embed.proj.weight.requires_grad
    tuned = model.tuned_state_dict()
    assert {f"encoder.backbone.{k}" for k in official_random} <= set(tuned)
    again = build_model(cfg)
    load_base_weights(again, path, init="official")
    again.load_tuned_state_dict(tuned)
    for name, value in again.state_dict().items():
        assert torch.equal(value, after[name]), name


def test_full_swin_t_decoder_gets_4_66_million_parameters_from_the_encoder():
    src = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    model = build_model(ModelConfig(arch="swin_unet", in_channels=4, num_classes=4, img_size=128, depth=2))
    assert init_swin_decoder_from_encoder(model, src.state_dict()) == 4_662_336


def test_norm_eps_and_trunc_normal_decoder_init():
    from MedTuningLib.engine.recipe import init_decoder_trunc_normal

    kwargs = dict(arch="vit_upernet", in_channels=1, num_classes=2, img_size=32, depth=4, decoder_width=16,
                  backbone_kwargs={"depth": 4, "embed_dim": 48, "num_heads": 3, "patch_size": 16})
    default = build_model(ModelConfig(**kwargs))
    official = build_model(ModelConfig(**kwargs, norm_eps=1e-5))
    norms = lambda m: [n.eps for n in m.encoder.backbone.modules() if isinstance(n, torch.nn.LayerNorm)]  # noqa: E731
    assert set(norms(default)) == {1e-6} and set(norms(official)) == {1e-5}
    assert len(norms(official)) == 2 * 4 + 1  # two per block and the final norm
    assert ModelConfig.from_dict(official.config.to_dict()).norm_eps == 1e-5  # rebuilt from medtuning.json

    torch.manual_seed(0)
    swin = build_model(ModelConfig(arch="swin_unet", in_channels=4, num_classes=4, img_size=128, depth=2))
    assert init_decoder_trunc_normal(swin) > 0
    weights = torch.cat([m.weight.detach().flatten() for m in swin.decoder.modules() if isinstance(m, torch.nn.Linear)])
    # As timm's trunc_normal_ in the official code: std 0.02, cut at ±2 (absolute, so hardly ever).
    assert float(weights.std()) == pytest.approx(0.02, rel=0.05) and float(weights.abs().max()) <= 2.0
    for m in swin.decoder.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            assert not m.bias.detach().any()
        if isinstance(m, torch.nn.LayerNorm):
            assert bool((m.weight == 1).all()) and not m.bias.detach().any()
