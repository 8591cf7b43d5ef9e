"""Inference: sliding-window prediction over whole volumes and writing results.

MONAI's ``sliding_window_inference`` does the windowing (training crop size, overlap, Gaussian
blending); optional flip test-time augmentation averages the softmax over mirrored copies of each
window. A model with a working spacing (data/spacing.py) sees the scan resampled to it; its
probabilities go back to the input's own voxel grid before the argmax, so the written ``.seg.nrrd``
has the input volume's geometry exactly.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from MedTuningLib.engine.device import autocast
from MedTuningLib.engine.windows import DEFAULT_OVERLAP, windows_per_volume
from MedTuningLib.errors import MedTuningError

def tta_flips(flip_axes: Sequence[int] = (0, 1, 2)) -> list[tuple[int, ...]]:
    """Every combination of the volume axes (0, 1, 2 = D, H, W) the model was trained with flips on,
    as dimensions of a ``[B, C, D, H, W]`` tensor; the first entry is no flip."""
    dims = [axis + 2 for axis in flip_axes]
    return [axes for n in range(len(dims) + 1) for axes in itertools.combinations(dims, n)]


# How a volume smaller than the crop is padded up to it. Zeros would be read as slices of average tissue,
# and the adapter's global branch mixes every slice of a window: repeating the edge slices instead keeps a
# thin slab's prediction (measured on a 10-slice spleen CT slab with 16-slice windows: Dice 0.49 with
# zeros, 0.90 with edge slices).
WINDOW_PADDING = "replicate"


@contextlib.contextmanager
def int8_linear_copy(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """A copy of ``model`` whose Linear layers run in int8 (PyTorch's dynamic quantization: int8 weights,
    activations quantized per call) for CPU inference; the model itself is untouched. Measured with
    ``bench infer`` (README): ViT-B windows about 1.4x faster on an AVX2 CPU, at a small Dice difference."""
    quantize = getattr(getattr(torch, "ao", None), "quantization", None)
    if quantize is None or not hasattr(quantize, "quantize_dynamic"):
        raise MedTuningError("INVALID_OPTION", "this PyTorch has no dynamic int8 quantization (torch.ao.quantization)",
                             "use --precision auto or fp32")
    # Made outside inference mode: the adapter's cached constants track its weights' version counters.
    with warnings.catch_warnings(), torch.inference_mode(False):
        # PyTorch announces the quantized tensor types' deprecation on every quantization; it still runs.
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*deprecated", category=DeprecationWarning)
        copy = quantize.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)
    yield copy


def auto_sw_batch_size(device: torch.device) -> int:
    """Windows per forward call: four on a GPU (fills it), one on a CPU. On a CPU two windows a call were no
    faster for ViT-B or Swin-UNet, in fp32 or int8 (``bench infer --variant sw_batch=N`` on a clinical CT,
    README "Choosing the inference settings"), and under int8 one window a call keeps a window's result
    independent of the windows beside it: dynamic quantization scales each call's activations by its range."""
    return 4 if device.type == "cuda" else 1


def predict_probabilities(model: torch.nn.Module, image: torch.Tensor, crop: Sequence[int], device: torch.device,
                          dtype: torch.dtype | None = None, overlap: float | Sequence[float] = DEFAULT_OVERLAP,
                          tta: bool = False,
                          sw_batch_size: int | None = None, on_window: Callable[[], None] | None = None,
                          flip_axes: Sequence[int] = (0, 1, 2), mode: str = "gaussian",
                          flip_softmax: bool = False, flips_per: str = "window",
                          on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Softmax probabilities ``[K, D, H, W]`` (float32, CPU) for one normalised volume ``[C, D, H, W]``.

    The tuned inference path (measured by ``medtuning bench infer``): ``torch.inference_mode``; under
    autocast (``dtype``) every Linear / Conv weight is cast to ``dtype`` once for the whole volume rather than
    by autocast for every window (same results: autocast rounds them the same way), and restored afterwards;
    ``sw_batch_size`` windows per forward (``None``: :func:`auto_sw_batch_size`).

    ``dtype`` ``torch.qint8`` (``--precision int8``, CPU): the Linear layers of a copy run in int8
    (:func:`int8_linear_copy`). ``overlap`` may be one value per axis (D, H, W); ``mode`` is MONAI's blending
    ("gaussian", or "constant": every window weighs the same). ``flip_softmax``: each flip's window-averaged
    probabilities go through a softmax again before the flips are averaged, as the official code does
    (``--protocol paper``, engine/recipe.py).

    ``tta``: the mirrored copies of each window go through the network in the same forward call as the window
    and are averaged there (``flips_per="window"``, as nnU-Net mirrors each window), so the volume is windowed
    once; ``"volume"`` (and ``flip_softmax``, which needs it) runs one sliding-window pass per flipped volume.

    ``on_progress(done, total)`` follows each forward call (``total``: the calls the whole volume takes), and
    ``on_progress(0, total)`` comes just before the first.
    """
    from monai.inferers import sliding_window_inference

    from MedTuningLib.models.base import compact_weights

    was_training = model.training
    model.eval()
    int8 = dtype == torch.qint8
    weights = int8_linear_copy(model) if int8 else contextlib.nullcontext(model)
    autocast_dtype = None if int8 else dtype

    if flips_per not in ("window", "volume"):
        raise ValueError(f"flips_per must be 'window' or 'volume', not {flips_per!r}")
    flips = tta_flips(flip_axes) if tta else [()]
    window_flips = flips if len(flips) > 1 and flips_per == "window" and not flip_softmax else [()]
    volume_flips = flips if window_flips == [()] else [()]
    if sw_batch_size is None:
        # A window's mirrored copies already make a batch of 8: one window per call keeps the batch (and its
        # memory, e.g. the Swin-UNet decoder at full resolution) within twice that of the plain run.
        sw_batch_size = 1 if len(window_flips) > 1 else auto_sw_batch_size(device)
    total = None
    expected_calls = math.ceil(windows_per_volume(image.shape[-3:], crop, overlap) / sw_batch_size) * len(volume_flips)
    done_calls = 0
    try:
        with weights as net, compact_weights(net, autocast_dtype), torch.inference_mode():
            def window_probs(x: torch.Tensor) -> torch.Tensor:
                nonlocal done_calls
                if on_window is not None:
                    on_window()  # lets a caller cancel between windows
                batch = torch.cat([torch.flip(x, axes) if axes else x for axes in window_flips])
                with autocast(device, autocast_dtype):
                    logits = net(batch)
                probs = torch.softmax(logits.float(), dim=1).chunk(len(window_flips))
                done_calls += 1
                if on_progress is not None:
                    on_progress(done_calls, max(done_calls, expected_calls))  # never a total below the calls made
                return sum(torch.flip(p, axes) if axes else p for p, axes in zip(probs, window_flips)) / len(probs)

            inputs = image.unsqueeze(0).to(device=device, dtype=torch.float32)
            if on_progress is not None:
                on_progress(0, expected_calls)  # the windows start (the int8 copy, if any, is made)
            for axes in volume_flips:
                flipped = torch.flip(inputs, axes) if axes else inputs
                probs = sliding_window_inference(flipped, roi_size=list(crop), sw_batch_size=sw_batch_size,
                                                 predictor=window_probs, overlap=overlap, mode=mode,
                                                 padding_mode=WINDOW_PADDING)
                probs = torch.flip(probs, axes) if axes else probs
                if flip_softmax:
                    probs = torch.softmax(probs, dim=1)
                total = probs if total is None else total + probs
            result = (total / len(volume_flips))[0].float().cpu()
    finally:
        model.train(was_training)
    return result.clone()  # a normal tensor (not an inference-mode one) for the caller


def predict_on_input_grid(model: torch.nn.Module, image: np.ndarray, spacing: Sequence[float],
                          working: Sequence[float] | None, crop: Sequence[int], device: torch.device,
                          dtype: torch.dtype | None, **window) -> torch.Tensor:
    """:func:`predict_probabilities` on the model's working grid for a normalised ``[C, D, H, W]`` volume at
    ``spacing`` (z, y, x): the image is resampled to ``working`` (linear), the probabilities back onto the
    input grid (linear), so the caller's argmax is on the input's own voxels. ``working`` None: native."""
    from MedTuningLib.data.spacing import to_input_grid, to_working_grid

    resampled = to_working_grid(image, spacing, working)
    probs = predict_probabilities(model, torch.from_numpy(np.ascontiguousarray(resampled, dtype=np.float32)), crop,
                                  device, dtype, **window)
    if resampled is image:
        return probs
    return torch.from_numpy(to_input_grid(probs.numpy(), working, spacing, image.shape[-3:]))


def class_map_of(probs: torch.Tensor | np.ndarray) -> np.ndarray:
    """The class of each voxel: the argmax over the first axis of ``[K, D, H, W]`` probabilities, as uint8
    ``[D, H, W]`` (int64 beyond 255 classes; the first of equal maxima wins, as ``argmax``). Compared class by class: on a CPU,
    ``torch.argmax(0)`` of a 3-class 200x512x512 map took 9.0 s, numpy's 3.3 s, this 0.7 s."""
    probs = torch.as_tensor(probs)
    if probs.shape[0] > 255:
        return probs.argmax(0).cpu().numpy().astype(np.int64)
    best = probs[0].clone()
    classes = torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
    for k in range(1, probs.shape[0]):
        higher = probs[k] > best
        classes[higher] = k
        torch.maximum(best, probs[k], out=best)
    return classes.cpu().numpy()


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop connected components (26-connectivity) smaller than ``min_voxels``."""
    if min_voxels <= 0 or not mask.any():
        return mask
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def class_masks(scheme, class_map: np.ndarray) -> dict[str, np.ndarray]:
    """One boolean mask per training class (background excluded), by class name."""
    return {cls.name: class_map == index for index, cls in enumerate(scheme.classes, start=1)}


def segment_masks(scheme, class_map: np.ndarray, min_component: int = 0) -> dict[str, np.ndarray]:
    """The masks to write as segments, in the scheme's segment order.

    Schemes that write regions (BraTS ET / TC / WT) give overlapping masks; class schemes give
    disjoint ones.
    """
    masks = scheme.region_masks(class_map) if scheme.write == "regions" else class_masks(scheme, class_map)
    ordered = {}
    for segment in scheme.segments:
        mask = masks[segment.name]
        ordered[segment.name] = remove_small_components(mask, min_component)
    return ordered


def segment_probabilities(scheme, probs: torch.Tensor) -> dict[str, np.ndarray]:
    """Per written segment, the model's probability (float32 [D, H, W]): a class's softmax, or for a
    region (BraTS ET / TC / WT) the sum over its classes."""
    if scheme.write == "regions":
        by_name = {r.name: probs[list(r.class_indices)].sum(0) for r in scheme.regions}
    else:
        by_name = {cls.name: probs[index] for index, cls in enumerate(scheme.classes, start=1)}
    return {s.name: by_name[s.name].numpy().astype(np.float32) for s in scheme.segments}


@dataclass
class SegmentResult:
    class_map: np.ndarray
    masks: dict[str, np.ndarray]
    reference: object  # SimpleITK image whose grid the result is on
    seconds: float
    dicom: list = field(default_factory=list)  # per image: the DICOM series read (DicomSeries) or None
    provenance: list = field(default_factory=list)  # per image: what was read (MedTuningLib.data.io.CaseImages)
    probabilities: dict | None = None  # per segment, when asked for (fractional DICOM SEG)


def segment_images(loaded, image_paths: Sequence[Path], device: torch.device, dtype: torch.dtype | None,
                   overlap: float = 0.5, tta: bool = False, min_component: int = 0,
                   log: Callable[[str], None] | None = None, on_window: Callable[[], None] | None = None,
                   series: Sequence[str] = (), keep_probabilities: bool = False, protocol=None,
                   regularize: bool = False, on_progress: Callable[[int, int], None] | None = None) -> SegmentResult:
    """Read, normalise and segment one case with a loaded model folder (inputs may be DICOM series
    folders; ``series`` picks among several). ``protocol`` (an :class:`~MedTuningLib.engine.recipe.InferenceProtocol`,
    e.g. the paper's) replaces ``overlap`` / ``tta`` and adds its windows, blending and post-processing."""
    import time

    from MedTuningLib.data.io import read_case_inputs
    from MedTuningLib.data.preprocess import normalize_intensity

    t0 = time.monotonic()
    if len(image_paths) != len(loaded.modalities):
        raise MedTuningError("MODALITY_COUNT_MISMATCH",
                             f"the model expects {len(loaded.modalities)} image(s) ({', '.join(loaded.modalities)}) "
                             f"but {len(image_paths)} were given",
                             "pass one --image per modality, in this order: " + ", ".join(loaded.modalities))
    case = read_case_inputs([Path(p) for p in image_paths], log=log, series=series, regularize=regularize)
    array, reference = case.array, case.reference
    array = normalize_intensity(array, loaded.preprocessing)
    window = {} if protocol is None else {"overlap": protocol.overlap, "tta": protocol.tta, "mode": protocol.blend,
                                          "flip_softmax": protocol.flip_softmax}
    spacing = tuple(float(s) for s in reversed(reference.GetSpacing()))  # (z, y, x), as the arrays
    if log is not None and loaded.spacing is not None:
        from MedTuningLib.data.spacing import describe, same_spacing

        if not same_spacing(spacing, loaded.spacing):
            log(f"resampling {describe(spacing)} to the model's working spacing {describe(loaded.spacing)}; "
                f"the result is on the input's grid")
    probs = predict_on_input_grid(loaded.model, array, spacing, loaded.spacing, loaded.crop, device, dtype,
                                  **{"overlap": overlap, "tta": tta, **window}, on_window=on_window,
                                  on_progress=on_progress,
                                  flip_axes=loaded.manifest.get("flip_axes", (0, 1, 2)))
    class_map = class_map_of(probs)
    if protocol is not None and protocol.et_min_voxels:
        from MedTuningLib.engine.recipe import relabel_small_enhancing

        class_map, relabelled = relabel_small_enhancing(loaded.scheme, class_map, protocol.et_min_voxels)
        if relabelled and log is not None:
            log(f"paper protocol: enhancing tumour under {protocol.et_min_voxels} voxels relabelled as NCR/NET")
    masks = segment_masks(loaded.scheme, class_map, min_component)
    probabilities = segment_probabilities(loaded.scheme, probs) if keep_probabilities else None
    return SegmentResult(class_map=class_map, masks=masks, reference=reference, seconds=time.monotonic() - t0,
                         dicom=list(case.dicom), provenance=case.provenance(), probabilities=probabilities)
