"""``python -m medrl.cli``: the same as the ``medrl`` command."""

import sys

from medrl.cli import main

sys.exit(main())
