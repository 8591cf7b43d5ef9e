"""MedTuning in the browser: ``medtuning web``, built on trame-slicer.

The composition follows trame-slicer's bundled ``segmentation_app.py``: a :class:`SlicerApp`
(3D Slicer's MRML scene, IO, views and segment editor on slicer-core), one small logic class per
feature (:mod:`.logic`: scans, models, segment, cases, fine-tune) and a UI class (:mod:`.ui`)
whose signals the logic classes connect to. The MRML work itself (nodes to files, results to
segmentation nodes, scene cases, backend jobs) is :mod:`MedTuningLib.mrml`, the same Qt-free code
the 3D Slicer module runs; the backend is the same separate ``python -m MedTuningLib`` process,
polled by an asyncio timer so the page never waits for it.

Importing this package imports nothing heavy: :mod:`.access` is standard library only, and
:mod:`.app` (trame, VTK) is imported by ``medtuning web`` alone.
"""
