"""``medtuning demo``: the whole workflow on the one real labelled scan every install has.

slicerio ships a chest CT written by 3D Slicer (``CTChest4.nrrd``, 128 x 128 x 34, 10 mm slices)
with a segmentation drawn in Slicer (``Segmentation.seg.nrrd``). The demo

1. splits the scan into a training slab (the first 70% of the slices, from the inferior end) and a
   held-out slab (the remaining, superior slices with the lung apices), as real files in a case library;
2. tunes Med-Adapters on a CPU-sized ViT with a U-Net style decoder to segment the right and left lung;
3. segments the whole scan into ``CTChest4.seg.nrrd`` (open it in 3D Slicer over ``CTChest4.nrrd``);
4. reports Dice on the held-out slab and on the whole volume (which includes the training slices),
   each named as such, and whether pretrained weights were available.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from MedTuningLib.cancel import CancelToken
from MedTuningLib.errors import MedTuningError
from MedTuningLib.events import EventStream
from MedTuningLib.fileio import (check_output_folder, ensure_writable_dir, replace_dir, write_bytes_atomic,
                                 write_json_atomic)

DEMO_SEGMENTS = ["right lung", "left lung"]
# Fraction of the slices, in slice order (from the inferior end), used for training; the rest is held out.
TRAIN_FRACTION = 0.7


@dataclass(frozen=True)
class DemoConfig:
    """A CPU-sized configuration: trains in a few minutes on two cores."""

    # A 4-block ViT-Tiny (width 192) with 8-pixel patches and the U-Net style decoder, whose
    # full-resolution stem keeps lung borders sharp at 3 mm pixels.
    arch: str = "vit_unet"
    backbone: str = "vit_tiny_patch16_224"
    backbone_args: str = "depth=4,patch_size=8"
    decoder_width: int = 16
    crop: tuple[int, int, int] = (8, 128, 128)
    batch: int = 2
    # A ceiling only: the time budget decides, planned from steady-state epochs (engine/budget.py), so the
    # demo trains until about its budget on any machine (about 120 epochs on two shared CPU cores).
    epochs: int = 400
    steps_per_epoch: int = 4
    lr: float = 2e-3
    minutes: float = 7.0


def slicerio_sample() -> tuple[Path, Path]:
    import slicerio

    folder = Path(slicerio.__file__).parent / "data"
    image, segmentation = folder / "CTChest4.nrrd", folder / "Segmentation.seg.nrrd"
    if not image.is_file() or not segmentation.is_file():
        raise MedTuningError("FILE_NOT_FOUND", f"slicerio's sample data is missing from {folder}",
                             "reinstall slicerio (pip install --force-reinstall slicerio)")
    return image, segmentation


def choose_weights(requested: str, backbone: str, events: EventStream) -> str:
    """``auto``: the pretrained backbone when it is in the local Hugging Face cache, else none."""
    if requested != "auto":
        return requested
    from MedTuningLib.models.weights import cached_hub_file
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(backbone)
    if cached_hub_file(backbone) is not None:
        return "hub"
    events.log(f"pretrained weights for {backbone} ({getattr(cfg, 'hf_hub_id', None) or 'no hub id'}) are not in the "
               "local Hugging Face cache; the demo tunes on a random, NOT pretrained backbone "
               "(pass --weights hub to download them, or --weights FILE)", level="warning")
    return "none"


def make_demo_library(work: Path, events: EventStream) -> dict:
    """Write the slabs as real files and add them to two case libraries (slab split, whole volume)."""
    import SimpleITK as sitk

    from MedTuningLib.cases import CaseLibrary
    from MedTuningLib.data.io import read_label
    from MedTuningLib.data.labels import scheme_from_segmentations
    from MedTuningLib.segio import write_segmentation

    image_path, seg_path = slicerio_sample()
    image = sitk.ReadImage(str(image_path))
    scheme = scheme_from_segmentations([seg_path], names=DEMO_SEGMENTS)
    classes = read_label(seg_path, image, scheme)
    depth = image.GetSize()[2]
    cut = int(round(depth * TRAIN_FRACTION))  # slices [0, cut) train, [cut, depth) held out
    source = ensure_writable_dir(work / "source", "demo")
    slabs = {"chest-train-slab": (0, cut), "chest-held-out-slab": (cut, depth)}
    library = CaseLibrary(work / "library")
    for case_id, (z0, z1) in slabs.items():
        slab = image[:, :, z0:z1]
        slab_image = source / f"{case_id}.nrrd"
        sitk.WriteImage(slab, str(slab_image), True)
        slab_label = source / f"{case_id}.seg.nrrd"
        write_segmentation(slab_label, scheme.output_masks(classes[z0:z1]), slab, scheme)
        library.add([slab_image], slab_label, modalities=["CT"], split="train" if case_id == "chest-train-slab" else "test",
                     case_id=case_id, source=f"slicerio CTChest4 slices {z0}-{z1 - 1}")
    whole = CaseLibrary(work / "library-whole")
    whole.add([image_path], seg_path, modalities=["CT"], split="test", case_id="chest-whole",
              source="slicerio CTChest4 (all slices)")
    events.log(f"demo library: training slab slices 0-{cut - 1}, held-out slab slices {cut}-{depth - 1}")
    return {"image": image_path, "segmentation": seg_path, "train_slices": [0, cut - 1],
            "test_slices": [cut, depth - 1]}


def run_demo(out: Path, events: EventStream, cancel: CancelToken, weights: str = "auto", device: str = "auto",
             minutes: float | None = None, seed: int = 0, force: bool = False,
             config: DemoConfig = DemoConfig()) -> dict:
    from MedTuningLib.engine.device import resolve_device
    from MedTuningLib.engine.evaluate import evaluate_model
    from MedTuningLib.engine.infer import segment_images
    from MedTuningLib.engine.modelfolder import load_model_folder
    from MedTuningLib.engine.train import TrainingRun, TrainOptions, parse_backbone_args
    from MedTuningLib.segio import write_segmentation

    t0 = time.monotonic()
    out = Path(out).absolute()
    torch_device = resolve_device(device)
    events.start("demo", device=str(torch_device))
    check_output_folder(out, "demo", force)  # --force replaces only an earlier demo output
    work = out.with_name(out.name + ".partial")
    if work.exists():
        check_output_folder(work, "demo-partial", True, option="the demo's working folder")
        shutil.rmtree(work)  # a killed earlier demo: its files are all regenerated
    ensure_writable_dir(work, "demo")

    sample = make_demo_library(work, events)
    weights = choose_weights(weights, config.backbone, events)
    options = TrainOptions(
        library=work / "library", out=work / "model", task="custom", segments=list(DEMO_SEGMENTS),
        arch=config.arch, backbone=config.backbone, backbone_kwargs=parse_backbone_args(config.backbone_args),
        decoder_width=config.decoder_width, method="med_tuning", weights=weights, crop=config.crop,
        batch=config.batch, epochs=config.epochs, steps_per_epoch=config.steps_per_epoch, lr=config.lr,
        minutes=minutes if minutes is not None else config.minutes, device=device, seed=seed, val_every=5)
    run = TrainingRun(options, events, cancel, command="demo")
    run.events = _NoStart(events)  # the demo already announced itself
    trained = run.run()
    model_dir = Path(trained["model"])

    loaded = load_model_folder(model_dir, torch_device)
    result = segment_images(loaded, [sample["image"]], torch_device, None, log=events.log)
    seg_out = work / "CTChest4.seg.nrrd"
    write_segmentation(seg_out, result.masks, result.reference, loaded.scheme)

    held_out = evaluate_model(model_dir, work / "library", split="test", device=device, events=events,
                              report_dir=work / "report-held-out-slab",
                              protocol=f"held-out slab: slices {sample['test_slices'][0]}-{sample['test_slices'][1]} "
                                       "of CTChest4, never seen in training")
    whole = evaluate_model(model_dir, work / "library-whole", split="test", device=device, events=events,
                           report_dir=work / "report-whole-volume",
                           protocol="whole volume: all 34 slices, including the training slab (not held out)")
    pretrained = bool(loaded.manifest.get("pretrained"))
    summary = {
        "data": "CTChest4.nrrd + Segmentation.seg.nrrd shipped with slicerio (chest CT written by 3D Slicer)",
        "segments": DEMO_SEGMENTS, "pretrained": pretrained,
        "base_weights": loaded.manifest["base_weights"], "train_slices": sample["train_slices"],
        "held_out_slices": sample["test_slices"],
        "dice_held_out_slab": {r: held_out["summary"][f"dice/{r}"]["mean"] for r in DEMO_SEGMENTS},
        "dice_whole_volume": {r: whole["summary"][f"dice/{r}"]["mean"] for r in DEMO_SEGMENTS},
        "training": loaded.manifest["training"], "parameters": loaded.manifest["parameters"],
        "seconds": round(time.monotonic() - t0, 1),
    }
    write_json_atomic(work / "demo-report.json", summary, "demo")
    write_bytes_atomic(work / "demo-report.md", demo_markdown(summary, config).encode("utf-8"), "demo")
    for region in DEMO_SEGMENTS:
        events.metric("evaluate", f"dice/{region}", summary["dice_held_out_slab"][region], protocol="held-out slab")
        events.metric("evaluate", f"dice/{region}", summary["dice_whole_volume"][region], protocol="whole volume")
    check_output_folder(out, "demo", force)  # again: the folder may have changed during the run
    replace_dir(work, out)
    if not events.jsonl:
        events.out.write((out / "demo-report.md").read_text(encoding="utf-8"))
    return {"model": str(out / "model"), "segmentation": str(out / "CTChest4.seg.nrrd"),
            "report": str(out / "demo-report.md"), "pretrained": pretrained,
            "dice_held_out_slab": summary["dice_held_out_slab"], "dice_whole_volume": summary["dice_whole_volume"]}


def demo_markdown(summary: dict, config: DemoConfig) -> str:
    training = summary["training"]
    params = summary["parameters"]
    pretrained = ("yes: " + str(summary["base_weights"].get("id"))) if summary["pretrained"] else \
        "no — pretrained weights were not available, the backbone is random and frozen (not pretrained)"
    lines = [
        "# MedTuning demo", "",
        f"Data: {summary['data']}. Segments: {', '.join(summary['segments'])}.", "",
        f"Model: {config.arch} with {config.backbone} ({config.backbone_args}), Med-Tuning; "
        f"{params.get('tuned', 0):,} tuned of {params.get('full', 0):,} parameters "
        f"({params.get('inserted', 0):,} inserted). Pretrained base weights: {pretrained}.", "",
        f"Training: {training['epochs']} epochs in {training['seconds']:.0f} s on {training['device']} "
        f"(slices {summary['train_slices'][0]}–{summary['train_slices'][1]}).", "",
        "| protocol | " + " | ".join(f"Dice {s}" for s in summary["segments"]) + " |",
        "|---" * (1 + len(summary["segments"])) + "|",
        f"| held-out slab (slices {summary['held_out_slices'][0]}–{summary['held_out_slices'][1]}, not seen in "
        "training) | " + " | ".join(f"{summary['dice_held_out_slab'][s]:.3f}" for s in summary["segments"]) + " |",
        "| whole volume (includes the training slices) | "
        + " | ".join(f"{summary['dice_whole_volume'][s]:.3f}" for s in summary["segments"]) + " |", "",
        "Open `CTChest4.seg.nrrd` in 3D Slicer over slicerio's `CTChest4.nrrd`; reports with overlay pictures are in "
        "`report-held-out-slab/report.html` and `report-whole-volume/report.html`.", "",
    ]
    return "\n".join(lines)


class _NoStart:
    """Forwards events, dropping a second ``start`` (the training run inside the demo announces itself)."""

    def __init__(self, events: EventStream) -> None:
        self._events = events

    def start(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name: str):
        return getattr(self._events, name)
