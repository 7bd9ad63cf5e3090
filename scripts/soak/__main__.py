"""``python -m soak``: see :mod:`soak.main`."""

import sys

from soak.main import main

sys.exit(main())
