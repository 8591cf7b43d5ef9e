"""The engine: training, inference and evaluation on top of ``models`` and ``data``.

- :mod:`.device`: device and precision choice.
- :mod:`.modelfolder`: the model folder format (``medtuning.json`` + ``weights.safetensors``).
- :mod:`.train`: the training run (resume, warm start, cancel, time budget, torchrun), built from
  :mod:`.train_options`, :mod:`.distributed`, :mod:`.train_data` (cases, crops, the DataLoader),
  :mod:`.warm_start`, :mod:`.setup`, :mod:`.resume`, :mod:`.loop`, :mod:`.budget`, :mod:`.objectives`,
  :mod:`.scoring` and :mod:`.publish`.
- :mod:`.windows`: sliding-window settings (overlap, precisions) without importing PyTorch.
- :mod:`.infer`: sliding-window inference and writing results.
- :mod:`.evaluate`: Dice / HD95 per region and reports.
"""
