"""Where a checkpoint's evaluations are kept, keyed by their settings, so one never overwrites another.

Each evaluation of a checkpoint (training's in-loop one, ``scripts/evaluate.py``) writes into its own folder
``CKPT/evals/<key>/`` (``eval_results.json``, ``eval_samples.json``, ``eval_held_out.json``), the key spelled from
what changes its numbers (``EvalSettings.key``), e.g. ``toy_mc+toy_gen-fs0-limitall-lmeval0.4.13-heldout1a2b3c4d``.
The same settings evaluated again replace that folder's files (the same numbers, barring a changed checkpoint or
task data); other settings get a folder of their own. ``eval_results.json`` records the settings and the key.

Checkpoints evaluated before this layout hold one ``CKPT/eval_results.json``: it is read as an evaluation whose
settings are those it recorded, with the lm-eval version unknown (``lmevalunknown``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EVALS_DIR = "evals"
RESULTS_FILE = "eval_results.json"
SAMPLES_FILE = "eval_samples.json"
"""Per-document scores of each task (``evals/runner.py`` ``document_scores``)."""
HELD_OUT_FILE = "eval_held_out.json"
"""Per held-out document summed loss and token count (``evals/runner.py``)."""
UNKNOWN = "unknown"
_NAME = re.compile(r"[A-Za-z0-9_.]+")


@dataclass(frozen=True)
class EvalSettings:
    """What decides an evaluation's numbers besides the weights."""

    tasks: tuple[str, ...] = ()
    """lm-eval task names or sets as asked (sorted)."""
    num_fewshot: tuple[int, ...] = (0,)
    limit: int = 0
    """Documents per task (0: all)."""
    lm_eval: str = ""
    """lm-eval's version ("" without tasks)."""
    held_out: str = ""
    """The held-out set's identity (``HeldOutSet.identity``; "" without held-out files)."""
    buckets: str = ""
    """Where the frequency buckets come from: ``training`` (the checkpoint's token counts), ``files-<sha8>`` (counts
    of the files given), ``none`` (held-out loss alone), "" without held-out files."""

    @classmethod
    def of(cls, tasks: list[str], num_fewshot: list[int], limit: int, *, held_out: str = "", buckets: str = "",
           lm_eval: str | None = None) -> EvalSettings:  # fmt: skip
        """The settings of an evaluation; ``lm_eval`` defaults to the installed version when there are tasks."""
        if lm_eval is None:
            lm_eval = lm_eval_version() if tasks else ""
        return cls(tuple(sorted(tasks)), tuple(num_fewshot) if tasks else (0,), int(limit) if tasks else 0,
                   lm_eval if tasks else "", held_out, buckets if held_out else "")  # fmt: skip

    def key(self) -> str:
        """A readable folder name that differs wherever the settings differ."""
        parts = []
        if self.tasks:
            joined = "+".join(self.tasks)
            if len(joined) > 40 or not _NAME.fullmatch(joined.replace("+", "")):
                joined = "tasks" + hashlib.sha256(json.dumps(self.tasks).encode()).hexdigest()[:8]
            shots = "_".join(str(k) for k in self.num_fewshot)
            parts += [joined, f"fs{shots}", f"limit{self.limit or 'all'}", f"lmeval{_safe(self.lm_eval)}"]
        if self.held_out:
            parts.append(f"heldout{_safe(self.held_out)[:8]}")
            if self.buckets and self.buckets != "training":
                parts.append(f"buckets{_safe(self.buckets)}")
        return "-".join(parts) or "nothing"

    def describe(self) -> str:
        """One line for a person: what was evaluated and how."""
        out = []
        if self.tasks:
            out.append(
                f"tasks {','.join(self.tasks)}, {'/'.join(map(str, self.num_fewshot))}-shot, "
                f"{'limit ' + str(self.limit) if self.limit else 'all documents'}, lm-eval {self.lm_eval}"
            )
        if self.held_out:
            out.append(f"held-out set {self.held_out[:8]} (buckets: {self.buckets or 'training'})")
        return "; ".join(out) or "nothing"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "tasks": list(self.tasks), "num_fewshot": list(self.num_fewshot)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalSettings:
        return cls(tuple(data.get("tasks") or ()), tuple(data.get("num_fewshot") or (0,)), int(data.get("limit") or 0),
                   str(data.get("lm_eval") or ""), str(data.get("held_out") or ""),
                   str(data.get("buckets") or ""))  # fmt: skip


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", text)


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return UNKNOWN


def results_dir(checkpoint_dir: str | Path, settings: EvalSettings) -> Path:
    """The folder of the evaluation of ``checkpoint_dir`` with these settings."""
    return Path(checkpoint_dir) / EVALS_DIR / settings.key()


def results_path(checkpoint_dir: str | Path, settings: EvalSettings) -> Path:
    """The ``eval_results.json`` of the evaluation of ``checkpoint_dir`` with these settings."""
    return results_dir(checkpoint_dir, settings) / RESULTS_FILE


@dataclass
class StoredEval:
    """One evaluation of a checkpoint as found on disk."""

    key: str
    settings: EvalSettings
    dir: Path
    """Its folder (the checkpoint itself for the old single-file layout)."""
    summary: dict[str, Any] = field(default_factory=dict)
    """``eval_results.json``."""

    @property
    def step(self) -> int | None:
        return self.summary.get("step")

    @property
    def source(self) -> str:
        """``training`` (the in-loop evaluation) or ``evaluate`` (a later command); "" when not recorded."""
        return str(self.summary.get("source") or "")

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete", True))

    @property
    def samples_path(self) -> Path:
        return self.dir / SAMPLES_FILE

    @property
    def held_out_path(self) -> Path:
        return self.dir / HELD_OUT_FILE

    def json(self, name: str) -> Any:
        """A file of this evaluation (``SAMPLES_FILE``, ``HELD_OUT_FILE``) read, or None when absent."""
        path = self.dir / name
        return json.loads(path.read_text()) if path.is_file() else None


def _legacy(ckpt: Path) -> StoredEval | None:
    path = ckpt / RESULTS_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    held = ckpt / HELD_OUT_FILE
    identity = ""
    if held.is_file():
        identity = ((json.loads(held.read_text()).get("set") or {}).get("identity")) or UNKNOWN
    shots = summary.get("num_fewshot", [0])
    settings = EvalSettings.of(list(summary.get("tasks") or []), shots if isinstance(shots, list) else [shots],
                               int(summary.get("limit") or 0), held_out=identity, buckets="training",
                               lm_eval=UNKNOWN)  # fmt: skip
    return StoredEval(settings.key(), settings, ckpt, summary)


def find_results(checkpoint_dir: str | Path, settings: EvalSettings | str | None = None) -> list[StoredEval]:
    """The evaluations of ``checkpoint_dir``, newest first (by the time their results were written), or only the
    one with these settings (an ``EvalSettings`` or its key); the old single-file layout included."""
    ckpt = Path(checkpoint_dir)
    found = []
    for path in (ckpt / EVALS_DIR).glob(f"*/{RESULTS_FILE}"):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # torn by a crash while written: write_atomic prevents it, an old copy may not
        stored = EvalSettings.from_json(summary.get("settings") or {})
        found.append((path.stat().st_mtime, StoredEval(path.parent.name, stored, path.parent, summary)))
    old = _legacy(ckpt)
    if old is not None:
        found.append(((ckpt / RESULTS_FILE).stat().st_mtime, old))
    out = [s for _, s in sorted(found, key=lambda x: -x[0])]
    if settings is not None:
        key = settings if isinstance(settings, str) else settings.key()
        out = [s for s in out if s.key == key]
    return out


def latest(checkpoint_dir: str | Path, task: str | None = None) -> StoredEval | None:
    """The newest evaluation of ``checkpoint_dir`` (that asked for ``task``, when given)."""
    for s in find_results(checkpoint_dir):
        if task is None or task in s.settings.tasks or task in (s.summary.get("n_samples") or {}):
            return s
    return None
