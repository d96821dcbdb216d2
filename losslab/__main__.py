"""``python -m losslab ...`` is the ``losslab`` command."""

import sys

from losslab.cli import main

sys.exit(main())
