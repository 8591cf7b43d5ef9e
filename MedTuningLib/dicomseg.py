"""Results as DICOM SEG, the form a PACS or an OHIF viewer accepts, written with highdicom.

The SEG is built on the source series that was segmented (:class:`MedTuningLib.data.dicom.DicomSeries`):
one frame per source slice and segment, each frame referencing its source instance, so the SEG
shares the series' frame of reference, orientation, pixel spacing and slice positions exactly. Each
segment carries the model's label, colour (as CIELab) and terminology codes (SNOMED CT where the
preset has them; the MedTuning private scheme ``99MEDTUNING`` for the BraTS evaluation regions), and
the algorithm identification: MedTuning, its version, the model's name and base weights.

``binary`` writes the result masks; ``fractional`` writes the model's probability of each segment
(0..255 for 0..1), for viewers and studies that threshold themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from MedTuningLib import __version__
from MedTuningLib.errors import MedTuningError
from MedTuningLib.fileio import atomic_path

SEG_TYPES = ("binary", "fractional")


def _concept(triple: Sequence[str] | None):
    """A highdicom coded concept from Slicer's terminology triple [scheme, value, meaning]."""
    from highdicom.sr.coding import CodedConcept

    if not triple or len(triple) < 3 or not all(str(v).strip() for v in triple[:3]):
        return None
    scheme, value, meaning = (str(v).strip() for v in triple[:3])
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])


def model_identification(manifest: Mapping[str, Any], model_name: str) -> dict[str, str]:
    """Algorithm parameters recorded with every segment: the model and the base weights it was tuned on."""
    base = manifest.get("base_weights") or {}
    if not isinstance(base, dict) or base.get("source") == "none":
        weights = "none (not pretrained)"
    else:
        weights = str(base.get("id") or base.get("path") or base.get("source") or "unknown")
        if base.get("sha256"):
            weights += f" sha256:{str(base['sha256'])[:16]}"
    arch = manifest.get("architecture") if isinstance(manifest.get("architecture"), dict) else {}
    params = {"model": model_name, "base_weights": weights}
    for key, name in (("arch", "architecture"), ("backbone", "backbone"), ("method", "method")):
        if arch.get(key):
            params[name] = str(arch[key])
    return {k: v[:64] for k, v in params.items()}


def segment_descriptions(names: Sequence[str], scheme, parameters: Mapping[str, str]) -> list[Any]:
    """One highdicom SegmentDescription per segment, numbered from 1 in ``names`` order."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from MedTuningLib.data.labels import GENERIC_TERMINOLOGY

    algorithm = hd.AlgorithmIdentificationSequence(name="MedTuning", family=codes.cid7162.ArtificialIntelligence,
                                                   version=__version__, parameters=dict(parameters))
    out = []
    for number, name in enumerate(names, start=1):
        definition = scheme.segment(name) if scheme is not None else None
        terminology = dict(definition.terminology) if definition is not None else dict(GENERIC_TERMINOLOGY)
        category = _concept(terminology.get("category")) or _concept(GENERIC_TERMINOLOGY.get("category"))
        kind = _concept(terminology.get("type")) or _concept(GENERIC_TERMINOLOGY.get("type"))
        region = _concept(terminology.get("anatomicRegion"))
        color = None
        if definition is not None and len(definition.color) >= 3:
            rgb = [255.0 * min(1.0, max(0.0, float(v))) for v in definition.color[:3]]  # highdicom takes 0..255
            color = hd.color.CIELabColor.from_rgb(*rgb)
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(name)[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=hd.UID(), tracking_id=str(name)[:64],
            anatomic_regions=[region] if region is not None else None, display_color=color)
        modifier = _concept(terminology.get("typeModifier"))
        if modifier is not None:  # e.g. Right / Left: part of the segmented property type
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        out.append(description)
    return out


def write_dicom_seg(path: Path, masks: Mapping[str, np.ndarray], source, scheme=None,
                    manifest: Mapping[str, Any] | None = None, model_name: str = "", seg_type: str = "binary",
                    probabilities: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Write ``masks`` (bool [D, H, W] on the source series' grid, by segment name) as a DICOM SEG.

    ``source`` is the :class:`~MedTuningLib.data.dicom.DicomSeries` the volume was read from (slice k of
    the masks is its ``headers[k]``). ``fractional`` needs ``probabilities`` (float [D, H, W] in 0..1 per
    segment). Returns a summary (UIDs, segment numbers) for the command's outputs.
    """
    import highdicom as hd

    if seg_type not in SEG_TYPES:
        raise MedTuningError("INVALID_OPTION", f"--seg-type {seg_type!r} is not one of {', '.join(SEG_TYPES)}",
                             "use --seg-type binary or fractional")
    names = list(masks)
    shape = (len(source.headers), int(source.headers[0].Rows), int(source.headers[0].Columns))
    if seg_type == "fractional":
        if probabilities is None:
            raise ValueError("a fractional DICOM SEG needs the probabilities")
        pixels = np.stack([np.clip(np.asarray(probabilities[n], dtype=np.float32), 0.0, 1.0) for n in names], axis=-1)
        kind = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixels = np.stack([np.asarray(masks[n], dtype=bool) for n in names], axis=-1).astype(np.uint8)
        kind = hd.seg.SegmentationTypeValues.BINARY
    if pixels.shape[:3] != shape:
        raise ValueError(f"masks of shape {pixels.shape[:3]} do not fit the source series {shape}")
    manifest = dict(manifest or {})
    parameters = model_identification(manifest, model_name or "model")
    first = source.headers[0]
    try:
        number = int(first.get("SeriesNumber", 0) or 0) + 1000
    except (TypeError, ValueError):
        number = 1000
    try:
        seg = hd.seg.Segmentation(
            source_images=list(source.headers), pixel_array=pixels, segmentation_type=kind,
            segment_descriptions=segment_descriptions(names, scheme, parameters),
            series_instance_uid=hd.UID(), series_number=number, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="MedTuning", manufacturer_model_name=(model_name or "MedTuning model")[:64],
            software_versions=f"MedTuning {__version__}", device_serial_number="not applicable",
            content_description="MedTuning automatic segmentation"[:64], content_label="MEDTUNING",
            content_creator_name="MedTuning^",  # a person-name value: one component omit_empty_frames=bool(pixels.any()),
            max_fractional_value=255)
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise MedTuningError("DICOM_SOURCE_INCOMPLETE", f"a DICOM SEG cannot be built on the series "
                             f"{source.info.uid}: {str(exc)[:300]}",
                             "write the result as .seg.nrrd (without --dicom-seg), or re-export the series "
                             "with its full DICOM header from the PACS", series=source.info.uid) from exc
    seg.SeriesDescription = f"MedTuning {model_name}"[:64] if model_name else "MedTuning segmentation"
    if not all(text.isascii() for text in [model_name, *names, *parameters.values()]):
        # Text the source's character set may not hold (a model "modèle", segment names in any script):
        # UTF-8 for the whole SEG; values copied from the source were decoded and are re-encoded.
        seg.SpecificCharacterSet = "ISO_IR 192"
    with atomic_path(Path(path), "DICOM SEG") as tmp:
        seg.save_as(str(tmp))
    return {"dicom_seg": str(path), "series_instance_uid": str(seg.SeriesInstanceUID),
            "sop_instance_uid": str(seg.SOPInstanceUID), "segmentation_type": seg_type,
            "referenced_series_instance_uid": source.info.uid,
            "segments": {n: i for i, n in enumerate(names, start=1)}}


def is_dicom_seg(path: Path) -> bool:
    """A DICOM file whose Modality is SEG."""
    from MedTuningLib.data.dicom import is_dicom_file

    path = Path(path)
    if not path.is_file() or not is_dicom_file(path):
        return False
    import pydicom

    try:
        return str(pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["Modality"]).get(
            "Modality", "")) == "SEG"
    except Exception:
        return False


def _triple(item) -> list[str]:
    return [str(item.CodingSchemeDesignator), str(item.CodeValue), str(item.CodeMeaning)]


def seg_to_seg_nrrd(path: Path, source, out: Path, log=None) -> Path:
    """A DICOM SEG drawn on ``source`` (a :class:`~MedTuningLib.data.dicom.DicomSeries`) as a .seg.nrrd
    on the series' grid, with the SEG's segment labels, colours and codes (for ``cases add --label``:
    a correction made in a PACS viewer). The SEG's frames are placed by the source instances they
    reference; a SEG of another series is LABEL_GRID_MISMATCH."""
    import highdicom as hd
    import SimpleITK as sitk

    from MedTuningLib.data.labels import SegmentDef
    from MedTuningLib.segio import write_segmentation

    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:
        raise MedTuningError("FILE_UNREADABLE", f"the DICOM SEG {path} cannot be read ({str(exc)[:200]})",
                             "export the segmentation again as DICOM SEG", path=str(path)) from exc
    referenced = [str(r.SeriesInstanceUID) for r in seg.get("ReferencedSeriesSequence", [])]
    if source.info.uid not in referenced:
        raise MedTuningError("LABEL_GRID_MISMATCH", f"the DICOM SEG {Path(path).name} was drawn on the series "
                             f"{', '.join(referenced) or '(none named)'}, not on the image's series {source.info.uid}",
                             "give the SEG made on this series, or the series it was made on as --image",
                             path=str(path))
    numbers = list(seg.get_segment_numbers())
    try:
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=source.sop_instance_uids,
                                                   segment_numbers=numbers, combine_segments=False,
                                                   dtype=np.float32)
    except (ValueError, KeyError) as exc:
        raise MedTuningError("LABEL_GRID_MISMATCH", f"the DICOM SEG {Path(path).name} does not fit the slices of "
                             f"series {source.info.uid} ({str(exc)[:200]})",
                             "give the SEG made on this series", path=str(path)) from exc
    if str(seg.SegmentationType) == "FRACTIONAL" and log is not None:
        log(f"{Path(path).name} is a fractional SEG: voxels of probability >= 0.5 are taken as the segment")
    masks, segments = {}, []
    for index, number in enumerate(numbers):
        desc = seg.get_segment_description(number)
        name = str(desc.segment_label) or f"Segment {number}"
        terminology: dict[str, Any] = {"category": _triple(desc.SegmentedPropertyCategoryCodeSequence[0]),
                                       "type": _triple(desc.SegmentedPropertyTypeCodeSequence[0])}
        modifier = desc.SegmentedPropertyTypeCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence")
        if modifier:
            terminology["typeModifier"] = _triple(modifier[0])
        if desc.get("AnatomicRegionSequence"):
            terminology["anatomicRegion"] = _triple(desc.AnatomicRegionSequence[0])
        color = (0.5, 0.5, 0.5)
        if "RecommendedDisplayCIELabValue" in desc:
            rgb = hd.color.CIELabColor.from_dicom_value(desc.RecommendedDisplayCIELabValue).to_rgb()
            color = tuple(round(float(v) / 255.0, 6) for v in rgb)
        masks[name] = pixels[..., index] >= 0.5
        segments.append(SegmentDef(name, color, terminology))  # type: ignore[arg-type]
    reference = sitk.Image(int(source.headers[0].Columns), int(source.headers[0].Rows), len(source.headers),
                           sitk.sitkUInt8)  # the series' grid; its voxels are not needed
    reference.SetOrigin(source.origin)
    reference.SetSpacing(source.spacing)
    reference.SetDirection(source.direction)

    class _Scheme:  # the names, colours and codes of the SEG's own segments
        pass

    scheme = _Scheme()
    scheme.segments = segments  # type: ignore[attr-defined]
    write_segmentation(Path(out), masks, reference, scheme,
                       header={"MedTuning_SourceDicomSeg": str(seg.SOPInstanceUID),
                               "MedTuning_SourceSeriesInstanceUID": source.info.uid})
    return Path(out)
