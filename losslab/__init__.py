"""losslab: the loss library — ``losslab.losses`` (every loss, fused, torch only) and ``losslab.hf`` (the drop-in
for Hugging Face causal LMs, Trainer and TRL) — and the ``losslab`` console command (``losslab/cli.py``).

This package is the only name an install of losslab puts into site-packages: the framework's own folders
(``data``, ``models``, ``trainer``, ``evals``, ``scripts``) stay where they are in the checkout, and the command
puts that checkout first on ``sys.path`` before it runs a script, so the command and ``python scripts/X.py``
always run the same, local code."""
