"""Task presets shipped as package data: label schemes (``kits.json``, ``brats.json``) with segment
colours and terminology, and the MedTuning terminology context (``terminology-medtuning.json``, in 3D
Slicer's terminology-context format) for the BraTS regions, which have no standard SNOMED CT code.
"""
