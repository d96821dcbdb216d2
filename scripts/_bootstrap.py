"""Imported first by every script (``import _bootstrap``): puts the checkout the script sits in first on
``sys.path``, so that ``python scripts/X.py``, from any working directory, runs this checkout's ``data``,
``models``, ``evals``, ``trainer`` and ``losslab`` — never another copy of them (an installed one, another
checkout's, one on ``PYTHONPATH``).

Run as a file, a script has its own folder first on ``sys.path``, which is how it finds this module; imported
as a module of the ``scripts`` package (the ``losslab`` command, the tests), ``scripts/__init__.py`` makes this
module importable under the same name. ``scripts/gpu/_bootstrap.py`` runs this one for the scripts one folder
down; ``losslab/cli.py`` puts its own checkout first before it imports a script."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))
