"""--protocol paper against the official inference (utils/slide_test_3D.py, utils/predict_fold_3D.py):
window positions at stride 42, uniform averaging, 8-flip TTA averaged uniformly, the ET < 500 rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from MedTuningLib.data.labels import scheme_for_task
from MedTuningLib.engine.evaluate import region_scores
from MedTuningLib.engine.infer import predict_probabilities
from MedTuningLib.engine.recipe import inference_protocol, paper_overlap, relabel_small_enhancing

CPU = torch.device("cpu")


def official_window_starts(size: tuple[int, int, int], crop: int) -> set[tuple[int, int, int]]:
    """slide_window's loops, as written in the official code."""
    stride = int(crop * (1.0 / 3.0))
    d, h, w = size
    grids = [int(math.ceil(1.0 * (n - crop) / stride)) + 1 for n in (d, h, w)]
    starts = set()
    for idh in range(grids[1]):
        for idw in range(grids[2]):
            for idd in range(grids[0]):
                h0, w0, d0 = idh * stride, idw * stride, idd * stride
                h1, w1, d1 = min(h0 + crop, h), min(w0 + crop, w), min(d0 + crop, d)
                if h1 == h:
                    h0 = h1 - crop
                if w1 == w:
                    w0 = w1 - crop
                if d1 == d:
                    d0 = d1 - crop
                starts.add((d0, h0, w0))
    return starts


class Recorder(nn.Module):
    """Reads each window's position from a coordinate image; predicts a value per window."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.classes = classes
        self.starts: list[tuple[int, int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for window in x:
            start = tuple(int(round(float(v))) for v in window[:3, 0, 0, 0])
            self.starts.append(start)
            logit = torch.zeros(self.classes, *window.shape[1:])
            logit[1] = float(len(self.starts))  # each window its own prediction
            out.append(logit)
        return torch.stack(out)


def coordinates(shape) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    return torch.stack(grids)


def test_windows_are_the_official_stride_42_over_a_brats_volume():
    crop = (128, 128, 128)
    overlap = paper_overlap(crop)
    # MONAI's scan interval is int(roi * (1 - overlap)): 42, the official int(128 / 3).
    assert [int(128 * (1 - o)) for o in overlap] == [42, 42, 42]
    model = Recorder()
    predict_probabilities(model, coordinates((155, 240, 240)), crop, CPU, overlap=overlap, mode="constant",
                          sw_batch_size=1)
    assert len(model.starts) == len(set(model.starts)) == 2 * 4 * 4
    assert set(model.starts) == official_window_starts((155, 240, 240), 128)


def test_uniform_averaging_equals_the_official_count_normalisation():
    shape, crop = (20, 23, 17), 9  # stride int(9 / 3) = 3
    model = Recorder()
    probs = predict_probabilities(model, coordinates(shape), (crop,) * 3, CPU, overlap=paper_overlap((crop,) * 3),
                                  mode="constant", sw_batch_size=1)
    assert set(model.starts) == official_window_starts(shape, crop)
    outputs = np.zeros((2, *shape))
    count = np.zeros(shape)
    for index, (d0, h0, w0) in enumerate(model.starts, start=1):
        window = np.zeros((2, crop, crop, crop))
        window[1] = float(index)
        e = np.exp(window - window.max(0))
        outputs[:, d0:d0 + crop, h0:h0 + crop, w0:w0 + crop] += e / e.sum(0)
        count[d0:d0 + crop, h0:h0 + crop, w0:w0 + crop] += 1
    np.testing.assert_allclose(probs.numpy(), outputs / count, rtol=1e-5, atol=1e-6)


def test_tta_averages_the_eight_flips_uniformly_as_the_official_code():
    torch.manual_seed(0)
    net = nn.Conv3d(2, 4, 3, padding=1)  # not flip-equivariant: every flip gives another prediction
    image = torch.randn(2, 6, 8, 8)
    crop = (6, 8, 8)  # one window: the flips are all that is averaged

    def official(x: torch.Tensor) -> torch.Tensor:
        x = x[None]
        with torch.no_grad():
            model = lambda v: torch.softmax(net(v), 1)  # the official networks end in a softmax  # noqa: E731
            logit = torch.softmax(model(x), 1)
            for dims in ((2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)):
                logit += torch.softmax(model(x.flip(dims=dims)).flip(dims=dims), 1)
        return (logit / 8.0)[0]

    protocol = inference_protocol("paper", crop)
    ours = predict_probabilities(net, image, crop, CPU, overlap=protocol.overlap, tta=protocol.tta,
                                 mode=protocol.blend, flip_softmax=protocol.flip_softmax)
    torch.testing.assert_close(ours, official(image), rtol=1e-5, atol=1e-6)
    # The project TTA: the plain mean of the 8 flips' probabilities.
    plain = predict_probabilities(net, image, crop, CPU, tta=True, mode="constant")
    with torch.no_grad():
        flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
        expected = sum(torch.softmax(net(image[None].flip(dims=d) if d else image[None]), 1).flip(dims=d)
                       if d else torch.softmax(net(image[None]), 1) for d in flips)[0] / 8
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sizes, relabelled", [((300, 250), False), ((499,), True), ((500,), False), ((), False),
                                               ((200, 150, 149), True)])
def test_et_rule_counts_all_enhancing_voxels(sizes, relabelled):
    scheme = scheme_for_task("brats", source="brats2019")
    et, ncr, ed = scheme.class_index("ET"), scheme.class_index("NCR/NET"), scheme.class_index("ED")
    class_map = np.zeros((40, 40, 40), np.uint8)
    class_map[30:, 30:, 30:] = ed
    flat = class_map.reshape(-1)
    start = 0
    for size in sizes:  # separate components, 100 voxels apart
        flat[start:start + size] = et
        start += size + 100
    out, changed = relabel_small_enhancing(scheme, class_map, 500)
    assert changed == relabelled
    if relabelled:
        assert not (out == et).any() and (out[class_map == et] == ncr).all()
    else:
        np.testing.assert_array_equal(out, class_map)
    np.testing.assert_array_equal(out == ed, class_map == ed)  # oedema never touched
    # Schemes without ET and NCR/NET (KiTS) are left alone.
    kits = scheme_for_task("kits")
    small = np.zeros((5, 5, 5), np.uint8)
    small[0, 0, 0] = 2
    assert relabel_small_enhancing(kits, small, 500)[1] is False


def test_paper_protocol_leaves_out_hd95_of_regions_absent_from_both():
    scheme = scheme_for_task("brats", source="brats2019")
    pred = np.zeros((6, 6, 6), np.uint8)
    ref = np.zeros((6, 6, 6), np.uint8)
    pred[1:3, 1:3, 1:3] = ref[1:3, 1:3, 1:3] = scheme.class_index("ED")  # WT only: no ET, no TC
    project = region_scores(scheme, pred, ref, (1.0, 1.0, 1.0))
    paper = region_scores(scheme, pred, ref, (1.0, 1.0, 1.0), hd95_both_empty=inference_protocol("paper", (4, 4, 4))
                          .hd95_both_empty)
    assert project["hd95/ET"] == 0.0 and paper["hd95/ET"] is None  # official: NaN, left out of the mean
    assert project["dice/ET"] == paper["dice/ET"] == 1.0  # official dice_score of two empty masks: eps / eps
    assert paper["hd95/WT"] == project["hd95/WT"] == 0.0
