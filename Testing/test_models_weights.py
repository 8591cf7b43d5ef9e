"""Base weights from a user's file end up in the backbone, converted (docs/method.md: class token dropped,
position embedding resized, channels adapted, patch size resampled, Swin tables resized, Swin-T
trimmed to the lite depths); unsafe, missing, incompatible files and an offline hub are refused."""

from __future__ import annotations

import hashlib

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed, resize_rel_pos_bias_table
from timm.models import adapt_input_conv

from MedTuningLib.errors import MedTuningError
from MedTuningLib.models import ModelConfig, build_model, load_base_weights

VIT_TINY = {"depth": 4, "embed_dim": 48, "num_heads": 3, "patch_size": 8}
SWIN_TINY = {"embed_dim": 24, "num_heads": (1, 2, 4, 8), "window_size": 2}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save(model: torch.nn.Module, path, prefix: str = "") -> str:
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def vit_cfg(method="med_tuning", **kw) -> ModelConfig:
    return ModelConfig(arch="vit_upernet", method=method, in_channels=2, num_classes=3, img_size=32, depth=4,
                       backbone_kwargs=dict(VIT_TINY), decoder_width=32, **kw)


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    """A timm ViT as timm saves it: class token, 3x3 grid (48 px, patch 16), 3 input channels."""
    torch.manual_seed(0)
    src = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=48, depth=4, embed_dim=48,
                            num_heads=3)
    return src, save(src, tmp_path_factory.mktemp("w") / "vit_tiny.safetensors")


def test_vit_file_is_converted_into_the_backbone(vit_file):
    src, path = vit_file
    model = build_model(vit_cfg())
    trains_before = {n: p.requires_grad for n, p in model.named_parameters()}
    outside_before = {n: p.detach().clone() for n, p in model.named_parameters()
                      if not n.startswith("encoder.backbone")}
    notes = []
    info = load_base_weights(model, path, progress=notes.append)
    bb = model.encoder.backbone
    for k in ("blocks.3.mlp.fc1.weight", "blocks.0.attn.qkv.weight", "norm.weight", "patch_embed.proj.bias"):
        assert torch.equal(bb.state_dict()[k], src.state_dict()[k]), k
    # Class token dropped, 3x3 grid resampled to this model's 4x4 grid.
    expected_pos = resample_abs_pos_embed(src.pos_embed[:, 1:], new_size=[4, 4], old_size=[3, 3], num_prefix_tokens=0)
    torch.testing.assert_close(bb.pos_embed, expected_pos)
    assert bb.cls_token is None
    # 3 -> 2 input channels, patch 16 -> 8.
    expected_proj = resample_patch_embed(adapt_input_conv(2, src.patch_embed.proj.weight), [8, 8])
    torch.testing.assert_close(bb.patch_embed.proj.weight, expected_proj)
    # Only the backbone changed; what trains did not.
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trains_before
    for n, v in outside_before.items():
        assert torch.equal(dict(model.named_parameters())[n], v), n
    assert info.pretrained and info.source == "file" and info.id == "vit_tiny.safetensors"
    assert info.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert info.to_dict()["path"] == path
    assert any("position embedding" in n for n in notes) and any("input channels" in n for n in notes)
    # The model still runs after loading.
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 2, 4, 32, 32)).shape == (1, 3, 4, 32, 32)


def test_swin_t_is_trimmed_and_tables_resized(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24, num_heads=(1, 2, 4, 8))
    assert [len(s.blocks) for s in src.layers] == [2, 2, 6, 2]
    path = save(src, tmp_path / "swin.safetensors")
    cfg = ModelConfig(arch="swin_unet", in_channels=1, num_classes=3, img_size=32, depth=4,
                      backbone_kwargs=dict(SWIN_TINY))
    model = build_model(cfg)
    load_base_weights(model, path)
    bb = model.encoder.backbone
    assert [len(s.blocks) for s in bb.layers] == [2, 2, 2, 2]
    # Stage 3 keeps its first two blocks.
    for k in ("layers.2.blocks.1.mlp.fc2.weight", "layers.2.blocks.0.attn.qkv.weight",
              "layers.3.downsample.reduction.weight", "norm.bias"):
        assert torch.equal(bb.state_dict()[k], src.state_dict()[k]), k
    # Window 7 tables (13x13) resized to window 2 (3x3).
    table = bb.layers[0].blocks[1].attn.relative_position_bias_table
    assert table.shape == (9, 1)
    expected = resize_rel_pos_bias_table(src.layers[0].blocks[1].attn.relative_position_bias_table,
                                         new_window_size=(2, 2), new_bias_shape=(9, 1))
    torch.testing.assert_close(table, expected)
    # 3 -> 1 input channel: timm's rule sums the RGB filters.
    torch.testing.assert_close(bb.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(dim=1, keepdim=True))


def test_swin_unetr_file_with_monai_prefix(tmp_path):
    from monai.networks.nets import SwinUNETR

    src = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    path = save(src.swinViT, tmp_path / "swinvit.safetensors", prefix="swinViT.")
    cfg = ModelConfig(arch="swin_unetr", in_channels=2, num_classes=3, img_size=64, depth=64,
                      backbone_kwargs={"feature_size": 12})
    model = build_model(cfg)
    load_base_weights(model, path)
    bb = model.encoder.backbone
    k = "layers3.0.blocks.1.mlp.linear1.weight"
    assert torch.equal(bb.state_dict()[k], src.swinViT.state_dict()[k])
    w = src.swinViT.patch_embed.proj.weight
    torch.testing.assert_close(bb.patch_embed.proj.weight, torch.cat([w, w], dim=1) / 2)


def test_pickle_checkpoints_are_refused(tmp_path, vit_file):
    src, _ = vit_file
    model = build_model(vit_cfg())
    pth = tmp_path / "vit.pth"
    torch.save(src.state_dict(), pth)
    with pytest.raises(MedTuningError) as err:
        load_base_weights(model, str(pth))
    assert err.value.code == "UNSAFE_FILE" and "safetensors" in err.value.hint
    disguised = tmp_path / "vit_disguised.safetensors"
    disguised.write_bytes(pth.read_bytes())
    with pytest.raises(MedTuningError) as err:
        load_base_weights(model, str(disguised))
    assert err.value.code == "UNSAFE_FILE"


def test_missing_and_incompatible_files(tmp_path):
    model = build_model(vit_cfg())
    with pytest.raises(MedTuningError) as err:
        load_base_weights(model, str(tmp_path / "nope.safetensors"))
    assert err.value.code == "WEIGHTS_NOT_FOUND"
    wider = timm.create_model("vit_base_patch16_224", pretrained=False, depth=4, embed_dim=96, num_heads=3, img_size=32)
    with pytest.raises(MedTuningError) as err:
        load_base_weights(model, save(wider, tmp_path / "wider.safetensors"))
    assert err.value.code == "WEIGHTS_INCOMPATIBLE"
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a tensor file", encoding="utf-8")
    with pytest.raises(MedTuningError) as err:
        load_base_weights(model, str(junk))
    assert err.value.code == "WEIGHTS_INCOMPATIBLE"
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24, num_heads=(1, 2, 4, 8))
    with pytest.raises(MedTuningError) as err:
        load_base_weights(model, save(swin, tmp_path / "swin.safetensors"))
    assert err.value.code == "WEIGHTS_INCOMPATIBLE"


def test_hub_offline_and_none(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-medtuning-cache")
    model = build_model(vit_cfg())
    with pytest.raises(MedTuningError) as err:
        load_base_weights(model, "hub")
    assert err.value.code == "WEIGHTS_DOWNLOAD_FAILED"
    assert "--weights FILE" in err.value.hint and "--weights none" in err.value.hint
    info = load_base_weights(model, "none")
    assert not info.pretrained and info.source == "none" and info.sha256 is None


def test_scratch_keeps_random_weights(vit_file):
    _, path = vit_file
    model = build_model(vit_cfg("scratch"))
    before = model.encoder.backbone.blocks[0].attn.qkv.weight.detach().clone()
    info = load_base_weights(model, path)
    assert not info.pretrained
    assert torch.equal(model.encoder.backbone.blocks[0].attn.qkv.weight, before)
