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
