"""``python -m abfp`` (also what ``torchrun -m abfp`` runs)."""

import sys

from .cli import main

sys.exit(main())
