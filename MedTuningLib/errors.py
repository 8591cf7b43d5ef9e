"""The one catalogue of MedTuning error codes.

Every failure a user can meet is a :class:`MedTuningError` with a stable ``code`` from
:data:`CATALOGUE`, a message that says what is wrong and a hint that says what to do. The CLI turns
it into an ``error`` event and the exit status the code belongs to. Codes are part of the public
contract (the Slicer module and scripts match on them): add new ones, never rename or reuse one.
The README's error table is generated from this catalogue (``medtuning info --errors``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Exit statuses (docs/method.md): 0 done, 2 bad usage or bad input, 3 failure while running, 130 cancelled.
EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 3
EXIT_CANCELLED = 130


@dataclass(frozen=True)
class ErrorKind:
    exit_status: int
    summary: str


CATALOGUE: dict[str, ErrorKind] = {
    # --- usage -------------------------------------------------------------------------------
    "USAGE": ErrorKind(EXIT_BAD_INPUT, "The command line is malformed (unknown option, missing value)."),
    "INVALID_OPTION": ErrorKind(EXIT_BAD_INPUT, "An option has a value outside what it accepts."),
    "NOT_IMPLEMENTED": ErrorKind(EXIT_FAILURE, "This sub-command is not available in this build."),
    "UNKNOWN_ARCH": ErrorKind(EXIT_BAD_INPUT, "The architecture name is not one MedTuning builds."),
    "UNKNOWN_METHOD": ErrorKind(EXIT_BAD_INPUT, "The tuning method name is not one MedTuning knows."),
    "UNKNOWN_BACKBONE": ErrorKind(EXIT_BAD_INPUT, "The timm backbone name does not fit the architecture."),
    "DEVICE_UNAVAILABLE": ErrorKind(EXIT_BAD_INPUT, "The requested device (e.g. cuda) is not present."),
    # --- input files -------------------------------------------------------------------------
    "FILE_NOT_FOUND": ErrorKind(EXIT_BAD_INPUT, "An input file or folder does not exist."),
    "FILE_UNREADABLE": ErrorKind(EXIT_BAD_INPUT, "An input file is truncated, corrupt or not an image."),
    "IMAGE_DIMENSION": ErrorKind(EXIT_BAD_INPUT, "An image is not a 3D scalar volume (2D, 4D or vector)."),
    "NON_FINITE_VOXELS": ErrorKind(EXIT_BAD_INPUT, "An image holds NaN or infinite voxel values."),
    "CONSTANT_IMAGE": ErrorKind(EXIT_BAD_INPUT, "An image has the same value everywhere."),
    "EXTREME_ANISOTROPY": ErrorKind(EXIT_BAD_INPUT, "Voxel spacing differs too much between axes."),
    "LABEL_GRID_MISMATCH": ErrorKind(EXIT_BAD_INPUT, "Image and label do not share a voxel grid."),
    "MODALITY_GRID_MISMATCH": ErrorKind(EXIT_BAD_INPUT, "Modalities of one case do not overlap in space."),
    "MODALITY_COUNT_MISMATCH": ErrorKind(EXIT_BAD_INPUT, "The number of images differs from the model's modalities."),
    "UNKNOWN_LABEL_VALUES": ErrorKind(EXIT_BAD_INPUT, "A label holds values the label scheme does not define."),
    "EMPTY_LABEL": ErrorKind(EXIT_BAD_INPUT, "A label has no foreground voxels."),
    "LABEL_SPEC_INVALID": ErrorKind(EXIT_BAD_INPUT, "The --labels mapping cannot be parsed or is inconsistent."),
    "SEGMENT_NAMES_MISMATCH": ErrorKind(EXIT_BAD_INPUT, "Segment names differ between cases of a custom task."),
    "VOLUME_TOO_SMALL": ErrorKind(EXIT_BAD_INPUT, "A volume is too small to be processed."),
    "IMAGE_GRID_SHEARED": ErrorKind(EXIT_BAD_INPUT, "An image's voxel axes are not perpendicular (a sheared grid)."),
    "IMAGE_GEOMETRY_AMBIGUOUS": ErrorKind(EXIT_BAD_INPUT, "A NIfTI file's qform and sform place the volume differently."),
    # --- DICOM input and output (issue 14) ---------------------------------------------------
    "DICOM_MULTIPLE_SERIES": ErrorKind(EXIT_BAD_INPUT, "A DICOM folder holds several image series; --series UID picks one."),
    "DICOM_SERIES_NOT_FOUND": ErrorKind(EXIT_BAD_INPUT, "No series with the --series UID is in the DICOM folder(s)."),
    "DICOM_MISSING_SLICES": ErrorKind(EXIT_BAD_INPUT, "A DICOM series has gaps: slices are missing."),
    "DICOM_UNEVEN_SPACING": ErrorKind(EXIT_BAD_INPUT, "A DICOM series has unevenly spaced slices."),
    "DICOM_MIXED_ORIENTATION": ErrorKind(EXIT_BAD_INPUT, "The slices of a DICOM series have different orientations."),
    "DICOM_GANTRY_TILT": ErrorKind(EXIT_BAD_INPUT, "A DICOM series was acquired with a gantry tilt (sheared slices)."),
    "DICOM_SERIES_INCONSISTENT": ErrorKind(EXIT_BAD_INPUT, "DICOM slices differ in size or spacing, lack positions, or repeat one."),
    "DICOM_SERIES_UNSUPPORTED": ErrorKind(EXIT_BAD_INPUT, "A DICOM series is stored in a form MedTuning does not read (multi-frame)."),
    "DICOM_SOURCE_INCOMPLETE": ErrorKind(EXIT_BAD_INPUT, "The source series lacks attributes a DICOM SEG must copy."),
    # --- batch segmentation (issue 14) -------------------------------------------------------
    "BATCH_LIST_INVALID": ErrorKind(EXIT_BAD_INPUT, "The --batch-list CSV or folder cannot be read or lacks columns."),
    "BATCH_INCOMPLETE": ErrorKind(EXIT_FAILURE, "Some scans of a batch failed; the others were segmented."),
    # --- browser app: medtuning web (issue 12) -----------------------------------------------
    "WEB_UNAVAILABLE": ErrorKind(EXIT_BAD_INPUT, "The browser app's packages (trame-slicer) are not installed."),
    "WEB_PORT_IN_USE": ErrorKind(EXIT_BAD_INPUT, "The port for 'medtuning web' is taken by another program."),
    "WEB_TOKEN_REQUIRED": ErrorKind(EXIT_BAD_INPUT, "The browser app needs an access token (not on loopback, or none sent)."),
    "WEB_TOKEN_INVALID": ErrorKind(EXIT_BAD_INPUT, "The access token sent to the browser app is wrong."),
    # --- benchmarks (issue 16) -----------------------------------------------------------------
    "BENCH_DEPENDENCY_MISSING": ErrorKind(EXIT_BAD_INPUT, "A benchmark row needs an optional package that is not "
                                          "installed (bench peers: dynamic_network_architectures)."),
    # --- outputs and locks -------------------------------------------------------------------
    "OUTPUT_NOT_WRITABLE": ErrorKind(EXIT_BAD_INPUT, "The output location cannot be written."),
    "OUTPUT_EXISTS": ErrorKind(EXIT_BAD_INPUT, "The output already exists and would be overwritten."),
    "OUTPUT_LOCKED": ErrorKind(EXIT_BAD_INPUT, "Another run is writing into the same output."),
    # --- replacing outputs, disk and paths (issue 15) -------------------------------------------
    "OUTPUT_NOT_REPLACEABLE": ErrorKind(EXIT_BAD_INPUT, "The output path holds something MedTuning did not write as "
                                        "this kind of output (a case library, an input, a folder of other files, a "
                                        "file); --force never replaces it."),
    "DISK_FULL": ErrorKind(EXIT_FAILURE, "The disk (or quota) filled up while writing; nothing half-written was kept."),
    "PATH_TOO_LONG": ErrorKind(EXIT_BAD_INPUT, "A file or folder name is longer than the file system allows."),
    # --- weights and model folders -------------------------------------------------------------
    "WEIGHTS_NOT_FOUND": ErrorKind(EXIT_BAD_INPUT, "The base-weights file does not exist."),
    "WEIGHTS_DOWNLOAD_FAILED": ErrorKind(EXIT_BAD_INPUT, "Pretrained weights are neither cached nor downloadable."),
    "WEIGHTS_CHECKSUM_MISMATCH": ErrorKind(EXIT_BAD_INPUT, "The base weights differ from those the model was tuned on."),
    "WEIGHTS_INCOMPATIBLE": ErrorKind(EXIT_BAD_INPUT, "A weights file does not fit the architecture."),
    "UNSAFE_FILE": ErrorKind(EXIT_BAD_INPUT, "A file would need unpickling or code execution to load."),
    "MODEL_FOLDER_INVALID": ErrorKind(EXIT_BAD_INPUT, "A model folder is missing files or has a broken medtuning.json."),
    "MODEL_FOLDER_TOO_NEW": ErrorKind(EXIT_BAD_INPUT, "A model folder was written by a newer MedTuning."),
    "RESUME_STATE_MISSING": ErrorKind(EXIT_BAD_INPUT, "--resume was asked for but no resumable run was found."),
    "RESUME_MISMATCH": ErrorKind(EXIT_BAD_INPUT, "The resumable run was started with other settings."),
    # --- case libraries ----------------------------------------------------------------------
    "LIBRARY_INVALID": ErrorKind(EXIT_BAD_INPUT, "A case library folder has a missing or broken cases.json."),
    "LIBRARY_TOO_NEW": ErrorKind(EXIT_BAD_INPUT, "A case library was written by a newer MedTuning."),
    "LIBRARY_LOCKED": ErrorKind(EXIT_BAD_INPUT, "Another process is changing the case library."),
    "CASE_NOT_FOUND": ErrorKind(EXIT_BAD_INPUT, "No case with this id is in the library."),
    "CASE_EXISTS": ErrorKind(EXIT_BAD_INPUT, "A case with this id is already in the library."),
    "PATH_ESCAPES_LIBRARY": ErrorKind(EXIT_BAD_INPUT, "A manifest path points outside the case library."),
    "NO_TRAINING_CASES": ErrorKind(EXIT_BAD_INPUT, "The library has no cases for the requested split."),
    # --- running -----------------------------------------------------------------------------
    "MEMORY_ESTIMATE_TOO_LARGE": ErrorKind(EXIT_BAD_INPUT, "The run would not fit in the device's memory."),
    "OUT_OF_MEMORY": ErrorKind(EXIT_FAILURE, "The device ran out of memory during the run."),
    "DATA_WORKERS_FAILED": ErrorKind(EXIT_FAILURE, "A process preparing training crops (--workers) died, e.g. "
                                                   "out of shared memory."),
    "TRAINING_DIVERGED": ErrorKind(EXIT_FAILURE, "The loss or the tuned weights became NaN or infinite."),
    "DISTRIBUTED_ERROR": ErrorKind(EXIT_FAILURE, "A distributed (torchrun) run could not be set up."),
    "CANCELLED": ErrorKind(EXIT_CANCELLED, "The run was cancelled; its state is resumable."),
    "INTERNAL_ERROR": ErrorKind(EXIT_FAILURE, "An unexpected failure inside MedTuning (a bug)."),
}


class MedTuningError(Exception):
    """An error a user can act on: a stable code, what is wrong, and what to do."""

    def __init__(self, code: str, message: str, hint: str = "", **details: object) -> None:
        if code not in CATALOGUE:
            raise ValueError(f"unknown error code {code!r}: add it to MedTuningLib.errors.CATALOGUE")
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.details = details

    @property
    def exit_status(self) -> int:
        return CATALOGUE[self.code].exit_status

    def to_event(self) -> dict:
        event = {"code": self.code, "message": self.message, "hint": self.hint}
        event.update({k: v for k, v in self.details.items() if v is not None})
        return event

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}" + (f" — {self.hint}" if self.hint else "")


class Cancelled(Exception):
    """Raised inside a run when a cancel was requested (signal or STOP file)."""

    code = "CANCELLED"


def catalogue_markdown() -> str:
    """The README's error table: code, exit status, meaning."""
    lines = ["| code | exit | meaning |", "|---|---|---|"]
    for code, kind in CATALOGUE.items():
        lines.append(f"| `{code}` | {kind.exit_status} | {kind.summary} |")
    return "\n".join(lines)
