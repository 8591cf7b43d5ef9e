"""Reports people look at: training curves, overlay montages, HTML evaluation reports, tables.

- :mod:`~MedTuningLib.reports.curves`: ``TrainingCurves`` — ``curves.csv`` + ``curves.png`` beside a
  training run (nnU-Net ``progress.png`` style), rewritten after every epoch, reloadable on resume.
- :mod:`~MedTuningLib.reports.montage`: ``region_montage`` — axial / coronal / sagittal slices
  through a region's centre with the prediction filled and the reference outlined.
- :mod:`~MedTuningLib.reports.html`: ``write_html_report`` — a self-contained ``report.html``.
- :mod:`~MedTuningLib.reports.tables`: ``markdown_table`` and ``comparison_table`` (best per column
  marked, direction per column) for ``medtuning compare`` and the README.

Pictures are drawn with matplotlib's object API (``matplotlib.figure.Figure`` rendered by Agg), never
through ``pyplot``: no global figure state, no GUI backend, safe inside a worker or Slicer's Python.
Every file is written atomically (``MedTuningLib.fileio``).
"""
