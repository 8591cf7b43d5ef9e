"""Benchmarks behind ``medtuning bench``: training-step cost per tuning method and inference speed.

- :mod:`MedTuningLib.bench.train_bench`: one method's training step, timed in a fresh process
  (``python -m MedTuningLib.bench.train_bench``), and the orchestration of all methods into two tables.
- :mod:`MedTuningLib.bench.infer_bench`: seconds per volume, plain fp32 sliding window against the tuned path.
- :mod:`MedTuningLib.bench.tables`: the Markdown tables.

Benchmarks print tables; they are not timed tests (docs/method.md "Testing").
"""
