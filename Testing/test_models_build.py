"""Tiny configurations of every architecture x tuning method: shapes, what trains, gradients,
optimizer contents, ablation switches, other depths, checkpointing, tuned state dicts."""

from __future__ import annotations

import json

import pytest
import torch

from MedTuningLib.errors import MedTuningError
from MedTuningLib.models import AdapterConfig, ModelConfig, build_model
from MedTuningLib.models.base import InsertedModule
from MedTuningLib.models.config import CORE_METHODS, METHODS

VIT_TINY = {"depth": 4, "embed_dim": 48, "num_heads": 3, "patch_size": 8}
SWIN_TINY = {"embed_dim": 24, "num_heads": (1, 2, 4, 8), "window_size": 2}
PAPER_ARCHS = ("vit_upernet", "swin_unet")
OTHER_ARCHS = ("vit_setr_naive", "vit_setr_pup", "vit_setr_mla", "vit_unet")



@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one intra-op thread is fastest, and avoids OpenMP spinning on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def tiny(arch: str, method: str = "med_tuning", **kw) -> ModelConfig:
    if arch == "swin_unetr":  # 3D: D, H, W divisible by 32; 64 keeps the bottleneck's instance norm valid
        return ModelConfig(arch=arch, method=method, in_channels=2, num_classes=3, img_size=64, depth=64,
                           backbone_kwargs={"feature_size": 12}, **kw)
    kwargs = SWIN_TINY if arch.startswith("swin") else VIT_TINY
    return ModelConfig(arch=arch, method=method, in_channels=2, num_classes=3, img_size=32, depth=4,
                       backbone_kwargs=dict(kwargs), decoder_width=32, **kw)


def volume(cfg: ModelConfig, depth: int | None = None, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(batch, cfg.in_channels, depth or cfg.depth, cfg.img_size, cfg.img_size)


def check_train_step(model, x):
    model.train()
    logits = model(x)
    assert logits.shape == (x.shape[0], model.config.num_classes, *x.shape[2:])
    logits.float().square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    leaked = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not no_grad, f"tuned parameters without gradient: {no_grad[:5]}"
    assert not leaked, f"frozen parameters with gradient: {leaked[:5]}"


def check_what_trains(model):
    method = model.config.method
    backbone = dict(model.encoder.backbone.named_parameters())
    leftovers = set(model.encoder.leftover_parameter_names())
    inserted = model.inserted_parameter_names()
    if method in ("scratch", "full"):
        assert all(p.requires_grad for p in model.parameters())
        assert not inserted
        return
    assert all(p.requires_grad == (n in leftovers) for n, p in backbone.items())
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if n in inserted)
    assert bool(inserted) == (method != "head")
    report = model.param_report()
    assert report["tuned"] == report["head"] + report["inserted"]
    assert report["full"] == sum(p.numel() for p in model.parameters()) - report["inserted"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_paper_archs_every_method(arch, method):
    model = build_model(tiny(arch, method))
    check_what_trains(model)
    check_train_step(model, volume(model.config))


@pytest.mark.parametrize("method", CORE_METHODS)
@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_other_vit_decoders(arch, method):
    model = build_model(tiny(arch, method))
    check_what_trains(model)
    check_train_step(model, volume(model.config, batch=1))


@pytest.mark.parametrize("method", CORE_METHODS)
def test_swin_unetr(method):
    model = build_model(tiny("swin_unetr", method))
    check_what_trains(model)
    check_train_step(model, volume(model.config, batch=1))
    if method == "med_tuning":
        adapters = [m for m in model.encoder.after.modules() if isinstance(m, InsertedModule)]
        assert len(adapters) == 8 and sum(a.inter_stage for a in adapters) == 4
        # FFT filters follow each 3D stage's token depth: 64 / 2 (patch) / 2**stage.
        assert [a.global_branch.depth for a in adapters[::2]] == [32, 16, 8, 4]


def test_swin_unetr_rejects_prompt_methods():
    with pytest.raises(MedTuningError) as err:
        build_model(tiny("swin_unetr", "vpt_deep"))
    assert err.value.code == "INVALID_OPTION"


@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_optimizer_holds_exactly_the_tuned_parameters(arch):
    model = build_model(tiny(arch, "med_tuning"))
    tuned = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(tuned, lr=1e-3, amsgrad=True)
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert in_opt == {id(p) for p in tuned} and not in_opt & frozen
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model(volume(model.config)).float().square().mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_med_tuning_adapter_layout():
    vit = build_model(tiny("vit_upernet"))
    adapters = [m for blk in vit.encoder.after for m in blk]
    assert len(adapters) == 4 and [a.inter_stage for a in adapters] == [True] * 4  # 4 blocks, 4 stages
    swin = build_model(tiny("swin_unet"))
    adapters = [m for blk in swin.encoder.after for m in blk]
    # Swin-UNet lite: 8 adapters, 2 per stage, the second of each stage with inter-stage fusion.
    assert len(adapters) == 8 and [a.inter_stage for a in adapters] == [False, True] * 4
    assert [a.align_kind for a in adapters] == ["swin"] * 8


def test_full_size_vit_stage_ends():
    from MedTuningLib.models.encoders import ViTSliceEncoder
    import timm

    backbone = timm.create_model("vit_base_patch16_224", pretrained=False, class_token=False, global_pool="",
                                 num_classes=0, depth=12, embed_dim=48, num_heads=3, img_size=32)
    assert ViTSliceEncoder(backbone).stage_ends == [2, 5, 8, 11]


@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_ablation_switches_change_the_model(arch):
    def inserted(**adapter):
        return build_model(tiny(arch, adapter=AdapterConfig(**adapter))).param_report()["inserted"]

    base = inserted()
    assert inserted(alpha=3.0) > base > inserted(alpha=12.0)
    assert inserted(local_branch=False) < base
    assert inserted(global_branch="none") < base
    assert inserted(global_branch="dwconv9") != base and inserted(global_branch="dwconv11") > inserted(
        global_branch="dwconv9")
    assert inserted(mix=False) < base
    assert inserted(fusion="add") == inserted(fusion="max") < base
    assert inserted(fusion="none") < inserted(fusion="add")
    # Every variant still runs.
    model = build_model(tiny(arch, adapter=AdapterConfig(local_branch=False, global_branch="dwconv9", mix=False,
                                                         fusion="max")))
    check_train_step(model, volume(model.config))


@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_other_depth_than_built_for(arch):
    model = build_model(tiny(arch))  # built for depth 4
    model.eval()
    with torch.no_grad():
        for d in (1, 3, 6):
            assert model(volume(model.config, depth=d, batch=1)).shape == (1, 3, d, 32, 32)


def test_wrong_slice_size_is_refused():
    model = build_model(tiny("vit_upernet"))
    with pytest.raises(MedTuningError):
        model(torch.randn(1, 2, 4, 48, 48))


@pytest.mark.parametrize("arch, method", [("vit_upernet", "med_tuning"), ("swin_unet", "adapter"),
                                          ("vit_upernet", "vpt_deep"), ("swin_unet", "st_adapter")])
def test_activation_checkpointing_gives_same_gradients(arch, method):
    cfg = tiny(arch, method)
    torch.manual_seed(1)
    model = build_model(cfg)
    for m in model.modules():  # no dropout / drop-path / batch-stat differences between the two runs
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    model.train()
    for m in model.modules():
        if "Drop" in type(m).__name__:
            m.eval()
    x = volume(cfg)

    def grads(enabled):
        model.zero_grad(set_to_none=True)
        model.set_activation_checkpointing(enabled)
        model(x).float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    for n in plain:
        torch.testing.assert_close(plain[n], ckpt[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch, method", [("vit_upernet", "med_tuning"), ("swin_unet", "med_tuning"),
                                          ("swin_unet", "head"), ("vit_upernet", "full")])
def test_tuned_state_dict_round_trip(arch, method):
    cfg = tiny(arch, method)
    a = build_model(cfg)
    a.train()
    a(volume(cfg))  # move BatchNorm running statistics away from their initial values
    sd = a.tuned_state_dict()
    frozen = {f"{n}" for n, p in a.named_parameters() if not p.requires_grad}
    assert not frozen & set(sd)
    assert {n for n, p in a.named_parameters() if p.requires_grad} <= set(sd)
    if arch == "vit_upernet" or method == "med_tuning":  # UPerNet / adapter BatchNorm statistics travel along
        assert any(k.endswith("running_mean") for k in sd)
    b = build_model(cfg)
    b.load_tuned_state_dict(sd)
    for k, v in sd.items():
        assert torch.equal(b.state_dict()[k], v)
    with pytest.raises(MedTuningError) as err:
        b.load_tuned_state_dict({k: v for k, v in list(sd.items())[1:]})
    assert err.value.code == "WEIGHTS_INCOMPATIBLE"
    with pytest.raises(MedTuningError):
        b.load_tuned_state_dict({**sd, "decoder.extra.weight": torch.zeros(1)})
    k0 = next(iter(sd))
    with pytest.raises(MedTuningError):
        b.load_tuned_state_dict({**sd, k0: torch.zeros(*sd[k0].shape, 2)})


def test_config_round_trip_and_errors():
    cfg = tiny("swin_unet", adapter=AdapterConfig(alpha=4.0, fusion="add"))
    d = json.loads(json.dumps(cfg.to_dict()))
    again = ModelConfig.from_dict(d)
    assert again.to_dict() == cfg.to_dict() and again.adapter.fusion == "add"
    assert build_model(again).param_report() == build_model(cfg).param_report()
    for bad, code in [({"arch": "unet9"}, "UNKNOWN_ARCH"), ({"method": "lora"}, "UNKNOWN_METHOD"),
                      ({"backbone": "no_such_model"}, "UNKNOWN_BACKBONE"),
                      ({"backbone": "swin_tiny_patch4_window7_224"}, "UNKNOWN_BACKBONE"),
                      ({"adapter": AdapterConfig(global_branch="fft3")}, "INVALID_OPTION")]:
        fields = {**{k: v for k, v in tiny("vit_upernet").__dict__.items()}, **bad}
        if "backbone" in bad:
            fields["backbone_kwargs"] = {}
        with pytest.raises(MedTuningError) as err:
            build_model(ModelConfig(**fields))
        assert err.value.code == code, bad


def test_swin_unet_head_before_the_pixel_shuffle_gives_the_literal_logits_and_keeps_no_full_resolution_tensor():
    """The final expand, LayerNorm and 1x1 conv run per pixel before the x4 shuffle, in groups of slices that
    training recomputes: the same logits and gradients as expand -> shuffle -> LayerNorm -> conv, and no
    full-resolution C-wide tensor is saved for the backward pass (the literal order saves two)."""
    from torch.autograd.graph import saved_tensors_hooks

    cfg = tiny("swin_unet", "full")
    torch.manual_seed(1)
    model = build_model(cfg)
    dec = model.decoder
    model.train()
    for m in model.modules():  # deterministic: the same graph below the head in both passes
        if "Drop" in type(m).__name__:
            m.eval()
    seen = {}
    dec.norm.register_forward_hook(lambda _m, _i, out: seen.update(before_head=out))
    dec.register_forward_hook(lambda _m, _i, out: seen.update(logits=out))
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved.append(t.numel())
        return t

    x = volume(cfg)
    with saved_tensors_hooks(pack, lambda t: t):
        model(x)
    tokens = seen["before_head"]                                   # [B*D, H/4, W/4, C], in the graph
    literal = dec.classifier(dec.final_expand(tokens).permute(0, 3, 1, 2))
    torch.testing.assert_close(seen["logits"], literal, rtol=1e-5, atol=1e-6)

    weights = torch.randn_like(literal)
    head = [tokens, dec.final_expand.expand.weight, dec.final_expand.norm.weight, dec.final_expand.norm.bias,
            dec.classifier.weight]
    ours = torch.autograd.grad((seen["logits"] * weights).sum(), head, retain_graph=True)
    reference = torch.autograd.grad((literal * weights).sum(), head)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    full_resolution = x.shape[0] * cfg.depth * cfg.img_size ** 2 * cfg.backbone_kwargs["embed_dim"]
    assert not [n for n in saved if n >= full_resolution]
