"""Training-step benchmark of one tuning method, run in a fresh process by ``medtuning bench train``.

``python -m MedTuningLib.bench.train_bench --method med_tuning --precision auto --checkpointing auto ...``
builds the model (random base weights: fine for timing), sets it up exactly as ``medtuning train`` does
for the given settings (frozen weights without gradients or optimizer state, activation checkpointing,
autocast, frozen matmul weights stored in the autocast dtype), and times ``TrainingRun._train_step`` --
the training run's own step -- on a fixed random batch. It prints one JSON line:

``{"method", "tuned", "full", "inserted", "step_s" (median of the timed steps), "steps_s" (all),
"peak_mb", "rss_imports_mb", "rss_setup_mb", "peak_rss_mb", "memory_kind", "settings"}``.

Memory. CUDA: ``peak_mb`` is ``torch.cuda.max_memory_allocated`` over the timed phase (model, optimizer
state and activations; the peak counter is reset after setup). CPU: ``peak_mb`` is the peak resident
set size over the training steps (VmHWM, reset after setup through ``/proc/self/clear_refs``) minus the
resident size right after the imports (before the model exists), so it counts the model, gradients,
optimizer state and activations but not the interpreter and libraries; both raw figures are reported.
Where the peak cannot be reset, the process-lifetime peak (``ru_maxrss``) is used and ``memory_kind``
says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m MedTuningLib.bench.train_bench")
    p.add_argument("--arch", default="vit_upernet")
    p.add_argument("--backbone", default=None)
    p.add_argument("--backbone-args", default=None, help='timm kwargs, e.g. "depth=4,embed_dim=48,num_heads=2"')
    p.add_argument("--decoder-width", type=int, default=None)
    p.add_argument("--crop", default="16x128x128")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--method", default="med_tuning")
    p.add_argument("--global-branch", default="fft", help="Med-Adapter global branch: fft, dwconv9, dwconv11, none")
    p.add_argument("--local-branch", choices=("on", "off"), default="on")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | auto (as medtuning train)")
    p.add_argument("--checkpointing", default="auto", help="on | off | auto (as medtuning train)")
    p.add_argument("--compact", default="auto",
                   help="frozen matmul weights in the autocast dtype: on | off | auto (as medtuning train: on)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run_worker(args: argparse.Namespace) -> dict:
    import torch  # noqa: F401 - the imports are part of the baseline, not of the measured memory

    import timm  # noqa: F401
    import monai  # noqa: F401

    from MedTuningLib.engine.device import precision_name, resolve_checkpointing, resolve_device, resolve_precision
    from MedTuningLib.engine.train import TrainingRun, make_loss, parse_backbone_args
    from MedTuningLib.models import AdapterConfig, ModelConfig, build_model
    from MedTuningLib.models.base import compact_frozen_weights, release_freed_memory

    device = resolve_device(args.device)
    rss_imports = _status_mb("VmRSS") or _max_rss_mb()

    d, h, w = (int(s) for s in args.crop.lower().split("x"))
    torch.manual_seed(args.seed)
    adapter = AdapterConfig(global_branch=args.global_branch, local_branch=args.local_branch == "on")
    cfg = ModelConfig(arch=args.arch, backbone=args.backbone, in_channels=args.in_channels,
                      num_classes=args.classes, img_size=h, depth=d, method=args.method, adapter=adapter,
                      backbone_kwargs=parse_backbone_args(args.backbone_args), decoder_width=args.decoder_width)
    model = build_model(cfg)
    report = model.param_report()

    # -- the training run's own setup (engine/train.py ``_run``) ----------------------------------------
    dtype = resolve_precision(args.precision, device)
    checkpointing = resolve_checkpointing(args.checkpointing, device, model)
    model.set_activation_checkpointing(checkpointing)
    model.to(device)
    compact = args.compact == "on" or (args.compact == "auto" and dtype is not None)
    compacted = compact_frozen_weights(model, dtype) if compact else 0
    tuned = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(tuned, lr=2e-3, weight_decay=1e-5, amsgrad=True)
    loss_fn = make_loss("dice_ce")
    model.train()

    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, args.in_channels, d, h, w, generator=gen)
    labels = torch.randint(0, args.classes, (args.batch, 1, d, h, w), generator=gen)
    sampler = SimpleNamespace(batch=lambda size: (images, labels))
    runner = SimpleNamespace(opts=SimpleNamespace(accumulate=1, batch=args.batch),
                             dist=SimpleNamespace(enabled=False))

    release_freed_memory()
    rss_setup = _status_mb("VmRSS") or _max_rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        memory_kind = "cuda_max_allocated"
    else:
        memory_kind = "peak_rss_minus_imports" if _reset_peak_rss() else "lifetime_max_rss_minus_imports"

    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        TrainingRun._train_step(runner, model, optimizer, sampler, loss_fn, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)

    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        peak_rss = _max_rss_mb()
    else:
        peak_rss = _status_mb("VmHWM") if memory_kind == "peak_rss_minus_imports" else None
        peak_rss = peak_rss or _max_rss_mb()
        peak_mb = peak_rss - rss_imports
    return {
        "method": args.method, "arch": args.arch, "backbone": cfg.backbone_name,
        "tuned": report["tuned"], "full": report["full"], "inserted": report["inserted"],
        "step_s": statistics.median(times), "steps_s": [round(t, 4) for t in times],
        "peak_mb": round(peak_mb, 1), "peak_rss_mb": round(peak_rss, 1), "rss_imports_mb": round(rss_imports, 1),
        "rss_setup_mb": round(rss_setup, 1), "memory_kind": memory_kind,
        "settings": {"precision": precision_name(dtype), "checkpointing": checkpointing,
                     "compact_frozen": compacted > 0, "batch": args.batch, "crop": [d, h, w],
                     "device": str(device), "threads": torch.get_num_threads(),
                     "global_branch": args.global_branch},
    }


# -- orchestration (``medtuning bench train``) ----------------------------------------------------------

# Table (a): every method under these settings. "auto" precision is the device's native low precision
# (bf16 autocast on CPUs with AMX / AVX512-BF16 and on GPUs; fp32 elsewhere); no checkpointing for anyone.
SAME_SETTINGS = {"precision": "auto", "checkpointing": "off", "compact": "auto"}
# Table (b): full fine-tuning at PyTorch defaults; every other method exactly as ``medtuning train`` runs it
# by default (--precision auto --checkpointing auto, frozen weights compacted under autocast).
FULL_DEFAULTS = {"precision": "fp32", "checkpointing": "off", "compact": "off"}
TRAIN_DEFAULTS = {"precision": "auto", "checkpointing": "auto", "compact": "auto"}


def worker_argv(args, method: str, settings: dict) -> list[str]:
    crop = "x".join(str(int(v)) for v in args.crop)
    argv = [sys.executable, "-m", "MedTuningLib.bench.train_bench", "--arch", args.arch, "--crop", crop,
            "--batch", str(args.batch), "--in-channels", str(args.in_channels), "--classes", str(args.classes),
            "--method", method, "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
            "--precision", settings["precision"], "--checkpointing", settings["checkpointing"],
            "--compact", settings["compact"]]
    if args.backbone:
        argv += ["--backbone", args.backbone]
    for name in ("backbone_args", "decoder_width", "global_branch"):
        value = getattr(args, name, None)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def run_in_subprocess(argv: list[str], cancel=None) -> dict:
    """Run one worker (no shell) and parse the one JSON line it prints."""
    import subprocess

    from MedTuningLib.errors import MedTuningError

    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.requested:
                    proc.terminate()
                    proc.wait()
                    cancel.check()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [line for line in out.splitlines() if line.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(err.strip().splitlines()[-5:])
        raise MedTuningError("INTERNAL_ERROR", f"the bench worker failed (exit {proc.returncode}): {tail}",
                             "run the worker command by hand to see the whole error: " + " ".join(argv[1:]))
    return json.loads(lines[-1])


def add_ratios(table: dict[str, dict]) -> None:
    full = table.get("full")
    for figures in table.values():
        figures["time_ratio"] = round(figures["step_s"] / full["step_s"], 3) if full else None
        figures["memory_ratio"] = round(figures["peak_mb"] / full["peak_mb"], 3) if full else None


def bench_train(args, events, cancel=None) -> dict:
    """All methods, each in a fresh process, under (a) the same settings and (b) their own defaults."""
    from MedTuningLib.errors import MedTuningError
    from MedTuningLib.models.config import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise MedTuningError("UNKNOWN_METHOD", f"unknown tuning method(s) {', '.join(unknown) or '(none)'}",
                             f"choose from {', '.join(METHODS)}")
    plan = []
    for table in ("same_settings", "defaults"):
        for method in methods:
            if table == "same_settings":
                settings = SAME_SETTINGS
            else:
                settings = FULL_DEFAULTS if method == "full" else TRAIN_DEFAULTS
            plan.append((table, method, worker_argv(args, method, settings)))
    unique = list(dict.fromkeys(tuple(argv) for _, _, argv in plan))  # identical worker command lines run once
    repeats = max(1, int(getattr(args, "repeats", 1) or 1))
    # Repeats interleave the methods (A B C A B C ...), each run in a fresh process, so a slow spell of a shared
    # machine falls on every method rather than on one; ratios are taken within a repeat, then their median.
    rounds: list[dict[str, dict]] = []
    done = 0
    for repeat in range(repeats):
        runs: dict[tuple, dict] = {}
        results: dict[str, dict] = {"same_settings": {}, "defaults": {}}
        for table, method, argv in plan:
            key = tuple(argv)
            if key not in runs:
                events.progress("bench", done, len(unique) * repeats)
                events.log(f"bench train: {method} ({table.replace('_', ' ')})"
                           + (f", repeat {repeat + 1} of {repeats}" if repeats > 1 else ""))
                runs[key] = run_in_subprocess(list(argv), cancel)
                done += 1
                r = runs[key]
                events.log(f"  {method}: {r['step_s']:.2f} s/step, peak {r['peak_mb']:.0f} MB "
                           f"({r['settings']['precision']}, checkpointing {'on' if r['settings']['checkpointing'] else 'off'})")
            results[table][method] = dict(runs[key])
        for table in results.values():
            add_ratios(table)
        rounds.append(results)
    events.progress("bench", done, done)
    return rounds[0] if repeats == 1 else combine_repeats(rounds)


def combine_repeats(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per table and method: the median of the repeats' step time, peak memory and ratios to full (each ratio
    taken within its repeat), with the ratios' spread (min, max) and every repeat's figures."""
    combined: dict[str, dict] = {}
    for table in rounds[0]:
        combined[table] = {}
        for method in rounds[0][table]:
            runs = [r[table][method] for r in rounds]
            figures = dict(runs[0])
            figures["repeats"] = len(runs)
            for key in ("step_s", "peak_mb", "time_ratio", "memory_ratio"):
                values = [run[key] for run in runs if run.get(key) is not None]
                if not values:
                    continue
                figures[key] = round(statistics.median(values), 4)
                figures[key + "_runs"] = values
                if key.endswith("ratio"):
                    figures[key + "_spread"] = [min(values), max(values)]
            combined[table][method] = figures
    return combined


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_worker(args)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
