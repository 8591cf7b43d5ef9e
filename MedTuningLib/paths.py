"""Default user folders: ``~/.medtuning/models`` and ``~/.medtuning/cases``.

``MEDTUNING_HOME`` moves both (tests use it so that a machine's own folders are never touched);
the Slicer settings can point each elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path


def medtuning_home() -> Path:
    return Path(os.environ.get("MEDTUNING_HOME") or Path.home() / ".medtuning").expanduser()


def default_models_dir() -> Path:
    return medtuning_home() / "models"


def default_cases_dir() -> Path:
    return medtuning_home() / "cases"
