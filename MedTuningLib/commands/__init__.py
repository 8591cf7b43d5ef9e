"""One module per sub-command: ``run(args, ctx) -> dict`` returning the command's outputs.

The shared parts (events, exit statuses, cancel) live in :mod:`MedTuningLib.cli`.
"""
