"""``medtuning bench infer``: seconds per volume, plain fp32 sliding window against the tuned path.

- plain: what a straightforward PyTorch + MONAI user writes: ``torch.no_grad``, fp32, MONAI
  ``sliding_window_inference`` with one window per call (Gaussian blending, the same overlap and padding);
- tuned: :func:`MedTuningLib.engine.infer.predict_probabilities`, the path ``segment`` / ``evaluate`` use
  (``torch.inference_mode``, autocast in the device's precision with the matmul weights cast once instead of
  once per window, several windows per forward, the adapter's per-volume constants computed once).

The model is ``--model DIR`` (a trained model folder: its preprocessing, crop and label scheme are used) or,
without it, one built from ``--arch`` with random base weights (timing only: the Dice of a random model means
little). The volume is ``--image`` (real files, one per modality) or a synthetic one of ``--size``. The Dice
difference is taken against ``--label`` when given (the scheme's regions, e.g. BraTS ET / TC / WT), else
between the two paths' predictions (foreground classes).

``--variant SPEC`` (repeatable) measures settings of the tuned path instead, each against the first: SPEC is
space-separated ``key=value`` pairs, e.g. ``"overlap=0.25,0,0 precision=int8"`` (:data:`VARIANT_KEYS`). A model
folder's working spacing is used as ``segment`` uses it (resampled there and back, timed), so a variant's time is
what ``segment`` would spend on the volume (reading the file excepted).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch

from MedTuningLib.engine.windows import DEFAULT_OVERLAP, INFERENCE_PRECISIONS, describe_overlap, parse_overlap
from MedTuningLib.errors import MedTuningError

OVERLAP = DEFAULT_OVERLAP  # the segment command's default overlap

# What a --variant may set, and what each key means.
VARIANT_KEYS = {"overlap": "window overlap, one fraction or D,H,W (as --overlap)",
                "precision": "auto, fp32, bf16 or int8 (as --precision)",
                "sw_batch": "windows per forward call",
                "tta": "on / off / volume: flip test-time augmentation (on: each window's flips in its forward "
                       "call, as segment does; volume: one pass per flipped volume)",
                "threads": "PyTorch CPU threads (torch.set_num_threads)"}


def parse_variant(text: str) -> dict:
    """``"overlap=0.25,0,0 precision=int8"`` -> ``{"overlap": (0.25, 0, 0), "precision": "int8"}``; unset keys
    take ``segment``'s defaults."""
    variant: dict = {}
    for item in text.split():
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS or not value:
            raise MedTuningError("INVALID_OPTION", f"--variant {text!r}: {item!r} is not a setting",
                                 "use key=value pairs: " + "; ".join(f"{k} ({v})" for k, v in VARIANT_KEYS.items()))
        if key == "overlap":
            variant[key] = parse_overlap(value)
        elif key == "precision":
            if value not in INFERENCE_PRECISIONS:
                raise MedTuningError("INVALID_OPTION", f"--variant precision={value} is not a precision",
                                     "use one of " + ", ".join(INFERENCE_PRECISIONS))
            variant[key] = value
        elif key == "tta":
            if value not in ("on", "off", "volume"):
                raise MedTuningError("INVALID_OPTION", f"--variant tta={value}", "use tta=on, off or volume")
            variant[key] = value != "off"
            if value == "volume":
                variant["flips_per"] = "volume"
        else:
            try:
                variant[key] = int(value)
            except ValueError:
                variant[key] = 0
            if variant[key] < 1:
                raise MedTuningError("INVALID_OPTION", f"--variant {key}={value} is not a positive integer",
                                     f"give {key} as a whole number of at least 1")
    return variant


def plain_probabilities(model: torch.nn.Module, image: torch.Tensor, crop, device: torch.device,
                        overlap: float = OVERLAP, on_window: Callable[[], None] | None = None) -> torch.Tensor:
    """The plain fp32 path: ``[K, D, H, W]`` softmax probabilities."""
    from monai.inferers import sliding_window_inference

    from MedTuningLib.engine.infer import WINDOW_PADDING

    model.eval()

    def predictor(x: torch.Tensor) -> torch.Tensor:
        if on_window is not None:
            on_window()
        return torch.softmax(model(x), dim=1)

    with torch.no_grad():
        inputs = image.unsqueeze(0).to(device=device, dtype=torch.float32)
        probs = sliding_window_inference(inputs, roi_size=list(crop), sw_batch_size=1, predictor=predictor,
                                         overlap=overlap, mode="gaussian", padding_mode=WINDOW_PADDING)
    return probs[0].float().cpu()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks, as ``evaluate`` scores it (1 when both are empty)."""
    from MedTuningLib.engine.evaluate import dice_hd95

    return dice_hd95(a, b, spacing=(1.0, 1.0, 1.0), hd95=False)[0]


def _load(args, device):
    """(model, crop, image [C, D, H, W] float32, label classes or None, scheme or None, description, volume text,
    the image's spacing (z, y, x) or None, the model's working spacing or None)."""
    from pathlib import Path

    label = None
    spacing = working = None
    scheme = None
    if args.model is not None:
        from MedTuningLib.engine.modelfolder import load_model_folder

        loaded = load_model_folder(Path(args.model), device)
        model, crop, scheme = loaded.model, tuple(loaded.crop), loaded.scheme
        what = f"model folder {args.model} ({loaded.manifest['architecture']['arch']}, " \
               f"{loaded.manifest['architecture'].get('backbone')})"
        n_channels = len(loaded.modalities)
        working = loaded.spacing
    else:
        from MedTuningLib.models import ModelConfig, build_model

        crop = tuple(args.crop)
        n_channels = len(args.image) if args.image else 4
        cfg = ModelConfig(arch=args.arch, backbone=args.backbone, in_channels=n_channels, num_classes=4,
                          img_size=crop[1], depth=crop[0])
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        loaded = None
        what = f"{args.arch} ({cfg.backbone_name}) with random base weights (timing only)"
    if args.image:
        from MedTuningLib.data.io import read_case_images

        if len(args.image) != n_channels:
            raise MedTuningError("MODALITY_COUNT_MISMATCH", f"the model expects {n_channels} image(s), "
                                 f"{len(args.image)} were given", "pass one --image per modality")
        array, reference = read_case_images([Path(p) for p in args.image])
        spacing = tuple(float(v) for v in reversed(reference.GetSpacing()))
        if loaded is not None:
            from MedTuningLib.data.preprocess import normalize_intensity

            array = normalize_intensity(array, loaded.preprocessing)
        else:  # z-score per channel
            mean = array.mean(axis=(1, 2, 3), keepdims=True)
            std = array.std(axis=(1, 2, 3), keepdims=True) + 1e-6
            array = ((array - mean) / std).astype(np.float32)
        if args.label is not None:
            if scheme is None:
                from MedTuningLib.data.labels import scheme_for_task

                scheme = scheme_for_task("brats", source="brats2015")
            from MedTuningLib.data.io import read_label

            label = read_label(Path(args.label), reference, scheme, allow_empty=True)
        volume = "x".join(str(s) for s in array.shape[1:]) + " from " + ", ".join(Path(p).name for p in args.image)
    else:
        size = tuple(args.size or (155, 240, 240))
        rng = np.random.default_rng(0)
        array = rng.standard_normal((n_channels, *size)).astype(np.float32)
        volume = "x".join(str(s) for s in size) + " synthetic (random normal)"
    if spacing is None or working is None:
        spacing = working = None  # a synthetic volume, or a native model: no resampling
    return (model, crop, np.ascontiguousarray(array, dtype=np.float32), label, scheme, what, volume, spacing,
            working)


def _scores(scheme, prediction: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Dice per region of ``scheme`` (or per foreground class without one) of two class maps."""
    if scheme is not None:
        ref_masks, pred_masks = scheme.region_masks(reference), scheme.region_masks(prediction)
        return {r.name: round(dice(pred_masks[r.name], ref_masks[r.name]), 5) for r in scheme.regions}
    classes = sorted((set(np.unique(prediction)) | set(np.unique(reference))) - {0})
    return {str(int(k)): round(dice(prediction == k, reference == k), 5) for k in classes}


def bench_variants(args, events, cancel=None) -> dict:
    """``--variant``: every variant of the tuned path timed ``--repeats`` times (interleaved), its Dice against
    ``--label`` (or against the first variant's result) and the difference to the first variant."""
    from MedTuningLib.engine.device import resolve_device, resolve_precision
    from MedTuningLib.engine.infer import auto_sw_batch_size, class_map_of, predict_on_input_grid

    device = resolve_device(args.device)
    variants = [(text, parse_variant(text)) for text in args.variant]
    model, crop, array, label, scheme, what, volume, spacing, working = _load(args, device)
    check = cancel.check if cancel is not None else None
    default_threads = torch.get_num_threads()
    events.log(f"bench infer: {what}; volume {volume}; crop {'x'.join(map(str, crop))}; "
               f"{len(variants)} variants x {args.repeats} repeats")

    def run(settings: dict, count: list[int]) -> np.ndarray:
        def on_window() -> None:
            count[0] += 1
            if check is not None:
                check()

        torch.set_num_threads(settings.get("threads", default_threads))
        try:
            probs = predict_on_input_grid(model, array, spacing or (1.0, 1.0, 1.0), working, crop, device,
                                          resolve_precision(settings.get("precision", "auto"), device),
                                          overlap=settings.get("overlap", DEFAULT_OVERLAP),
                                          tta=settings.get("tta", False), sw_batch_size=settings.get("sw_batch"),
                                          flips_per=settings.get("flips_per", "window"), on_window=on_window)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            torch.set_num_threads(default_threads)
        return class_map_of(probs)

    # Warm-up (one-off kernel selection, int8 packing) on one window's worth of the volume, not timed.
    warm = np.ascontiguousarray(array[:, :crop[0], :crop[1], :crop[2]])
    for _, settings in variants:
        predict_on_input_grid(model, warm, (1.0, 1.0, 1.0), None, crop, device,
                              resolve_precision(settings.get("precision", "auto"), device))
    times: dict[str, list[float]] = {text: [] for text, _ in variants}
    windows: dict[str, int] = {}
    results: dict[str, np.ndarray] = {}
    done, total = 0, len(variants) * args.repeats
    for _ in range(args.repeats):
        for text, settings in variants:
            events.progress("infer", done, total)
            count = [0]
            t0 = time.perf_counter()
            results[text] = run(settings, count)
            times[text].append(time.perf_counter() - t0)
            windows[text] = count[0]
            done += 1
            events.log(f"  {text}: {times[text][-1]:.1f} s, {count[0]} forward calls")
    events.progress("infer", total, total)

    first = variants[0][0]
    rows = []
    for text, settings in variants:
        reference = label if label is not None else results[first]
        scores = _scores(scheme, results[text], reference)
        mean = float(np.mean(list(scores.values()))) if scores else 1.0
        rows.append({"variant": text, "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                                   for k, v in settings.items()},
                     "seconds": round(statistics.median(times[text]), 2), "all_s": [round(t, 2) for t in times[text]],
                     "forward_calls": windows[text],
                     "sw_batch": settings.get("sw_batch", auto_sw_batch_size(device)),
                     "dice": scores, "dice_mean": round(mean, 5)})
    for row in rows:
        row["speedup"] = round(rows[0]["seconds"] / row["seconds"], 2)
        row["dice_difference_points"] = round(100 * (row["dice_mean"] - rows[0]["dice_mean"]), 3)
        row["voxels_differing"] = int((results[row["variant"]] != results[first]).sum())
    return {"model": what, "volume": volume, "crop": list(crop), "repeats": args.repeats, "device": str(device),
            "working_spacing_xyz": None if working is None else list(reversed(working)),
            "dice_against": "label" if label is not None else "the first variant", "variants": rows}


def bench_infer(args, events, cancel=None) -> dict:
    from MedTuningLib.engine.device import precision_name, resolve_device, resolve_precision
    from MedTuningLib.engine.infer import auto_sw_batch_size, class_map_of, predict_probabilities

    if getattr(args, "variant", None):
        return bench_variants(args, events, cancel)
    device = resolve_device(args.device)
    model, crop, array, label, scheme, what, volume, _, _ = _load(args, device)
    dtype = resolve_precision("auto", device)
    image = torch.from_numpy(array)
    check = cancel.check if cancel is not None else None
    sw_batch = auto_sw_batch_size(device)
    events.log(f"bench infer: {what}; volume {volume}; crop {'x'.join(map(str, crop))}, "
               f"overlap {describe_overlap(OVERLAP)}")

    # Warm-up (one-off kernel selection) with one window each, not timed.
    warm = image[:, :crop[0], :crop[1], :crop[2]]
    plain_probabilities(model, warm, crop, device)
    predict_probabilities(model, warm, crop, device, dtype, overlap=OVERLAP)

    times = {"plain": [], "tuned": []}
    probs = {}
    total = 2 * args.repeats
    for r in range(args.repeats):
        for path in ("plain", "tuned"):
            events.progress("infer", len(times["plain"]) + len(times["tuned"]), total)
            t0 = time.perf_counter()
            if path == "plain":
                p = plain_probabilities(model, image, crop, device, overlap=OVERLAP, on_window=check)
            else:
                p = predict_probabilities(model, image, crop, device, dtype, overlap=OVERLAP, on_window=check)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[path].append(time.perf_counter() - t0)
            probs[path] = class_map_of(p)
            events.log(f"  {path}: {times[path][-1]:.1f} s")
    events.progress("infer", total, total)

    result: dict = {"model": what, "volume": volume, "crop": list(crop), "overlap": describe_overlap(OVERLAP),
                    "repeats": args.repeats, "device": str(device)}
    settings = {"plain": "fp32, no_grad, 1 window per forward",
                "tuned": f"{precision_name(dtype)} autocast, weights cast once, inference_mode, "
                         f"{sw_batch} windows per forward"}
    for path in ("plain", "tuned"):
        result[path] = {"seconds": round(statistics.median(times[path]), 2), "all_s": [round(t, 2) for t in times[path]],
                        "settings_text": settings[path]}
    if label is not None:
        ref_masks = scheme.region_masks(label)
        for path in ("plain", "tuned"):
            pred_masks = scheme.region_masks(probs[path])
            scores = {region.name: round(dice(pred_masks[region.name], ref_masks[region.name]), 5)
                      for region in scheme.regions}
            result[path]["dice"] = scores
            result[path]["dice_mean"] = round(float(np.mean(list(scores.values()))), 5)
        result["dice_against"] = "label"
        result["dice_difference_points"] = round(100 * (result["tuned"]["dice_mean"] - result["plain"]["dice_mean"]), 3)
    else:
        classes = sorted(set(np.unique(probs["plain"])) | set(np.unique(probs["tuned"])) - {0})
        agreement = {int(k): round(dice(probs["plain"] == k, probs["tuned"] == k), 5) for k in classes}
        mean = float(np.mean(list(agreement.values()))) if agreement else 1.0
        result["agreement_dice"] = agreement
        result["dice_against"] = "each other"
        result["dice_difference_points"] = round(100 * (1.0 - mean), 3)
    result["voxels_differing"] = int((probs["plain"] != probs["tuned"]).sum())
    result["speedup"] = round(result["plain"]["seconds"] / result["tuned"]["seconds"], 2)
    return result
