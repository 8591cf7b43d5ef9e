"""The Med-Adapter on its own: FFT branch equals the official 3D-FFT formulation, ablation switches,
depth resampling, inter-stage fusion shapes (docs/method.md "The method")."""

from __future__ import annotations

import pytest
import torch

from MedTuningLib.models import AdapterConfig, MedAdapter
from MedTuningLib.models.base import EncoderState, TokenGrid
from MedTuningLib.models.med_adapter import FrequencyFilter, resample_frequency_filter



@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one intra-op thread is fastest, and avoids OpenMP spinning on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_fft_branch_matches_official_3d_fft():
    torch.manual_seed(0)
    f = FrequencyFilter(depth=6)
    with torch.no_grad():
        f.weight.uniform_(0.5, 1.5)  # a non-symmetric filter: the inverse FFT is really complex
        f.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 6, 5, 4)
    torch.testing.assert_close(f(x), f.reference(x), rtol=1e-4, atol=1e-5)


def test_fft_filter_resampled_for_another_depth():
    torch.manual_seed(0)
    f = FrequencyFilter(depth=8)
    with torch.no_grad():
        f.weight.uniform_(0.5, 1.5)
    w = f.weight.reshape(-1)
    assert torch.equal(resample_frequency_filter(w, 8), w)
    # Half the depth: frequency k / 4 sits at position 2k of the length-8 filter.
    torch.testing.assert_close(resample_frequency_filter(w, 4), w[::2])
    x = torch.randn(1, 2, 5, 3, 3)
    assert f(x).shape == x.shape
    torch.testing.assert_close(f(x), f.reference(x), rtol=1e-4, atol=1e-5)


def test_bottleneck_and_parameter_count_match_official_layout():
    # C = 768, h = 128 (ViT-B): down 98,432 + up 99,072 + depthwise paths 6,400 + mix 16,512 + FFT 256.
    assert n_params(MedAdapter(768, 128, AdapterConfig())) == 220_672
    a = MedAdapter(768, 128, AdapterConfig(), inter_stage=True, align="vit")
    assert n_params(a) == 220_672 + 16_512 + 32_896  # + align 1x1x1 h->h + fuse 2h->h
    s = MedAdapter(96, 128, AdapterConfig(), inter_stage=True, align="swin")
    assert s.hidden == 16 and s.align.in_channels == 8 and s.align.stride == (1, 2, 2)
    assert MedAdapter(768, 128, AdapterConfig(alpha=12)).hidden == 64


@pytest.mark.parametrize("switch, expected_missing", [
    ({"local_branch": False}, {"local3", "local5"}),
    ({"global_branch": "none"}, {"global_branch"}),
    ({"mix": False}, {"mix"}),
])
def test_ablation_switches_remove_modules(switch, expected_missing):
    base = MedAdapter(48, 4, AdapterConfig(), inter_stage=True)
    ablated = MedAdapter(48, 4, AdapterConfig(**switch), inter_stage=True)
    for name in expected_missing:
        assert getattr(base, name) is not None and getattr(ablated, name) is None
    assert n_params(ablated) < n_params(base)


def test_global_branch_large_kernel_and_fusion_variants():
    fft = MedAdapter(48, 4, AdapterConfig())
    k9 = MedAdapter(48, 4, AdapterConfig(global_branch="dwconv9"))
    k11 = MedAdapter(48, 4, AdapterConfig(global_branch="dwconv11"))
    assert isinstance(fft.global_branch, FrequencyFilter)
    assert k9.global_branch.spatial.kernel_size == (1, 9, 9) and k9.global_branch.axial.kernel_size == (9, 1, 1)
    assert k11.global_branch.spatial.kernel_size == (1, 11, 11)
    assert n_params(k9) < n_params(k11)
    concat = MedAdapter(48, 4, AdapterConfig(fusion="concat"), inter_stage=True)
    add = MedAdapter(48, 4, AdapterConfig(fusion="add"), inter_stage=True)
    mx = MedAdapter(48, 4, AdapterConfig(fusion="max"), inter_stage=True)
    none = MedAdapter(48, 4, AdapterConfig(fusion="none"), inter_stage=True)
    assert concat.fuse is not None and add.fuse is None and mx.fuse is None
    assert add.align is not None and none.align is None and not none.inter_stage
    # A non-inter-stage adapter never fuses, whatever the setting.
    assert MedAdapter(48, 4, AdapterConfig(fusion="concat")).align is None


@pytest.mark.parametrize("fusion", ["concat", "add", "max", "none"])
def test_adapter_forward_threads_interaction(fusion):
    torch.manual_seed(0)
    b, d, h, w, c = 2, 4, 4, 4, 48
    grid = TokenGrid(b, d, h, w)
    first = MedAdapter(c, d, AdapterConfig(fusion=fusion), inter_stage=True, align="swin")
    second = MedAdapter(2 * c, d, AdapterConfig(fusion=fusion), inter_stage=True, align="swin")
    state = EncoderState(grid)
    x = torch.randn(b * d, h * w, c)
    y = first(x, state)
    assert y.shape == x.shape
    if fusion == "none":
        assert state.interaction is None
        return
    assert state.interaction.shape == (b, first.hidden, d, h, w)
    state.grid = TokenGrid(b, d, h // 2, w // 2)  # next Swin stage: half H', W', twice C
    y2 = second(torch.randn(b * d, h // 2, w // 2, 2 * c), state)
    assert y2.shape == (b * d, h // 2, w // 2, 2 * c)
    assert state.interaction.shape == (b, second.hidden, d, h // 2, w // 2)


def test_first_stage_zeros_equal_align_bias():
    """The first inter-stage adapter sees zeros as the previous stage: align(zeros) == its bias."""
    torch.manual_seed(0)
    a = MedAdapter(48, 4, AdapterConfig(), inter_stage=True, align="swin").eval()
    grid = TokenGrid(1, 4, 4, 4)
    x = torch.randn(4, 16, 48)
    y_fast = a(x, EncoderState(grid))
    zeros = torch.zeros(1, a.hidden // 2, 4, 8, 8)
    y_ref = a(x, EncoderState(grid, interaction=zeros))
    torch.testing.assert_close(y_fast, y_ref)
