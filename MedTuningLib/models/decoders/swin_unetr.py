"""The decoder half of MONAI's SwinUNETR, run on the hidden states of :class:`SwinUNETREncoder`."""

from __future__ import annotations

import torch
from torch import nn


class SwinUNETRDecoder(nn.Module):
    """Takes MONAI SwinUNETR's conv encoders / decoders / output as they are (not rewritten)."""

    NAMES = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder5", "decoder4", "decoder3",
             "decoder2", "decoder1", "out")

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        for name in self.NAMES:
            self.add_module(name, getattr(net, name))

    def forward(self, hidden: list[torch.Tensor], x_in: torch.Tensor) -> torch.Tensor:
        enc0 = self.encoder1(x_in)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec4 = self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return self.out(self.decoder1(dec0, enc0))
