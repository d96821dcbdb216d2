"""The command-line scripts (``python scripts/X.py``, or ``losslab X``: ``losslab/cli.py``).

Each script begins with ``import _bootstrap`` (``scripts/_bootstrap.py``: its checkout first on ``sys.path``).
Imported as modules of this package, the scripts find that module here, under the same name."""

import sys

from scripts import _bootstrap

sys.modules.setdefault("_bootstrap", _bootstrap)
