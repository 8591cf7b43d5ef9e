"""Inference settings of segment / evaluate / suggest: per-axis overlap, int8 Linear layers, and
``bench infer --variant`` that measures them."""

from __future__ import annotations

import json

import pytest
import torch

from MedTuningLib.engine.device import resolve_precision
from MedTuningLib.engine.infer import predict_probabilities
from MedTuningLib.engine.windows import DEFAULT_OVERLAP, parse_overlap, windows_per_volume
from MedTuningLib.errors import MedTuningError
from MedTuningLib.models import ModelConfig, build_model

CPU = torch.device("cpu")


def test_overlap_is_one_fraction_or_one_per_window_axis():
    assert parse_overlap("0.5") == 0.5
    assert parse_overlap("0.25, 0, 0") == (0.25, 0.0, 0.0)
    for bad in ("1", "-0.1", "0.5,0.5", "nan", "half"):
        with pytest.raises(MedTuningError) as caught:
            parse_overlap(bad)
        assert caught.value.code == "INVALID_OPTION" and "D,H,W" in caught.value.hint


def test_per_axis_overlap_sets_the_windows_per_axis():
    """Overlap 0 in-plane and 0.5 in depth: windows tile H and W once and step half a window in depth."""
    calls = []

    class Count(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return torch.cat([-x, x], dim=1)

    volume = torch.zeros(1, 16, 32, 32)
    predict_probabilities(Count(), volume, (8, 16, 16), CPU, None, overlap=(0.5, 0.0, 0.0), sw_batch_size=1)
    assert len(calls) == 3 * 2 * 2  # depth starts 0, 4, 8; two windows along H and along W
    calls.clear()
    predict_probabilities(Count(), volume, (8, 16, 16), CPU, None, overlap=DEFAULT_OVERLAP, sw_batch_size=1)
    assert DEFAULT_OVERLAP == 0.25 and len(calls) == 3 * 3 * 3  # steps of 6 in depth, 12 in-plane


def test_int8_runs_a_quantized_copy_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vit_upernet", backbone="vit_tiny_patch16_224", in_channels=1, num_classes=3, img_size=32,
                      depth=4, method="med_tuning", backbone_kwargs={"depth": 4})
    model = build_model(cfg)
    volume = torch.randn(1, 8, 40, 40)
    fp32 = predict_probabilities(model, volume, (4, 32, 32), CPU, None)
    int8 = predict_probabilities(model, volume, (4, 32, 32), CPU, resolve_precision("int8", CPU))
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert int8.shape == fp32.shape
    difference = (int8 - fp32).abs().max().item()
    assert 0 < difference < 0.05, difference  # really quantized, and close
    assert torch.allclose(int8.sum(0), torch.ones_like(int8[0]), atol=1e-4)


def test_int8_is_refused_on_a_gpu():
    with pytest.raises(MedTuningError) as caught:
        resolve_precision("int8", torch.device("cuda"))
    assert caught.value.code == "INVALID_OPTION"


def test_segment_refuses_a_bad_overlap_with_a_usage_error(cli):
    status, events = cli(["segment", "--model", "M", "--image", "I.nrrd", "--out", "O.seg.nrrd", "--overlap", "0.5,1"])
    assert status == 2
    error = [e for e in events if e["event"] == "error"][-1]
    assert "D,H,W" in json.dumps(error)


def test_bench_infer_variants_time_each_setting_against_the_first(cli, tmp_path):
    out = tmp_path / "variants.json"
    status, events = cli(["bench", "infer", "--arch", "vit_upernet", "--backbone", "vit_tiny_patch16_224", "--crop",
                          "2x32x32", "--size", "4x40x40", "--device", "cpu", "--repeats", "1", "--json", str(out),
                          "--variant", "overlap=0.5", "--variant", "overlap=0,0,0 precision=int8",
                          "--variant", "sw_batch=2 threads=1"])
    assert status == 0, events
    data = json.loads(out.read_text(encoding="utf-8"))
    rows = {r["variant"]: r for r in data["variants"]}
    assert list(rows) == ["overlap=0.5", "overlap=0,0,0 precision=int8", "sw_batch=2 threads=1"]
    assert data["dice_against"] == "the first variant"
    assert rows["overlap=0.5"]["dice_difference_points"] == 0 and rows["overlap=0.5"]["speedup"] == 1
    # 4x40x40 in 2x32x32 windows: overlap 0.5 -> 3 x 2 x 2 windows, none -> 2 x 2 x 2; 1 per call on a CPU
    assert rows["overlap=0.5"]["forward_calls"] == 12
    assert rows["overlap=0,0,0 precision=int8"]["forward_calls"] == 8
    assert rows["sw_batch=2 threads=1"]["forward_calls"] == 6
    assert all(r["seconds"] > 0 for r in rows.values())


def test_bench_infer_refuses_an_unknown_variant_key(cli):
    status, events = cli(["bench", "infer", "--arch", "vit_upernet", "--backbone", "vit_tiny_patch16_224",
                          "--variant", "speed=fast", "--device", "cpu"])
    assert status == 2
    assert any(e["event"] == "error" and e["code"] == "INVALID_OPTION" for e in events)


def test_one_window_per_call_on_a_cpu_keeps_an_int8_window_independent_of_its_neighbours():
    """One window a call on a CPU (measured no slower than two, README "Choosing the inference settings"): under
    int8 a window's result then does not depend on the windows beside it (dynamic quantization scales each call's
    activations by that call's range)."""
    from MedTuningLib.engine.infer import auto_sw_batch_size

    assert auto_sw_batch_size(CPU) == 1 and auto_sw_batch_size(torch.device("cuda")) == 4
    torch.manual_seed(0)
    vit = build_model(ModelConfig(arch="vit_upernet", backbone="vit_tiny_patch16_224", in_channels=1, num_classes=3,
                                  img_size=32, depth=4, method="med_tuning", backbone_kwargs={"depth": 4}))
    int8 = resolve_precision("int8", CPU)

    # int8: the volume's two windows, segmented together, give what each gives alone.
    volume = torch.randn(1, 8, 32, 32)
    together = predict_probabilities(vit, volume, (4, 32, 32), CPU, int8, overlap=0.0)
    alone = torch.cat([predict_probabilities(vit, volume[:, d:d + 4], (4, 32, 32), CPU, int8, overlap=0.0)
                       for d in (0, 4)], dim=1)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    paired = predict_probabilities(vit, volume, (4, 32, 32), CPU, int8, overlap=0.0, sw_batch_size=2)
    assert (paired - alone).abs().max() > 1e-6  # two windows a call do change an int8 window's result


def test_bench_infer_tta_variants():
    from MedTuningLib.bench.infer_bench import parse_variant

    assert parse_variant("tta=on") == {"tta": True}  # segment's way: each window's flips in its forward call
    assert parse_variant("tta=volume overlap=0") == {"tta": True, "flips_per": "volume", "overlap": 0.0}
    assert parse_variant("tta=off") == {"tta": False}
    with pytest.raises(MedTuningError) as caught:
        parse_variant("tta=maybe")
    assert caught.value.code == "INVALID_OPTION" and "volume" in caught.value.hint


def test_tta_flips_each_window_in_its_forward_call_as_one_pass_per_flipped_volume_would():
    """On a window grid that flipping maps onto itself, mirroring each window inside its forward call gives the
    per-volume passes' probabilities, in an eighth of the calls (each eight times as wide)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)  # not flip-equivariant: every flip predicts something else
    calls: list[int] = []

    class Counted(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return conv(x)

    volume = torch.randn(1, 12, 20, 20)  # crop 4x8x8 at overlap 0.5: starts 0,2,..,8 and 0,4,..,12 (symmetric)
    per_window = predict_probabilities(Counted(), volume, (4, 8, 8), CPU, None, overlap=0.5, tta=True,
                                       sw_batch_size=2)
    window_calls, calls[:] = list(calls), []
    per_volume = predict_probabilities(Counted(), volume, (4, 8, 8), CPU, None, overlap=0.5, tta=True,
                                       sw_batch_size=2, flips_per="volume")
    windows = 5 * 4 * 4
    assert len(window_calls) == windows // 2 and set(window_calls) == {2 * 8}
    assert len(calls) == 8 * windows // 2 and set(calls) == {2}
    torch.testing.assert_close(per_window, per_volume, rtol=1e-5, atol=1e-6)
    plain = predict_probabilities(Counted(), volume, (4, 8, 8), CPU, None, overlap=0.5, sw_batch_size=2)
    assert (plain - per_window).abs().max() > 1e-3  # the flips were really applied


def test_fast_segments_without_overlap_in_int8_on_a_cpu_and_given_options_win(tmp_path, cli):
    from engine_helpers import TINY_TRAIN, make_blob_library

    library = make_blob_library(cli, tmp_path, n_train=1, n_test=1)
    model = tmp_path / "model"
    status, events = cli(["train", "--library", str(library), "--out", str(model), "--labels", "Blob=1", *TINY_TRAIN,
                          "--epochs", "1", "--steps-per-epoch", "1", "--spacing", "native"])
    assert status == 0, events[-3:]
    image = tmp_path / "src" / "case1.nrrd"

    def segment(*extra):
        status, events = cli(["segment", "--model", str(model), "--image", str(image), "--out",
                              str(tmp_path / "out.seg.nrrd"), "--device", "cpu", "--force", *extra])
        assert status == 0, events[-3:]
        last_events[:] = events
        return [e["message"] for e in events if e["event"] == "log" and e["message"].startswith("fast settings")]

    last_events: list[dict] = []

    assert segment("--fast") == ["fast settings: window overlap 0, precision int8"]
    # Every forward call is reported, with the time left: the progress bar moves while the scan is segmented.
    infer = [e for e in last_events if e["event"] == "progress" and e["phase"] == "infer"]
    calls = windows_per_volume((8, 40, 40), (4, 32, 32), 0.0)  # int8 on a CPU: one window per call
    assert [(e["step"], e["total"]) for e in infer[:2]] == [(0, 1), (0, calls)]  # reading, then the windows start
    assert [e["step"] for e in infer[2:]] == list(range(1, calls + 1)) and {e["total"] for e in infer[2:]} == {calls}
    assert infer[-1]["eta_s"] == 0 and all(e["eta_s"] >= 0 for e in infer[2:])
    assert segment("--fast", "--overlap", "0.5", "--precision", "fp32") == [
        "fast settings: window overlap 0.5, precision fp32"]
    assert segment() == []
    status, events = cli(["evaluate", "--model", str(model), "--library", str(library), "--fast", "--device", "cpu"])
    assert status == 0 and "fast settings: window overlap 0, precision int8" in [e.get("message") for e in events]
    assert any(e["event"] == "metric" and e["name"].startswith("dice/") for e in events)
    status, events = cli(["evaluate", "--model", str(model), "--library", str(library), "--fast", "--protocol",
                          "paper", "--device", "cpu"])
    assert status == 2 and events[-1]["code"] == "INVALID_OPTION" and "--fast" in events[-1]["message"]


def test_the_time_left_counts_forward_calls_only(monkeypatch):
    """Reading and resampling before the windows, and the first call's one-off set-up, do not inflate the estimate."""
    from MedTuningLib.commands import segment

    clock = iter([0.0, 10.0, 14.0, 16.0, 18.0])  # made; windows start after 10 s; calls end at 14, 16, 18 s
    monkeypatch.setattr(segment.time, "monotonic", lambda: next(clock))
    sent = []

    class Events:
        def progress(self, phase, step, total, **fields):
            sent.append((step, total, fields.get("eta_s")))

    report = segment.window_progress(Events())
    for done in range(4):
        report(done, 5)
    # After call 1: 4 s a call (not 14 s, the time since the scan was read); then the 2 s of the calls after it.
    assert sent == [(0, 5, None), (1, 5, 16.0), (2, 5, 6.0), (3, 5, 4.0)]
