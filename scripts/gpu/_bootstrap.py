"""``scripts/_bootstrap.py`` for the scripts in ``scripts/gpu/``: run as files, they have this folder first on
``sys.path`` and find this module, which runs that one (the checkout first on ``sys.path``)."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parents[1] / "_bootstrap.py"))
