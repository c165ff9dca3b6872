"""``python -m peftkit`` (and ``torchrun -m peftkit``) run the ``peftkit`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
