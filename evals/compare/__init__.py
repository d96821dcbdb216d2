"""Comparing runs from their run directories: ``runs`` (loading and grouping), ``metrics`` (what each metric's
interval resamples), ``stats`` (intervals, tests, verdict words; numpy and scipy only), ``coverage`` (the
intervals' coverage by simulation), ``plots`` (matplotlib) and ``report`` (markdown and CSV). The command is
``scripts/compare_runs.py`` (``losslab compare``); ``docs/statistics.md`` explains the numbers to a reader."""
