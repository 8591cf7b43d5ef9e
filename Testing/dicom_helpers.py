"""Real DICOM series for the tests: a volume written slice by slice as CT Image Storage with pydicom.

Each slice is a complete single-frame CT instance (patient, study, series, frame of reference,
equipment, image plane and pixel modules) with its own SOPInstanceUID, ImagePositionPatient from
the volume's geometry, and HU stored as signed values with a rescale intercept of -1024, as many scanners do.
``modify(k, ds)`` lets a test damage one slice (a tilt, another orientation) before it is saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def ctchest_image() -> sitk.Image:
    import slicerio

    return sitk.ReadImage(str(Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"))


def write_series(image: sitk.Image, folder: Path, series_uid: Optional[str] = None, study_uid: Optional[str] = None,
                 frame_uid: Optional[str] = None, description: str = "CT chest", series_number: int = 2,
                 modality: str = "CT", modify: Optional[Callable[[int, object], None]] = None,
                 skip: tuple[int, ...] = (), prefix: str = "IM") -> dict:
    """Write ``image`` as one DICOM series into ``folder``; returns its UIDs and the files written."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    array = sitk.GetArrayFromImage(image)  # [k, j, i]
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = image.GetSpacing()
    stored = np.clip(np.rint(array) + 1024, -32768, 32767).astype(np.int16)  # HU = stored - 1024
    files, sop_uids = [], []
    for k in range(array.shape[0]):
        if k in skip:
            continue
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        sop_uid = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{prefix}{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.PatientName = "Test^Chest"
        ds.PatientID = "MT-0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20250102"
        ds.StudyTime = "101500"
        ds.StudyID = "1"
        ds.AccessionNumber = "A0001"
        ds.ReferringPhysicianName = ""
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.Modality = modality
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "MedTuning tests"
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:.10g}", f"{spacing[0]:.10g}"]
        ds.SliceThickness = f"{spacing[2]:.6g}"
        ds.SliceLocation = f"{position[2]:.6f}"
        ds.KVP = "120"
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1  # signed, as many CT scanners write
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = stored[k].tobytes()
        if modify is not None:
            modify(k, ds)
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
        sop_uids.append(sop_uid)
    return {"series_uid": series_uid, "study_uid": study_uid, "frame_uid": frame_uid, "files": files,
            "sop_uids": sop_uids}
