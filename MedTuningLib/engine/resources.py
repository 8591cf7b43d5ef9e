"""Resource guard (issue 6, item 4): will a training run fit in memory? Asked before the first step.

The estimate of one training step is the sum of

- the model's parameters (already allocated when the check runs),
- a gradient and three Adam (amsgrad) moments for every tuned parameter,
- the activations autograd keeps for the backward pass, for the real crop and batch. They are counted
  without computing anything: a copy of the model made of fake tensors (PyTorch's ``FakeTensorMode``:
  shapes, dtypes and devices, no storage) runs one forward pass on a fake input of the training
  shape, and a saved-tensors hook adds up the storages autograd saves (each storage once). With
  activation checkpointing on, autograd keeps only the checkpointed blocks' inputs; the recomputation
  of one block during backward is added on top,
- the batch itself (input crops and labels),

times a factor for what the count does not see (gradients of activations while backward runs,
temporary buffers of convolutions and attention, allocator slack), plus a fixed allowance for the
kernels' first use. Calibration on this project's CPU machine, peak resident set size
(``ru_maxrss``) of two real training steps against the counted bytes: ViT-B+UPerNet and Swin-UNet
lite at 4-8x128x128, batch 1-2, checkpointing on and off, measured 1.39-1.64 times the count; tiny
ViTs (4-16 slices of 32-64 px) measured the count plus 25-45 MiB. Hence factor 1.8 and 64 MiB. A
half-precision autocast keeps most saved activations in 16 bits (factor 0.6 on them).

The additional memory (everything but the parameters, which are already in place) is compared with
what is available now: ``psutil.virtual_memory().available`` on CPU, ``torch.cuda.mem_get_info`` on
a GPU. When it does not fit, :func:`check_memory` raises MEMORY_ESTIMATE_TOO_LARGE with both figures
and a suggestion (smaller ``--batch`` / ``--crop``, ``--checkpointing on``, ``--precision bf16``).
Setting ``MEDTUNING_SKIP_MEMORY_CHECK=1`` skips the refusal (the estimate is still returned).
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Sequence

import torch

from MedTuningLib.errors import MedTuningError

# Peak memory of a real step / counted bytes (calibrated on CPU, see the module docstring).
OVERHEAD_FACTOR = 1.8
# Kernels' first use, allocator arenas: what even the smallest step adds (CPU measurement: 25-45 MiB).
FIXED_OVERHEAD = 64 * 2**20
# Saved activations under bf16 / fp16 autocast, relative to fp32 (norms and softmax stay in fp32).
HALF_PRECISION_ACTIVATIONS = 0.6
# Only this share of the available memory is planned for: the OS, the data and other processes need the rest.
USABLE_FRACTION = 0.9
ADAM_MOMENTS = 3  # exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad)
SKIP_ENV = "MEDTUNING_SKIP_MEMORY_CHECK"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def _fake_copy(model: torch.nn.Module, mode) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake tensors of ``mode``: same shapes, dtypes and
    devices, no storage, nothing copied (code that asks for the device, e.g. autocast, sees the real one)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = mode.from_tensor(b)
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _counting_checkpoints(counter: list[int]):
    """Count calls of ``torch.utils.checkpoint.checkpoint`` made by MedTuning's encoders."""
    import MedTuningLib.models.encoders as encoders

    original = getattr(encoders, "checkpoint", None)
    if original is None:
        yield
        return

    def counted(*args: Any, **kwargs: Any):
        counter[0] += 1
        return original(*args, **kwargs)

    encoders.checkpoint = counted
    try:
        yield
    finally:
        encoders.checkpoint = original


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # one key per storage: views of one tensor are counted once


def _saved_activation_bytes(fake_model: torch.nn.Module, mode, shape: Sequence[int], device: torch.device
                            ) -> tuple[int, int]:
    """Bytes of the storages autograd saves for backward in one forward pass of ``fake_model`` on an
    input of ``shape``, and the number of checkpointed segments that pass went through."""
    sizes: dict[int, int] = {}
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in sizes:
            sizes[key] = t.untyped_storage().nbytes()
            keep.append(t)  # keys stay unique while the tensors are alive
        return t

    counter = [0]
    with mode, torch.enable_grad(), _counting_checkpoints(counter):
        x = torch.empty(tuple(shape), device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fake_model(x)
        # Parameters are saved too (e.g. for a linear layer's input gradient); they are counted elsewhere.
        params = {_storage_key(p) for p in fake_model.parameters()}
    total = sum(size for key, size in sizes.items() if key not in params)
    return total, counter[0]


def estimate_training_memory(model: torch.nn.Module, crop: Sequence[int], batch: int, checkpointing: bool,
                             precision: torch.dtype | None = None, in_channels: int | None = None) -> dict[str, Any]:
    """Bytes one training step needs, by part (see the module docstring); ``total`` includes the parameters."""
    d, h, w = (int(v) for v in crop)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    if in_channels is None:
        in_channels = int(getattr(getattr(model, "config", None), "in_channels", 1))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    param_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    tuned = [p for p in model.parameters() if p.requires_grad]
    tuned_bytes = sum(p.numel() * p.element_size() for p in tuned)
    grads, adam = tuned_bytes, ADAM_MOMENTS * tuned_bytes
    batch_bytes = batch * d * h * w * (in_channels * 4 + 8)  # float32 crops + int64 labels
    method = "counted"
    was_training = model.training
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = _fake_copy(model, mode)
        fake.train()
        if hasattr(fake, "set_activation_checkpointing"):
            fake.set_activation_checkpointing(False)
        shape = (batch, in_channels, d, h, w)
        full, _ = _saved_activation_bytes(fake, mode, shape, device)
        activations = full
        if checkpointing and hasattr(fake, "set_activation_checkpointing"):
            fake.set_activation_checkpointing(True)
            kept, segments = _saved_activation_bytes(fake, mode, shape, device)
            # What is not kept is recomputed one checkpointed segment at a time during backward.
            activations = kept + max(0, full - kept) // max(1, segments)
        del fake
    except Exception:  # noqa: BLE001 - an op fake tensors cannot run: fall back to a rough rule
        # ~ one float per voxel per tuned-parameter-carrying layer output; wide enough to stay on the safe side.
        method = "rule of thumb"
        width = max((p.shape[0] for p in tuned if p.dim() >= 2), default=64)
        layers = max(1, sum(1 for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))))
        activations = batch * d * h * w * 4 * min(width, 256) * min(layers, 64) // (8 if checkpointing else 1)
    finally:
        model.train(was_training)
    if precision in (torch.float16, torch.bfloat16):
        activations = int(activations * HALF_PRECISION_ACTIVATIONS)
    additional = int(OVERHEAD_FACTOR * (grads + adam + activations + batch_bytes)) + FIXED_OVERHEAD
    return {"parameters": param_bytes, "gradients": grads, "optimizer": adam, "activations": activations,
            "batch": batch_bytes, "additional": additional, "total": param_bytes + additional, "method": method}


def available_memory(device: torch.device | str) -> tuple[int, str]:
    """Bytes free for this run on ``device`` now, and where the figure comes from."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)}"
    import psutil

    return int(psutil.virtual_memory().available), "available RAM"


def check_memory(model: torch.nn.Module, crop: Sequence[int], batch: int, device: torch.device | str,
                 checkpointing: bool, precision: torch.dtype | None = None) -> dict[str, Any]:
    """Estimate a training step's memory and refuse (MEMORY_ESTIMATE_TOO_LARGE) when it will not fit.

    Call it after ``model.to(device)``: the parameters are then already allocated, so only the
    additional memory is compared with what is available. Returns the estimate (bytes by part,
    ``available``, ``fits``).
    """
    device = torch.device(device)
    estimate = estimate_training_memory(model, crop, batch, checkpointing, precision)
    available, source = available_memory(device)
    estimate.update(available=available, available_source=source,
                    fits=estimate["additional"] <= USABLE_FRACTION * available)
    if estimate["fits"] or os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return estimate
    d, h, w = (int(v) for v in crop)
    # How many crops of this size would fit: activations and the batch scale with the batch size.
    per_sample = OVERHEAD_FACTOR * (estimate["activations"] + estimate["batch"]) / max(1, batch)
    fixed = OVERHEAD_FACTOR * (estimate["gradients"] + estimate["optimizer"]) + FIXED_OVERHEAD
    fitting_batch = int((USABLE_FRACTION * available - fixed) // max(per_sample, 1))
    suggestions = []
    if 1 <= fitting_batch < batch:
        suggestions.append(f"--batch {fitting_batch}")
    else:
        suggestions.append("a smaller --batch")
    suggestions.append(f"a smaller --crop (e.g. {max(1, d // 2)}x{max(1, h // 2)}x{max(1, w // 2)})")
    if not checkpointing:
        suggestions.append("--checkpointing on")
    if precision is None and device.type == "cuda":
        suggestions.append("--precision bf16")
    raise MedTuningError(
        "MEMORY_ESTIMATE_TOO_LARGE",
        f"training at crop {d}x{h}x{w} and batch {batch} needs about {_gib(estimate['additional'])} more "
        f"memory on {device.type} (model {_gib(estimate['parameters'])} already loaded; activations "
        f"{_gib(estimate['activations'])}, gradients and optimizer {_gib(estimate['gradients'] + estimate['optimizer'])}, "
        f"with a margin), but only {_gib(available)} is {source}",
        "use " + ", or ".join(suggestions) + f"; set {SKIP_ENV}=1 to try anyway",
        estimate_bytes=estimate["additional"], available_bytes=available)
