"""The engine: training, inference and evaluation on top of ``models`` and ``data``.

- :mod:`.device`: device and precision choice.
- :mod:`.modelfolder`: the model folder format (``medtuning.json`` + ``weights.safetensors``).
- :mod:`.train`: the training run (resume, warm start, cancel, time budget, torchrun).
- :mod:`.infer`: sliding-window inference and writing results.
- :mod:`.evaluate`: Dice / HD95 per region and reports.
"""
