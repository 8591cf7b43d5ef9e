"""``medtuning bench train|infer|peers``: benchmark tables (docs/method.md "Testing": benchmarks print tables).

``train``: the tuning methods side by side, each in a fresh process, (a) under the same settings and
(b) each at its own defaults; ``infer``: seconds per volume of the plain fp32 sliding window against
MedTuning's tuned inference path, with the Dice difference. ``--json FILE`` writes the figures; with
``--events jsonl`` they are also the ``done`` event's outputs; in text mode the tables are printed.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path


def machine() -> dict:
    import os

    import torch

    from MedTuningLib.engine.device import cpu_supports_bf16

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_bf16": cpu_supports_bf16(), "torch": torch.__version__}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _write_json(path: Path, data: dict) -> None:
    from MedTuningLib.fileio import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data, "bench output")


def model_files(args, ctx) -> dict:
    """weights.safetensors of a med_tuning model folder against a full checkpoint."""
    from MedTuningLib.bench.model_files import model_file_sizes

    return model_file_sizes(args.arch, args.backbone, args.in_channels, args.classes)


def run(args, ctx) -> dict:
    events = ctx.events
    if args.bench_command == "train":
        from MedTuningLib.bench.tables import train_table
        from MedTuningLib.bench.train_bench import SAME_SETTINGS, bench_train

        events.start("bench", device=args.device, bench="train")
        results = bench_train(args, events, ctx.cancel)
        results["model_files"] = model_files(args, ctx)
        results["config"] = {"arch": args.arch, "backbone": args.backbone, "crop": list(args.crop),
                             "batch": args.batch, "in_channels": args.in_channels, "classes": args.classes,
                             "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                             "same_settings": dict(SAME_SETTINGS),
                             "base_weights": "random (timing only)"}
        results["machine"] = machine()
        tables = {"same_settings": train_table(results["same_settings"]), "defaults": train_table(results["defaults"])}
        if args.json:
            _write_json(args.json, results)
        if not events.jsonl:
            events.out.write("\n(a) every method under the same settings (autocast precision 'auto', no checkpointing, "
                             f"batch {args.batch}, crop {'x'.join(map(str, args.crop))})\n\n")
            events.out.write(tables["same_settings"])
            events.out.write("\n(b) each method at its own defaults (full: PyTorch defaults fp32, no checkpointing; "
                             "others: as 'medtuning train' runs them)\n\n")
            events.out.write(tables["defaults"] + "\n")
            mf = results["model_files"]
            events.out.write(f"model files ({mf['method']}, base weights from a local file): weights.safetensors "
                             f"{mf['weights_bytes'] / 2**20:.1f} MiB vs full checkpoint "
                             f"{mf['full_checkpoint_bytes'] / 2**20:.1f} MiB ({100 * mf['ratio']:.1f}%)\n")
            events.out.flush()
        return {**results, "tables": tables, "json": str(args.json) if args.json else None}

    if args.bench_command == "peers":
        return _peers(args, events, ctx.cancel)
    from MedTuningLib.bench.infer_bench import bench_infer
    from MedTuningLib.bench.tables import infer_table, variants_table

    events.start("bench", device=args.device, bench="infer")
    result = bench_infer(args, events, ctx.cancel)
    result["machine"] = machine()
    table = variants_table(result) if "variants" in result else infer_table(result)
    if args.json:
        _write_json(args.json, result)
    if not events.jsonl:
        events.out.write("\n" + table + "\n")
        if "variants" in result:
            events.out.write(f"Dice against {result['dice_against']}; differences and speed-ups against the first "
                             f"variant\n")
        else:
            events.out.write(f"Dice difference (tuned - plain, points): {result['dice_difference_points']:+.3f}; "
                             f"speed-up {result['speedup']:.2f}x\n")
        events.out.flush()
    return {**result, "table": table, "json": str(args.json) if args.json else None}


def _peers(args, events, cancel) -> dict:
    from MedTuningLib.bench.peers_bench import bench_peers
    from MedTuningLib.bench.tables import peers_table

    events.start("bench", device=args.device, bench="peers")
    result = bench_peers(args, events, cancel)
    result["machine"] = machine()
    table = peers_table(result)
    if args.json:
        _write_json(args.json, result)
    if not events.jsonl:
        load = result["machine"].get("load_avg_1m")
        events.out.write(f"\nOne volume {'x'.join(map(str, result['config']['size']))}, random weights, no TTA; "
                         f"each system on its own grid (load average {load} on {result['machine']['cores']} "
                         "cores)\n\n" + table + "\n")
        events.out.flush()
    return {**result, "table": table, "json": str(args.json) if args.json else None}
