"""Segmentation decoders: UPerNet, SETR (Naive / PUP / MLA), a U-Net style decoder (ViT),
the Swin-UNet decoder, and the SwinUNETR decoder wrapper (MONAI)."""

from MedTuningLib.models.decoders.setr import SETRMLA, SETRNaive, SETRPUP
from MedTuningLib.models.decoders.swin_unet import SwinUNetDecoder
from MedTuningLib.models.decoders.swin_unetr import SwinUNETRDecoder
from MedTuningLib.models.decoders.unet import ViTUNetDecoder
from MedTuningLib.models.decoders.upernet import UPerNet

__all__ = ["UPerNet", "SETRNaive", "SETRPUP", "SETRMLA", "ViTUNetDecoder", "SwinUNetDecoder", "SwinUNETRDecoder"]
