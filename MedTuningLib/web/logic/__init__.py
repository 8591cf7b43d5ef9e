"""One small logic class per feature of the page (trame-slicer's pattern): each owns its part of
the trame state, connects to the UI's signals in ``set_ui`` and does its MRML work through
:mod:`MedTuningLib.mrml`."""
