"""Reading, checking and preparing volumes and labels for training and inference.

- :mod:`.io` reads images (NIfTI, NRRD, MHA, DICOM folders) and labels (labelmaps, Slicer .seg.nrrd);
- :mod:`.geometry` checks voxel grids, places cropped segmentations and resamples modalities;
- :mod:`.labels` holds label schemes (kits, brats, custom) and their presets;
- :mod:`.preprocess` normalises intensities and records how;
- :mod:`.transforms` builds the MONAI training / validation transforms;
- :mod:`.cache` keeps preprocessed cases as .npz + JSON (never pickle).
"""
