"""MedTuning models: Med-Adapters on frozen pretrained 2D vision transformers for 3D segmentation.

    cfg = ModelConfig(arch="swin_unet", method="med_tuning", in_channels=4, num_classes=4)
    model = build_model(cfg)                       # random base weights, method applied
    info = load_base_weights(model, "weights.safetensors")
    logits = model(volume)                         # [B, C, D, H, W] -> [B, K, D, H, W]
"""

from MedTuningLib.models.config import ARCH_DEFAULTS, METHODS, AdapterConfig, ModelConfig
from MedTuningLib.models.factory import MedTuningModel, build_model
from MedTuningLib.models.med_adapter import MedAdapter
from MedTuningLib.models.weights import BaseWeights, load_base_weights

__all__ = ["ARCH_DEFAULTS", "METHODS", "AdapterConfig", "ModelConfig", "MedTuningModel", "build_model", "MedAdapter",
           "BaseWeights", "load_base_weights"]
