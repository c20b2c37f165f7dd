"""``python -m sparcomm``: the same as the ``sparcomm`` command."""

from __future__ import annotations

import sys

from sparcomm.cli import main

sys.exit(main())
