"""A pytest plugin that appends one JSON line per test to a file as each test finishes, so that a test session
killed at its time limit (``scripts/gpu/validate.sh`` cuts every stage) still leaves the results it reached —
pytest's own ``--junitxml`` is written only at the end.

    python -m pytest -p scripts.gpu.pytest_jsonl --jsonl OUT/tests.jsonl tests/test_cuda.py

Each line: ``{"test": nodeid, "outcome": passed | failed | skipped, "when": setup | call | teardown, "seconds",
"message"}`` (message: the skip reason or the failure's last line).
"""

from __future__ import annotations

import json

import pytest

_path: list[str] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--jsonl", default="", help="append one JSON line per finished test to this file")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--jsonl")
    if path:
        _path[:] = [path]
        open(path, "w").close()


def _message(report: pytest.TestReport) -> str:
    if report.passed:
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])  # (file, line, "Skipped: reason")
    lines = str(report.longrepr).strip().splitlines()
    return lines[-1][:500] if lines else ""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # one line per test: its call, or the setup / teardown phase that failed or skipped it
    if not _path or (report.when != "call" and report.passed):
        return
    row = {
        "test": report.nodeid,
        "outcome": report.outcome,
        "when": report.when,
        "seconds": round(report.duration, 3),
        "message": _message(report),
    }
    with open(_path[0], "a") as fh:
        fh.write(json.dumps(row) + "\n")
