"""``python -m aiter_core`` runs the ``aiter`` command."""

import sys

from aiter_core.cli import main

sys.exit(main())
