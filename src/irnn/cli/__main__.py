"""``python -m irnn.cli``: the ``irnn`` command."""
import sys

from . import main

sys.exit(main())
