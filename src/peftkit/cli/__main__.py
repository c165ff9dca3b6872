"""``python -m peftkit.cli`` runs the ``peftkit`` command, as ``python -m peftkit`` does."""

import sys

from . import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
