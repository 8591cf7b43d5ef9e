"""``medtuning bench peers``: MedTuning's segment path against nnU-Net's and MONAI's networks, one volume.

Every system runs in a fresh process (its peak memory is its own), with random weights (the cost does not
depend on them), on the same input volume, each on the grid its own pipeline works on, and pays the same
pipeline: z-score the scan, resample it to its grid (linear), sliding window with its window, overlap and
blending, probabilities back onto the input grid (linear), argmax. Timed: that whole pipeline (reading the
file is not). Also one training step (its usual batch and window, random data) unless ``--no-train-step``.

- ``medtuning:<arch>``: MedTuning's own path (``engine/infer.predict_on_input_grid``, as ``segment`` runs it:
  working spacing ``--spacing``, window = the training crop, ``--overlap`` / ``--precision`` as segment takes them,
  Med-Tuning on the architecture's default backbone);
- ``nnunet``: nnU-Net's default 3d_fullres network, ``PlainConvUNet`` from ``dynamic_network_architectures``
  (the package nnU-Net builds its networks from; an optional bench dependency), built as nnU-Net's planner
  builds it (:func:`nnunet_plan`): target spacing by nnU-Net's rule over the input (one volume: its own
  spacing, unless ``--nnunet-spacing``), patch ``--nnunet-patch`` (128^3 is what the planner gives abdominal
  CT within its 8 GB reference), features 32 doubling up to 320, pooling while an axis keeps at least 4
  voxels and is not over twice as coarse as the finest, two 3x3x3 convs per stage, instance norm, leaky ReLU;
  inference at step 0.5, Gaussian, fp32 on CPU and fp16 autocast on GPU as nnUNetPredictor does; its mirroring
  TTA (on by default in nnU-Net, 8 passes) is off here, as for everyone;
- ``swinunetr``: MONAI's SwinUNETR, feature size 48, 96^3 windows at 1.5 x 1.5 x 2.0 mm, overlap 0.25
  (MONAI's default), 4 windows per batch (the BTCV tutorial);
- ``segresnet``: MONAI's SegResNet as Auto3DSeg configures it (32 filters, blocks 1-2-2-4-4), 96^3 windows at
  1.5 mm, overlap 0.4.

``--max-windows N`` stops a slow system after N forward calls and extrapolates its time from them (the
resampling is still measured); the row then says ``extrapolated``.

Worker: ``python -m MedTuningLib.bench.peers_bench --system NAME ...`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from MedTuningLib.engine.windows import (DEFAULT_OVERLAP, INFERENCE_PRECISIONS, describe_overlap, overlap_argument,
                                         windows_per_volume)

SYSTEMS = ("medtuning:vit_upernet", "medtuning:swin_unet", "nnunet", "swinunetr", "segresnet")
NUM_CLASSES = 3  # background, kidney, tumour: the KiTS scheme


class _Enough(Exception):
    """Raised inside the sliding window once ``--max-windows`` forwards are timed."""


def nnunet_plan(spacing: tuple[float, float, float], patch: tuple[int, int, int]) -> dict:
    """nnU-Net's 3d_fullres topology for a patch at a spacing (z, y, x), after its planner's
    ``get_pool_and_conv_props``: an axis is pooled while it keeps at least 4 voxels (min feature map size)
    and its current spacing is at most twice the finest one; kernels are 3 on axes whose spacing is within
    twice the finest, 1 otherwise; features 32 * 2^stage, capped at 320."""
    current, size = list(spacing), list(patch)
    pools, kernels = [], []
    while True:
        finest = min(current)
        kernels.append([3 if s <= 2 * finest else 1 for s in current])
        pool = [2 if n >= 8 and s <= 2 * finest else 1 for n, s in zip(size, current)]
        if not any(p == 2 for p in pool):
            break
        pools.append(pool)
        current = [s * p for s, p in zip(current, pool)]
        size = [n // p for n, p in zip(size, pool)]
    stages = len(pools) + 1
    return {"n_stages": stages, "features_per_stage": [min(32 * 2 ** i, 320) for i in range(stages)],
            "kernel_sizes": kernels, "strides": [[1, 1, 1]] + pools, "n_conv_per_stage": [2] * stages,
            "n_conv_per_stage_decoder": [2] * (stages - 1), "patch_size": list(patch)}


def build_system(args, in_spacing: tuple[float, float, float], in_shape: tuple[int, int, int]) -> dict:
    """The network and how its pipeline runs: grid spacing (z, y, x), window, overlap, windows per call."""
    import torch

    from MedTuningLib.data.spacing import choose_spacing, parse_spacing_option

    torch.manual_seed(0)
    name = args.system
    if name.startswith("medtuning:"):
        from MedTuningLib.engine.train import parse_backbone_args
        from MedTuningLib.models import ModelConfig, build_model

        arch = name.split(":", 1)[1]
        d, h, w = args.crop
        cfg = ModelConfig(arch=arch, backbone=args.backbone, in_channels=1, num_classes=NUM_CLASSES, img_size=h,
                          depth=d, method="med_tuning", backbone_kwargs=parse_backbone_args(args.backbone_args),
                          decoder_width=args.decoder_width)
        model = build_model(cfg)
        option = parse_spacing_option(args.spacing)
        grid = None if option == "native" else (in_spacing if option == "auto" else option)
        return {"model": model, "grid": grid, "window": tuple(args.crop), "overlap": args.overlap, "kind": "medtuning",
                "what": f"MedTuning {arch} ({cfg.backbone_name}), med_tuning", "train_batch": 2}
    if name == "nnunet":
        from dynamic_network_architectures.architectures.unet import PlainConvUNet

        grid = (choose_spacing([in_spacing], [in_shape]) if args.nnunet_spacing == "plan"
                else parse_spacing_option(args.nnunet_spacing))
        grid = in_spacing if grid == "native" else grid
        plan = nnunet_plan(grid, tuple(args.nnunet_patch))
        model = PlainConvUNet(1, plan["n_stages"], plan["features_per_stage"], torch.nn.Conv3d, plan["kernel_sizes"],
                              plan["strides"], plan["n_conv_per_stage"], NUM_CLASSES, plan["n_conv_per_stage_decoder"],
                              conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                              norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                              nonlin_kwargs={"inplace": True}, deep_supervision=False)
        return {"model": model, "grid": grid, "window": tuple(args.nnunet_patch), "overlap": 0.5, "kind": "nnunet",
                "what": f"nnU-Net 3d_fullres PlainConvUNet ({plan['n_stages']} stages)", "plan": plan,
                "train_batch": 2}
    if name == "swinunetr":
        from monai.networks.nets import SwinUNETR

        window = tuple(args.monai_window)
        try:
            model = SwinUNETR(in_channels=1, out_channels=NUM_CLASSES, feature_size=48)
        except TypeError:  # MONAI before 1.5 still wants img_size
            model = SwinUNETR(img_size=window, in_channels=1, out_channels=NUM_CLASSES, feature_size=48)
        return {"model": model, "grid": (2.0, 1.5, 1.5), "window": window, "overlap": 0.25, "kind": "monai",
                "what": "MONAI SwinUNETR (feature size 48)", "sw_batch": 4, "train_batch": 1}
    if name == "segresnet":
        from monai.networks.nets import SegResNet

        model = SegResNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, init_filters=32,
                          blocks_down=(1, 2, 2, 4, 4), blocks_up=(1, 1, 1, 1))
        return {"model": model, "grid": (1.5, 1.5, 1.5), "window": tuple(args.monai_window), "overlap": 0.4,
                "kind": "monai", "what": "MONAI SegResNet (Auto3DSeg: 32 filters, blocks 1-2-2-4-4)",
                "train_batch": 2}
    raise ValueError(name)


def run_worker(args: argparse.Namespace) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    from MedTuningLib.bench.train_bench import _max_rss_mb, _status_mb
    from MedTuningLib.data.spacing import describe, to_input_grid, to_working_grid, working_shape
    from MedTuningLib.engine.device import autocast, precision_name, resolve_device, resolve_precision
    from MedTuningLib.engine.infer import WINDOW_PADDING, auto_sw_batch_size, class_map_of, predict_probabilities

    device = resolve_device(args.device)
    volume, in_spacing = _read_volume(args)
    volume = ((volume - volume.mean()) / max(float(volume.std()), 1e-6)).astype(np.float32)[None]
    system = build_system(args, in_spacing, volume.shape[-3:])
    model = system["model"].to(device).eval()
    grid = system["grid"]
    window, overlap = system["window"], system["overlap"]
    if system["kind"] == "medtuning":
        dtype = resolve_precision(args.precision, device)
        sw_batch = auto_sw_batch_size(device)
    else:  # nnU-Net and MONAI: fp32 on CPU, fp16 autocast on a GPU
        dtype = torch.float16 if device.type == "cuda" else None
        sw_batch = system.get("sw_batch", 1)
    grid_shape = working_shape(volume.shape[-3:], in_spacing, grid) if grid else tuple(volume.shape[-3:])
    n_windows = windows_per_volume(grid_shape, window, overlap)
    n_calls = math.ceil(n_windows / sw_batch)
    calls = [0]
    t_windows = [0.0, 0.0]

    def count() -> None:
        if calls[0] == 0:
            t_windows[0] = time.perf_counter()
        calls[0] += 1
        if args.max_windows and calls[0] > args.max_windows:
            t_windows[1] = time.perf_counter()
            raise _Enough

    def window_probs(x):
        count()
        with autocast(device, dtype):
            return torch.softmax(model(x).float(), dim=1)

    # Warm-up: one window (first-call allocations and kernel selection), not timed.
    if system["kind"] == "medtuning":
        predict_probabilities(model, torch.zeros((1,) + tuple(window)), window, device, dtype)
    else:
        with torch.inference_mode(), autocast(device, dtype):
            model(torch.zeros((1, 1) + tuple(window), device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    extrapolated = False
    t0 = time.perf_counter()
    resampled = to_working_grid(volume, in_spacing, grid) if grid else volume
    t_resampled = time.perf_counter()
    image = torch.from_numpy(np.ascontiguousarray(resampled))
    try:
        if system["kind"] == "medtuning":
            probs = predict_probabilities(model, image, window, device, dtype, overlap=overlap, on_window=count,
                                          sw_batch_size=sw_batch)
        else:
            with torch.inference_mode():
                probs = sliding_window_inference(image[None].to(device), roi_size=list(window), sw_batch_size=sw_batch,
                                                 predictor=window_probs, overlap=overlap, mode="gaussian",
                                                 padding_mode=WINDOW_PADDING)[0].float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_windows[1] = time.perf_counter()
        t_back = time.perf_counter()
        back = to_input_grid(probs.numpy(), grid, in_spacing, volume.shape[-3:]) if grid else probs.numpy()
        labels = class_map_of(back)
        assert labels.shape == volume.shape[-3:]
        seconds = time.perf_counter() - t0
        back_seconds = time.perf_counter() - t_back
    except _Enough:
        # Time per forward call from the calls made, over all the calls the volume needs; the way back is timed
        # on random probabilities of the working grid's shape.
        extrapolated = True
        per_call = (t_windows[1] - t_windows[0]) / args.max_windows
        t_back = time.perf_counter()
        fake = np.random.default_rng(0).random((NUM_CLASSES,) + tuple(grid_shape), dtype=np.float32)
        back = to_input_grid(fake, grid, in_spacing, volume.shape[-3:]) if grid else fake
        class_map_of(back)
        back_seconds = time.perf_counter() - t_back
        seconds = (t_resampled - t0) + (t_windows[0] - t_resampled) + per_call * n_calls + back_seconds
    infer_peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                  else (_status_mb("VmHWM") or _max_rss_mb()))
    result = {
        "system": args.system, "what": system["what"], "device": str(device),
        "precision": precision_name(dtype), "grid_spacing_xyz": list(reversed(grid or in_spacing)),
        "grid": describe(grid) if grid else "native", "grid_shape": list(grid_shape),
        "grid_voxels": int(np.prod(grid_shape)), "input_shape": list(volume.shape[-3:]),
        "window": list(window), "overlap": describe_overlap(overlap), "windows": n_windows, "forward_calls": n_calls,
        "windows_per_call": sw_batch, "tta": False, "seconds": round(seconds, 3),
        "voxels_per_s": round(int(np.prod(grid_shape)) / seconds, 1), "extrapolated": extrapolated,
        "timed_calls": args.max_windows if extrapolated else n_calls, "resample_s": round(t_resampled - t0, 3),
        "back_s": round(back_seconds, 3), "peak_mb": round(infer_peak, 1),
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss_process",
        "parameters": int(sum(p.numel() for p in model.parameters())), "threads": torch.get_num_threads(),
    }
    if "plan" in system:
        result["plan"] = system["plan"]
    if args.train_step:
        result.update(_train_step(model, system, device, dtype))
    return result


def _train_step(model, system, device, dtype) -> dict:
    """One optimiser step on a random batch at the system's usual batch and window (after one warm-up step):
    MedTuning with its run's own step (frozen base, Adam on the tuned weights, Dice + CE); the peers fully
    trained as their pipelines do (nnU-Net: SGD momentum 0.99; MONAI: AdamW), cross-entropy + Dice."""
    import torch

    from MedTuningLib.engine.device import autocast
    from MedTuningLib.engine.train import make_loss

    batch = system["train_batch"]
    window = system["window"]
    model.train()
    tuned = [p for p in model.parameters() if p.requires_grad]
    if system["kind"] == "nnunet":
        optimizer = torch.optim.SGD(tuned, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    elif system["kind"] == "monai":
        optimizer = torch.optim.AdamW(tuned, lr=1e-4, weight_decay=1e-5)
    else:
        optimizer = torch.optim.Adam(tuned, lr=2e-3, weight_decay=1e-5, amsgrad=True)
    loss_fn = make_loss("dice_ce")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn((batch, 1) + tuple(window), generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch, 1) + tuple(window), generator=gen).to(device)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            logits = model(images)
        loss = loss_fn(logits.float(), labels)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"train_step_s": round(times[-1], 3), "train_batch": batch, "train_window": list(window),
            "tuned_parameters": int(sum(p.numel() for p in tuned))}


def _read_volume(args) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The input ``[D, H, W]`` float32 and its spacing (z, y, x): ``--image`` or a synthetic ``--size``."""
    if args.image:
        import SimpleITK as sitk

        image = sitk.ReadImage(str(args.image), sitk.sitkFloat32)
        return sitk.GetArrayFromImage(image), tuple(float(s) for s in reversed(image.GetSpacing()))
    rng = np.random.default_rng(0)
    volume = rng.normal(0.0, 1.0, tuple(args.size)).astype(np.float32)
    return volume, tuple(float(s) for s in reversed(args.input_spacing))


def _size(text: str) -> tuple[int, int, int]:
    return tuple(int(v) for v in text.lower().split("x"))  # type: ignore[return-value]


def _floats(text: str) -> tuple[float, float, float]:
    return tuple(float(v) for v in text.split(","))  # type: ignore[return-value]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m MedTuningLib.bench.peers_bench")
    p.add_argument("--system", choices=SYSTEMS, required=True)
    add_shared_options(p)
    return p.parse_args(argv)


def add_shared_options(p: argparse.ArgumentParser) -> None:
    """Options of both the worker and ``medtuning bench peers``."""
    p.add_argument("--image", default=None, help="the volume (NIfTI / NRRD); default a synthetic --size one")
    p.add_argument("--size", type=_size, default=(200, 512, 512), help="synthetic volume DxHxW")
    p.add_argument("--input-spacing", type=_floats, default=(0.72, 0.72, 1.68), help="synthetic spacing X,Y,Z mm")
    p.add_argument("--spacing", default="1.5", help="MedTuning's working spacing (auto / native / X,Y,Z mm)")
    p.add_argument("--crop", type=_size, default=(16, 128, 128), help="MedTuning's window (its training crop)")
    p.add_argument("--overlap", type=overlap_argument, default=DEFAULT_OVERLAP,
                   help=f"MedTuning's window overlap, one or D,H,W (default segment's, "
                        f"{describe_overlap(DEFAULT_OVERLAP)})")
    p.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="auto",
                   help="MedTuning's precision (as segment --precision); the peers run as their pipelines do")
    p.add_argument("--backbone", default=None)
    p.add_argument("--backbone-args", default=None)
    p.add_argument("--decoder-width", type=int, default=None)
    p.add_argument("--nnunet-patch", type=_size, default=(128, 128, 128))
    p.add_argument("--nnunet-spacing", default="plan", help="plan (nnU-Net's rule over the volume) or X,Y,Z mm")
    p.add_argument("--monai-window", type=_size, default=(96, 96, 96))
    p.add_argument("--max-windows", type=int, default=0, help="extrapolate from this many forward calls (0: all)")
    p.add_argument("--no-train-step", dest="train_step", action="store_false")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def worker_argv(args, system: str) -> list[str]:
    argv = [sys.executable, "-m", "MedTuningLib.bench.peers_bench", "--system", system, "--device", args.device,
            "--size", "x".join(map(str, args.size)), "--input-spacing", ",".join(map(str, args.input_spacing)),
            "--spacing", str(args.spacing), "--crop", "x".join(map(str, args.crop)),
            "--overlap", describe_overlap(args.overlap), "--precision", args.precision,
            "--nnunet-patch", "x".join(map(str, args.nnunet_patch)), "--nnunet-spacing", args.nnunet_spacing,
            "--monai-window", "x".join(map(str, args.monai_window)), "--max-windows", str(args.max_windows)]
    if args.image:
        argv += ["--image", str(args.image)]
    for name in ("backbone", "backbone_args", "decoder_width"):
        value = getattr(args, name, None)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    if not args.train_step:
        argv.append("--no-train-step")
    return argv


def bench_peers(args, events, cancel=None) -> dict:
    """Every system of ``--systems``, each in a fresh process; rows in the order given."""
    from MedTuningLib.bench.train_bench import run_in_subprocess
    from MedTuningLib.errors import MedTuningError

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise MedTuningError("INVALID_OPTION", f"unknown system(s) {', '.join(unknown) or '(none)'} for bench peers",
                             f"choose from {', '.join(SYSTEMS)}")
    if "nnunet" in systems:
        try:
            import dynamic_network_architectures  # noqa: F401
        except ImportError as exc:
            raise MedTuningError("BENCH_DEPENDENCY_MISSING", "the nnunet row needs dynamic_network_architectures",
                                 "pip install --no-deps dynamic_network_architectures (its networks need only "
                                 "torch), or leave nnunet out of --systems") from exc
    rows = []
    for i, system in enumerate(systems):
        events.progress("bench", i, len(systems))
        events.log(f"bench peers: {system}")
        row = run_in_subprocess(worker_argv(args, system), cancel)
        events.log(f"  {system}: {row['seconds']:.1f} s/volume on {row['grid']} ({row['grid_voxels']:,} voxels)"
                   + (" (extrapolated)" if row["extrapolated"] else ""))
        rows.append(row)
    events.progress("bench", len(systems), len(systems))
    return {"rows": rows, "config": {"image": str(args.image) if args.image else None,
                                     "size": list(rows[0]["input_shape"]) if rows else None,
                                     "medtuning_spacing": args.spacing, "medtuning_crop": list(args.crop),
                                     "max_windows": args.max_windows, "weights": "random (timing only)"}}


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run_worker(parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
