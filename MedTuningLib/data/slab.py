"""Cutting a slab of slices out of a case (for held-out-slab protocols on single-volume data sets).

A slab keeps the physical geometry: SimpleITK's slicing moves the origin, so the slab lies exactly
where its slices lay in the full volume. Labelmaps are cut the same way; a .seg.nrrd is placed on the
image grid first (cropped extents, layers) and written back as a .seg.nrrd with the same segment
names, colours and terminology.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import SimpleITK as sitk

from MedTuningLib.errors import MedTuningError


def parse_slices(text: str, depth: int) -> tuple[int, int]:
    """``"A:B"`` (Python slice of the slice axis, end exclusive, negative from the end) -> (start, stop)."""
    start_text, sep, stop_text = text.partition(":")
    try:
        if not sep:
            raise ValueError
        start, stop, _ = slice(int(start_text) if start_text.strip() else None,
                               int(stop_text) if stop_text.strip() else None).indices(depth)
    except ValueError:
        raise MedTuningError("INVALID_OPTION", f"--slices {text!r} is not START:STOP",
                             "give a slice range such as 0:24 (end excluded) or 24: (to the end)") from None
    if stop - start < 1:
        raise MedTuningError("INVALID_OPTION", f"--slices {text!r} selects no slice of a volume of {depth} slices",
                             f"choose a range inside 0:{depth}")
    return start, stop


def write_slab(images: Sequence[Path], label: Path | None, slices: str,
               folder: Path) -> tuple[list[Path], Path | None, tuple[int, int]]:
    """Write slices ``slices`` of every image and of the label (None: an unlabelled scan) into ``folder``;
    return the new paths."""
    from MedTuningLib.data.io import is_segmentation_file, read_segments, read_sitk
    from MedTuningLib.segio import write_segmentation

    folder.mkdir(parents=True, exist_ok=True)
    first = read_sitk(Path(images[0]))
    start, stop = parse_slices(slices, first.GetSize()[2])
    out_images = []
    for index, path in enumerate(images):
        image = first if index == 0 else read_sitk(Path(path))
        if image.GetSize()[2] != first.GetSize()[2]:
            raise MedTuningError("MODALITY_GRID_MISMATCH", f"{path} has {image.GetSize()[2]} slices, {images[0]} "
                                 f"{first.GetSize()[2]}", "--slices needs modalities on the same grid")
        target = folder / f"image{index}.nrrd"
        sitk.WriteImage(image[:, :, start:stop], str(target), True)
        out_images.append(target)
    slab_reference = first[:, :, start:stop]
    if label is None:
        return out_images, None, (start, stop)
    if is_segmentation_file(Path(label)):
        segments = read_segments(Path(label), first)
        target = folder / "label.seg.nrrd"
        masks = {s.name: s.mask[start:stop] for s in segments}
        write_segmentation(target, masks, slab_reference, SimpleNamespace(segments=segments))
    else:
        label_image = read_sitk(Path(label), "label")
        if label_image.GetSize() != first.GetSize():
            raise MedTuningError("LABEL_GRID_MISMATCH", f"{label} has size {label_image.GetSize()}, the image "
                                 f"{first.GetSize()}", "use the label drawn on this image")
        target = folder / ("label" + (".nii.gz" if str(label).endswith(".gz") else ".nrrd"))
        sitk.WriteImage(label_image[:, :, start:stop], str(target), True)
    return out_images, target, (start, stop)
