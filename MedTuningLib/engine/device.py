"""Choosing the device and the autocast precision."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from MedTuningLib.errors import MedTuningError


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto``: CUDA when present, else CPU. ``cuda`` without a GPU is an error, not a silent CPU run."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise MedTuningError("DEVICE_UNAVAILABLE", "--device cuda was asked for but PyTorch sees no CUDA GPU",
                                 "use --device cpu (or auto), or install a CUDA build of PyTorch for your GPU")
        return torch.device("cuda", local_rank or 0)
    if name == "cpu":
        return torch.device("cpu")
    raise MedTuningError("INVALID_OPTION", f"unknown device {name!r}", "use auto, cpu or cuda")


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    checks = [getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None)]
    return any(check() for check in checks if check is not None)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    ``auto`` picks bf16 on GPUs that support it and on CPUs with native bf16 units; elsewhere fp32
    (emulated bf16 on an old CPU is slower than fp32). ``int8`` (inference on the CPU only) is not an autocast
    dtype: it returns ``torch.qint8``, which :func:`MedTuningLib.engine.infer.predict_probabilities` turns into
    dynamically quantized Linear layers.
    """
    if precision == "fp32":
        return None
    if precision == "int8":
        if device.type != "cpu":
            raise MedTuningError("INVALID_OPTION", "--precision int8 (dynamic int8 Linear layers) runs on the CPU only",
                                 "on a GPU use --precision auto (bf16 or fp16), or add --device cpu")
        return torch.qint8
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise MedTuningError("INVALID_OPTION", "fp16 autocast needs a CUDA GPU", "use --precision bf16 or fp32 on CPU")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def resolve_checkpointing(setting: str, device: torch.device, model: torch.nn.Module | None = None) -> bool:
    """Activation checkpointing of the backbone blocks: ``on`` / ``off`` / ``auto``.

    ``auto``: on when the backbone's blocks are frozen (parameter-efficient methods: the frozen blocks are
    recomputed in backward instead of keeping their activations), on every device; for methods that train
    the blocks (full, scratch) only on CUDA. Measured on a 2-core AMX CPU (docs/benchmarks.md, ViT-B +
    UPerNet, 16x128x128, batch 2, med_tuning): +19% step time for -21% peak memory.
    """
    if setting in ("on", True):
        return True
    if setting in ("off", False):
        return False
    if setting != "auto":
        raise MedTuningError("INVALID_OPTION", f"unknown checkpointing setting {setting!r}", "use auto, on or off")
    if device.type == "cuda":
        return True
    return model is not None and backbone_frozen(model)


def backbone_frozen(model: torch.nn.Module) -> bool:
    """True when no parameter of the encoder's transformer blocks trains."""
    encoder = getattr(model, "encoder", None)
    blocks = getattr(encoder, "blocks", None)
    if not blocks:
        return False
    return not any(p.requires_grad for blk in blocks for p in blk.parameters())


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32``, ``bfloat16``, ``float16`` or ``int8`` (``--precision int8``'s ``torch.qint8``), as reports show it."""
    if dtype is None:
        return "fp32"
    if dtype == torch.qint8:
        return "int8"
    return str(dtype).replace("torch.", "")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated; CPU: peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def describe_devices() -> dict:
    info: dict = {"cuda_available": torch.cuda.is_available(), "cpu_bf16": cpu_supports_bf16(), "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": props.name, "memory_mb": round(props.total_memory / 2**20)})
    return info
