"""``python -m turbotune`` (and ``torchrun -m turbotune``) run the CLI."""

import sys

from turbotune.cli import main

sys.exit(main())
