"""The tuned inference path: padding of volumes smaller than the crop."""

from __future__ import annotations

import torch

from MedTuningLib.engine.infer import predict_probabilities


class _Recorder(torch.nn.Module):
    """Two-class 'model' that remembers the windows it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.windows: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows.append(x.detach().clone())
        return torch.cat([-x, x], dim=1) * self.scale


def test_a_slab_thinner_than_the_crop_is_padded_with_its_edge_slices_not_zeros():
    volume = torch.arange(1, 4, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 16, 16).contiguous()  # slices 1, 2, 3
    model = _Recorder()
    probs = predict_probabilities(model, volume, (8, 16, 16), torch.device("cpu"), None, tta=False)
    assert probs.shape == (2, 3, 16, 16)
    window = model.windows[0][0, 0]  # [8, 16, 16]
    assert window.shape[0] == 8
    assert set(window[:, 0, 0].tolist()) == {1.0, 2.0, 3.0}, window[:, 0, 0]  # no zero slices were added
    assert torch.all(window[0] == 1.0) and torch.all(window[-1] == 3.0)
    # the padding is cut off again: the result covers exactly the input's slices
    assert torch.allclose(probs[1, :, 0, 0], torch.sigmoid(2 * torch.tensor([1.0, 2.0, 3.0])), atol=1e-5)


def test_class_map_is_the_argmax_over_classes_ties_to_the_first():
    import numpy as np

    from MedTuningLib.engine.infer import class_map_of

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, 6, 7, 8), dim=0)
    probs[:, 0, 0, :4] = torch.tensor([0.3, 0.3, 0.3, 0.1])[:, None]  # a three-way tie: class 0, as argmax
    probs[:, 0, 1, :4] = torch.tensor([0.1, 0.4, 0.4, 0.1])[:, None]  # a tie of 1 and 2: class 1
    classes = class_map_of(probs)
    assert classes.dtype == np.uint8 and classes.shape == (6, 7, 8)
    assert np.array_equal(classes, probs.argmax(0).numpy())
    assert (classes[0, 0, :4] == 0).all() and (classes[0, 1, :4] == 1).all()
    assert np.array_equal(class_map_of(probs.numpy()), classes)  # numpy in, the same classes out
