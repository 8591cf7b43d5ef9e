"""Overlay montages: axial, coronal and sagittal slices through a region, prediction over reference.

Arrays are in SimpleITK / NumPy order ``[D, H, W]`` = ``(z, y, x)`` with spacing ``(sz, sy, sx)`` in
mm (``sitk.GetArrayFromImage`` and ``image.GetSpacing()[::-1]``). The panels are shown in the
radiological convention for an LPS-ordered volume (as DICOM and NRRD volumes usually are;
``to_lps_arrays`` turns volumes stored otherwise, e.g. RAS NIfTI, into that order first):

- axial ``image[k]``: rows = y (anterior at the top), columns = x (patient's left on the viewer's right);
- coronal ``image[:, j, :]``: rows = z (superior at the top), columns = x;
- sagittal ``image[:, :, i]``: rows = z (superior at the top), columns = y (anterior on the left).

Pixels are drawn with their physical aspect ratio, so anisotropic CT (5 mm slices) is not squashed.
The prediction is filled in the segment colour (semi-transparent), the reference is drawn as a
contour in the same colour, so misses (line without fill) and false positives (fill without line)
are both visible.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from MedTuningLib.fileio import write_bytes_atomic
from MedTuningLib.reports.colors import unit_rgb

VIEWS = ("axial", "coronal", "sagittal")
FILL_ALPHA = 0.45


def centre_of_region(mask: np.ndarray | None, shape: Sequence[int] | None = None) -> tuple[float, float, float]:
    """Centre of mass ``(z, y, x)`` of a boolean mask; the volume centre if it is empty or None."""
    if mask is not None and mask.any():
        coords = np.nonzero(mask)
        return tuple(float(c.mean()) for c in coords)  # type: ignore[return-value]
    dims = mask.shape if mask is not None else shape
    if dims is None:
        raise ValueError("centre_of_region needs a mask or a shape")
    return tuple((d - 1) / 2.0 for d in dims)  # type: ignore[return-value]


def _slice_through(mask: np.ndarray | None, axis: int, centre: float, size: int) -> int:
    """The slice index along ``axis`` nearest to ``centre`` that cuts the mask (the region may be hollow
    or curved so that its centre of mass lies outside it); the rounded centre if the mask is empty."""
    k = int(np.clip(round(centre), 0, size - 1))
    if mask is None or not mask.any():
        return k
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(mask.any(axis=other))
    return int(present[np.argmin(np.abs(present - centre))])


def _window(image: np.ndarray) -> tuple[float, float]:
    """Grey window from the 0.5–99.5 percentiles (of the non-zero voxels when the background is 0)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    sample = finite[finite != 0] if np.count_nonzero(finite) > finite.size // 10 else finite
    if sample.size > 2_000_000:  # percentiles of a subsample are as good and much cheaper
        sample = sample[:: sample.size // 1_000_000]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
        if not hi > lo:
            hi = lo + 1.0
    return float(lo), float(hi)


def to_lps_arrays(reference: "sitk.Image", *volumes: np.ndarray | None
                  ) -> tuple[list[np.ndarray | None], tuple[float, float, float]]:
    """Volumes ``[D, H, W]`` on ``reference``'s grid, reordered and flipped so that their axes run
    towards patient Left, Posterior, Superior (SimpleITK's DICOMOrient), with the matching spacing
    ``(sz, sy, sx)``: a RAS-stored NIfTI is then drawn the way DICOM / NRRD volumes are.
    ``None`` entries stay ``None``."""
    import SimpleITK as sitk

    oriented: list[np.ndarray | None] = []
    spacing = tuple(float(v) for v in reversed(reference.GetSpacing()))
    for volume in volumes:
        if volume is None:
            oriented.append(None)
            continue
        array = np.asarray(volume)
        is_mask = array.dtype == bool
        image = sitk.GetImageFromArray(array.astype(np.uint8) if is_mask else array)
        image.CopyInformation(reference)
        image = sitk.DICOMOrient(image, "LPS")
        spacing = tuple(float(v) for v in reversed(image.GetSpacing()))
        result = sitk.GetArrayFromImage(image)
        oriented.append(result.astype(bool) if is_mask else result)
    return oriented, spacing


def _views(volume: np.ndarray, k: int, j: int, i: int) -> dict[str, np.ndarray]:
    return {"axial": volume[k, :, :], "coronal": volume[:, j, :], "sagittal": volume[:, :, i]}


def region_montage(image: np.ndarray, prediction: np.ndarray | None, reference: np.ndarray | None,
                   color: Sequence[float], spacing: Sequence[float], out_png: Path, title: str = "",
                   window: tuple[float, float] | None = None, margin_mm: float | None = None,
                   dpi: int = 100, panel_inches: float = 3.2) -> dict[str, Any]:
    """Draw a region's axial / coronal / sagittal slices with the prediction and reference over the image.

    The slices pass through the centre of the reference if it has voxels, else of the prediction,
    else through the volume centre (a slice that misses a hollow region moves to the nearest one that
    cuts it).

    Args:
        image: ``[D, H, W]`` intensities (one modality).
        prediction: ``[D, H, W]`` bool mask of the model's region (None: not drawn).
        reference: ``[D, H, W]`` bool mask of the reference region, or None when there is none.
        color: the segment colour ``(r, g, b)`` in 0..1 (or 0..255).
        spacing: voxel spacing ``(sz, sy, sx)`` in mm.
        out_png: where to write the picture (atomically).
        title: heading (case and region; free text, drawn as is).
        window: grey window ``(low, high)`` in image units (e.g. ``(-160, 240)`` for abdominal CT);
            default: the 0.5–99.5 percentiles of the image.
        margin_mm: None shows whole slices; a number zooms every panel to the region's bounding box
            plus this margin (small tumours in large scans).

    Returns:
        ``{"slices": {"axial": k, "coronal": j, "sagittal": i}, "centre": (z, y, x),
        "centred_on": "reference"|"prediction"|"volume", "png": str,
        "panels": {view: (left, top, right, bottom)}, "zoom": {view: ((row0, row1), (col0, col1))} or None}``
        — ``zoom`` the shown index ranges (inclusive) when ``margin_mm`` is given; panel boxes in PNG pixel coordinates
        (origin at the top left), so a reader can crop one view.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"region_montage needs a 3D [D, H, W] image, not shape {image.shape}")
    masks = {}
    for name, mask in (("prediction", prediction), ("reference", reference)):
        if mask is not None:
            mask = np.asarray(mask).astype(bool, copy=False)
            if mask.shape != image.shape:
                raise ValueError(f"{name} shape {mask.shape} differs from the image shape {image.shape}")
        masks[name] = mask
    prediction, reference = masks["prediction"], masks["reference"]
    sz, sy, sx = (float(s) for s in spacing)
    rgb = unit_rgb(color)

    if reference is not None and reference.any():
        basis, centred_on = reference, "reference"
    elif prediction is not None and prediction.any():
        basis, centred_on = prediction, "prediction"
    else:
        basis, centred_on = None, "volume"
    centre = centre_of_region(basis, image.shape)
    k, j, i = (_slice_through(basis, axis, centre[axis], image.shape[axis]) for axis in range(3))

    lo, hi = window if window is not None else _window(image.astype(np.float32, copy=False))
    zoom = _zoom(basis, (sz, sy, sx), margin_mm) if margin_mm is not None and basis is not None else None
    grey = _views(image, k, j, i)
    pred = _views(prediction, k, j, i) if prediction is not None else {}
    ref = _views(reference, k, j, i) if reference is not None else {}
    # (aspect = physical height / width of one pixel, origin) per view
    layout = {"axial": (sy / sx, "upper"), "coronal": (sz / sx, "lower"), "sagittal": (sz / sy, "lower")}
    where = {"axial": f"axial z={k}", "coronal": f"coronal y={j}", "sagittal": f"sagittal x={i}"}

    widths = [grey[v].shape[1] for v in VIEWS]
    fig = Figure(figsize=(panel_inches * 3, panel_inches + 0.7), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [w / max(widths) for w in widths]})
    for ax, view in zip(axes, VIEWS):
        aspect, origin = layout[view]
        ax.imshow(grey[view], cmap="gray", vmin=lo, vmax=hi, origin=origin, aspect=aspect,
                  interpolation="nearest")
        if view in pred and pred[view].any():
            overlay = np.zeros(pred[view].shape + (4,), dtype=np.float32)
            overlay[pred[view]] = (*rgb, FILL_ALPHA)
            ax.imshow(overlay, origin=origin, aspect=aspect, interpolation="nearest")
        if view in ref and ref[view].any() and min(ref[view].shape) > 1:
            # contour draws Z[r, c] at (x=c, y=r), which imshow's origin already places correctly
            ax.contour(ref[view].astype(np.float32), levels=[0.5], colors=[rgb], linewidths=1.4)
        if zoom is not None:
            (r0, r1), (c0, c1) = zoom[view]
            ax.set_xlim(c0 - 0.5, c1 + 0.5)
            ax.set_ylim((r1 + 0.5, r0 - 0.5) if origin == "upper" else (r0 - 0.5, r1 + 0.5))
        ax.set_title(where[view], fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    legend = "filled: prediction" + ("   line: reference" if reference is not None else "")
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize="small")

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    width_px, height_px = canvas.get_width_height()
    panels = {}
    for ax, view in zip(axes, VIEWS):
        box = ax.get_window_extent()  # display pixels, origin bottom-left
        panels[view] = (int(round(box.x0)), int(round(height_px - box.y1)),
                        int(round(box.x1)), int(round(height_px - box.y0)))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    out_png = Path(out_png)
    write_bytes_atomic(out_png, buf.getvalue(), "report picture")
    return {"slices": {"axial": k, "coronal": j, "sagittal": i}, "centre": centre, "centred_on": centred_on,
            "png": str(out_png), "panels": panels, "size": (width_px, height_px), "zoom": zoom}


def _zoom(mask: np.ndarray, spacing: tuple[float, float, float], margin_mm: float
          ) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Per view, the (row, column) index ranges of the mask's bounding box plus ``margin_mm``."""
    ranges = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        pad = int(np.ceil(margin_mm / spacing[axis]))
        ranges.append((max(0, int(present[0]) - pad), min(mask.shape[axis] - 1, int(present[-1]) + pad)))
    z, y, x = ranges
    return {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}


def safe_name(text: str) -> str:
    """A file-name-safe slug of a case id or region name (``"Kidney tumour"`` -> ``"Kidney_tumour"``)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._")
    return slug or "unnamed"


def case_montages(folder: Path, case_id: str, image: np.ndarray, predictions: dict[str, np.ndarray],
                  references: dict[str, np.ndarray | None], colors: dict[str, Sequence[float]],
                  spacing: Sequence[float]) -> dict[str, Path]:
    """One montage per region of one case, written as ``folder/montages/<case>__<region>.png``.

    Returns ``{region: png path}`` — one entry of the ``montages`` argument of
    :func:`MedTuningLib.reports.html.write_html_report`.
    """
    out: dict[str, Path] = {}
    for region, prediction in predictions.items():
        png = Path(folder) / "montages" / f"{safe_name(case_id)}__{safe_name(region)}.png"
        region_montage(image, prediction, references.get(region), colors.get(region, (1.0, 1.0, 0.0)),
                       spacing, png, title=f"{case_id} — {region}")
        out[region] = png
    return out
