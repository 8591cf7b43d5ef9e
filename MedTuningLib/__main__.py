"""``python -m MedTuningLib ...`` is the same as the ``medtuning`` command."""

import sys

from MedTuningLib.cli import main

if __name__ == "__main__":
    sys.exit(main())
