"""MedTuning: parameter-efficient fine-tuning (Med-Adapters) of pretrained 2D vision transformers
for 3D medical image segmentation.

This package is Slicer-free: it never imports ``slicer``, ``qt`` or ``vtk``. The 3D Slicer module
(``MedTuning/MedTuning.py``) drives it as a separate process through the ``medtuning`` command.
"""

__version__ = "0.1.0"

# Version of the model folder / case library formats this release writes and can read.
FORMAT_VERSION = 2  # the same as MedTuningLib.schema.FORMAT_VERSION (the records live there)
