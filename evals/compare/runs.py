"""Loading run directories and grouping them: runs whose configs differ only by seed (and by bookkeeping) form a
group; seeds are its repeats. No import of the trainer: the config schema's defaults, for runs saved before a key
existed, are passed in by the command (``schema``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from evals.results_store import HELD_OUT_FILE, SAMPLES_FILE, StoredEval, find_results
from evals.watch import EVAL_METRICS
from losslab.losses import LossConfig, loss_tag

# Config keys that do not change what a run computes: runs differing only here (and by seed) are repeats.
BOOKKEEPING_PREFIXES = ("run.", "wandb.", "checkpoint.", "debug.", "distributed.", "eval.")
BOOKKEEPING_KEYS = {"train.seed", "train.resume", "train.log_every", "train.max_nonfinite_in_a_row",
                    "data.num_workers", "model.compile", "model.activation_checkpointing"}  # fmt: skip


@dataclass
class Run:
    dir: Path
    cfg: Any
    seed: int
    steps: list[int]
    tokens: list[float]
    ce: list[float]
    loss: list[float]
    val: list[tuple[float, float]] = field(default_factory=list)
    """(tokens, held-out loss by the bucket evaluation) at each evaluation."""
    eval: dict[str, float] = field(default_factory=dict)
    """The final evaluation: ``eval/TASK/METRIC`` and ``eval_bucket/...`` keys."""
    eval_tasks: list[str] = field(default_factory=list)
    eval_limit: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    """run_info.json (tokenizer_sha256, data_files, model, ...); empty for runs that predate it."""
    held_out: dict[str, Any] | None = None
    """Per held-out document losses of the final evaluation (``evals/runner.py`` HELD_OUT_FILE)."""
    samples: dict[str, Any] = field(default_factory=dict)
    """lm-eval's per-document scores of the final evaluation ({task[@kshot]: {metric: [...], "doc_id": [...]}})."""
    domains: dict[str, float] = field(default_factory=dict)
    """``eval_domain/<d>/loss`` (and overall/average/worst) at the last step that logged them."""
    domain_curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    """``eval_domain/...`` key -> (tokens, value) at each in-loop evaluation."""
    evals: dict[str, StoredEval] = field(default_factory=dict)
    """The complete evaluations of the last step's checkpoint by settings key (``evals/results_store.py``), newest
    first."""
    eval_setting: str = ""
    """The key of the evaluation ``eval``, ``held_out`` and ``samples`` come from ("" when none)."""
    eval_curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    """``eval/TASK/METRIC`` -> (tokens, value) at each checkpoint evaluated with the setting ``eval_setting``
    (``setting_curves``); for a run with no stored evaluation of its last checkpoint, its in-loop evaluations
    (``metrics.jsonl``)."""

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def stratified(self) -> bool:
        """The held-out numbers come from a stratified held-out set (``evals/heldout.py``), not from the held-out
        files read in order (runs made before it)."""
        return bool(self.held_out and "set" in self.held_out and "domain" in self.held_out)


def _json(path: Path | None) -> Any:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _stored_evals(run_dir: Path, last_step: int) -> dict[str, StoredEval]:
    """The complete evaluations of the latest checkpoint (training's, and any by a later scripts/evaluate.py), if
    it is the last step's, by settings key, newest first."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    if not ckpts:
        return {}
    found = [s for s in find_results(ckpts[-1]) if s.complete and s.step == last_step]
    out: dict[str, StoredEval] = {}
    for s in found:
        out.setdefault(s.key, s)
    return out


def default_setting(run: Run) -> str:
    """The evaluation a run is read with unless told: training's own, else the newest ("" when none)."""
    trained = [k for k, s in run.evals.items() if s.source == "training"]
    return trained[0] if trained else next(iter(run.evals), "")


def use_evaluation(run: Run, key: str) -> None:
    """Read ``run``'s final evaluation numbers (``eval``, tasks, limit, per-document files) from its evaluation
    ``key`` (one of ``run.evals``); the in-loop per-domain losses are not an evaluation's and stay."""
    stored = run.evals[key]
    results = stored.summary
    run.eval = {}
    for name, value in results["metrics"].items():
        run.eval[f"eval_bucket/{name.removeprefix('bucket/')}" if name.startswith("bucket/") else f"eval/{name}"] = (
            value
        )
    run.eval_tasks = list(results.get("tasks") or [])
    run.eval_limit = int(results.get("limit") or 0)
    held_out = stored.json(HELD_OUT_FILE)
    run.held_out = held_out if held_out and held_out.get("step") == results.get("step") else None
    run.samples = stored.json(SAMPLES_FILE) or {}
    run.eval_setting = key
    run.eval_curves = setting_curves(run, key)


def read_run(run_dir: Path, schema: Any = None, setting: str = "") -> Run:
    """A run from its directory. ``schema``: the config schema with its defaults (a run saved before a key existed
    ran with that key's default), merged under the run's config.yaml. Its final evaluation is the one with settings
    key ``setting`` when it has one, else training's (``default_setting``); ``choose_setting`` picks one for
    several runs."""
    saved = OmegaConf.load(run_dir / "config.yaml")
    cfg = OmegaConf.merge(schema, saved) if schema is not None else saved
    # the loss section as today's config writes it (flat; a section saved before losses declared their
    # parameters keeps only what its loss read), so old and new runs compare key by key
    cfg.loss = LossConfig.from_mapping(OmegaConf.to_container(cfg.loss)).to_mapping()  # type: ignore[arg-type]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r and "tokens" in r]
    # evaluations follow checkpoints, which need not fall on logging steps; tokens grow linearly with steps
    tokens_per_step = train[-1]["tokens"] / train[-1]["step"] if train else math.nan
    final_eval: dict[str, float] = {}
    val: list[tuple[float, float]] = []
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:  # the last evaluation wins
        evals = {k: v for k, v in r.items() if k.startswith(("eval/", "eval_bucket/"))}
        if evals:
            final_eval = evals
            if "eval_bucket/loss" in evals:
                val.append((r["step"] * tokens_per_step, evals["eval_bucket/loss"]))
        for k, v in r.items():
            if k.startswith("eval_domain/"):
                curves.setdefault(k.removeprefix("eval_domain/"), []).append((r["step"] * tokens_per_step, v))
    # one point per step, in step order (a line written out of order, e.g. by an interrupted process, is not a curve)
    curves = {k: sorted(dict(pts).items()) for k, pts in curves.items()}
    last_step = train[-1]["step"] if train else 0
    domains = {k: pts[-1][1] for k, pts in curves.items() if k.endswith(("/loss", "overall", "average", "worst"))}
    run = Run(
        dir=run_dir,
        cfg=cfg,
        seed=int(cfg.train.seed),
        steps=[r["step"] for r in train],
        tokens=[r["tokens"] for r in train],
        ce=[r.get("ce", math.nan) for r in train],
        loss=[r["loss"] for r in train],
        val=val,
        eval=final_eval,  # the in-loop numbers, for a run whose checkpoint holds no evaluation
        eval_tasks=list(cfg.eval.tasks),
        eval_limit=int(cfg.eval.limit),
        info=_json(run_dir / "run_info.json") or {},
        domains=domains,
        domain_curves={k: v for k, v in curves.items() if k.endswith(("/loss", "overall", "average", "worst"))},
        eval_curves=_eval_curves(rows, tokens_per_step),  # without a stored evaluation: the in-loop ones
        evals=_stored_evals(run_dir, last_step),
    )
    if run.evals:
        use_evaluation(run, setting if setting in run.evals else default_setting(run))
    return run


def _eval_curves(rows: list[dict[str, Any]], tokens_per_step: float) -> dict[str, list[tuple[float, float]]]:
    """Each downstream score (``eval/...``) in ``rows`` (``metrics.jsonl``'s form) by training tokens, one point
    per step (the last row of a step wins)."""
    points: dict[str, dict[int, tuple[float, float]]] = {}
    for r in rows:
        tokens = r.get("tokens", r["step"] * tokens_per_step)
        for k, v in r.items():
            if k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool):
                points.setdefault(k, {})[r["step"]] = (tokens, v)
    return {k: [pts[s] for s in sorted(pts)] for k, pts in points.items()}


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def setting_curves(run: Run, key: str) -> dict[str, list[tuple[float, float]]]:
    """Each downstream score (``eval/...``) at each checkpoint evaluated with the setting ``key``, by training
    tokens, never another setting's: the complete results of that setting beside each checkpoint still on disk
    (``CKPT/evals/<key>/``); the watcher's lines of that setting (``eval_metrics.jsonl``, ``evals/watch.py``);
    and, when ``key`` is the in-loop evaluation's (the only setting training evaluated with, by the
    ``source`` of the results on disk), its lines in ``metrics.jsonl``, which outlive the checkpoints that
    ``checkpoint.keep`` removed. One point per step; stored results win over logged lines."""
    rows = _rows(run.dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r and "tokens" in r]
    tokens_per_step = train[-1]["tokens"] / train[-1]["step"] if train else math.nan
    stored = [s for ckpt in sorted((run.dir / "checkpoints").glob("step_*")) for s in find_results(ckpt)]
    trained = {s.key for s in stored if s.source == "training"}
    logged = [r for r in rows if trained == {key}]
    logged += [r for r in _rows(run.dir / EVAL_METRICS) if r.get("eval_setting") == key]
    results = [{"step": s.step, "tokens": s.summary.get("tokens") or s.step * tokens_per_step,
                **{f"eval/{k}": v for k, v in s.summary["metrics"].items() if not k.startswith("bucket/")}}
               for s in stored if s.key == key and s.complete and s.step is not None]  # fmt: skip
    return _eval_curves([*logged, *results], tokens_per_step)


def _flat(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = json.dumps(node, sort_keys=True)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return {k: v for k, v in out.items() if k not in BOOKKEEPING_KEYS and not k.startswith(BOOKKEEPING_PREFIXES)}


def group_runs(runs: list[Run]) -> tuple[dict[str, list[Run]], dict[str, str]]:
    """(label -> runs that differ only by seed, label -> the group's other differing settings). The label is the
    loss tag (``losslab.losses.loss_tag``), plus the settings that differ between groups when they are short (a letter
    otherwise, the settings then in the report); CE groups first (the baseline), then in the order given."""
    flats = [_flat(r.cfg) for r in runs]
    keyed: dict[tuple, list[int]] = {}
    for i, f in enumerate(flats):
        keyed.setdefault(tuple(sorted(f.items())), []).append(i)
    varying = sorted({k for f in flats for k in f if len({g.get(k) for g in flats}) > 1 and not k.startswith("loss.")})
    # loss settings that the tag does not show but that tell two groups apart (a plug-in's options, pdl's eps)
    tags = [loss_tag(runs[m[0]].cfg.loss) for m in keyed.values()]
    hidden: dict[str, list[str]] = {}
    for tag in {t for t in tags if tags.count(t) > 1}:
        same = [flats[m[0]] for m, t in zip(keyed.values(), tags, strict=True) if t == tag]
        loss_keys = {k for f in same for k in f if k.startswith("loss.")}
        hidden[tag] = sorted(k for k in loss_keys if len({g.get(k) for g in same}) > 1)
    groups: dict[str, list[Run]] = {}
    settings: dict[str, str] = {}
    for n, (members, tag) in enumerate(zip(keyed.values(), tags, strict=True)):
        keys = varying + hidden.get(tag, [])
        extra = [f"{k}={json.loads(flats[members[0]][k])}" for k in keys if k in flats[members[0]]]
        short = " ".join(e.split(".", 1)[-1] for e in extra)
        label = tag + (f" {short}" if 0 < len(short) <= 40 else f" [{chr(65 + n)}]" if extra else "")
        if label in groups:  # never merge or drop a group under another's name
            label = f"{label} [{chr(65 + n)}]"
        groups[label] = sorted((runs[i] for i in members), key=lambda r: r.seed)
        settings[label] = ", ".join(extra)
    # the baseline first: plain CE (no modifier) before CE with one, then the rest in the order given
    order = sorted(groups, key=lambda label: (groups[label][0].cfg.loss.name != "ce", not label.startswith("ce ")
                                              and label != "ce"))  # fmt: skip
    return {label: groups[label] for label in order}, settings


def baseline(groups: dict[str, list[Run]]) -> str | None:
    return next((label for label, runs in groups.items() if runs[0].cfg.loss.name == "ce"), None)


def final(values: list[float]) -> float:
    return values[-1] if values else math.nan


def diverged(run: Run) -> str:
    """Why a run counts as diverged ("" if it does not): its final training ``ce`` is not finite, or is above the
    loss of a uniform prediction (``ln V``), or is more than 1 nat/token above the lowest it reached."""
    ce = [c for c in run.ce if c is not None]
    if not ce:
        return ""
    last = ce[-1]
    if not math.isfinite(last):
        return "non-finite training loss"
    vocab = (run.info.get("model") or {}).get("vocab_size")
    if vocab and last > math.log(vocab):
        return f"final training ce {last:.2f} above ln V = {math.log(vocab):.2f} (worse than a uniform guess)"
    low = min(c for c in ce if math.isfinite(c))
    if last > low + 1.0:
        return f"final training ce {last:.2f}, more than 1 nat above its lowest ({low:.2f})"
    return ""


class SettingError(ValueError):
    """Runs without one evaluation setting in common (or with several and none chosen)."""


def choose_setting(runs: list[Run], wanted: str = "", force: bool = False) -> str:
    """The evaluation setting (key, ``evals/results_store.py``) every run is read with, applied to each run: the
    one ``wanted``, else the one all runs have (several: training's, when it is the same for all), else
    ``SettingError`` naming each run's settings. ``force``: each run keeps ``wanted`` when it has it, else its
    own default (training's), and the report labels every number with its run's setting; returns ""."""
    evaluated = [r for r in runs if r.evals]
    if not evaluated:
        return ""
    common = [k for k in evaluated[0].evals if all(k in r.evals for r in runs)]
    if wanted:
        choice = wanted if wanted in common else ""
        why = f"--eval-setting {wanted} is not an evaluation of every run"
    elif len(common) == 1:
        choice, why = common[0], ""
    else:
        trained = {default_setting(r) for r in runs}
        choice = trained.pop() if len(trained) == 1 and not trained - set(common) and common else ""
        why = ("no evaluation setting common to all runs" if not common else
               f"several evaluation settings common to all runs ({', '.join(common)}): pick one with "
               "--eval-setting KEY")  # fmt: skip
    if choice:
        for r in runs:
            use_evaluation(r, choice)
        return choice
    if force:
        for r in runs:
            if wanted in r.evals:
                use_evaluation(r, wanted)
        return ""
    listing = "; ".join(f"{r.name}: {', '.join(r.evals) or 'none'}" for r in runs)
    raise SettingError(f"{why}; evaluations of the last checkpoint by run: {listing}")


def mismatches(runs: list[Run]) -> list[str]:
    """Why these runs cannot be compared on equal terms, one entry per property that differs (runs that predate
    run_info.json or the held-out set are not checked on what only those record)."""
    checks = {
        "final tokens": lambda r: f"{final(r.tokens):.0f}",
        "tokenizer (run_info.json tokenizer_sha256)": lambda r: (r.info.get("tokenizer_sha256") or "")[:12] or None,
        "training data (run_info.json data_files)": lambda r: (
            json.dumps(r.info["data_files"]) if "data_files" in r.info else None
        ),
        "held-out data (data.val_files)": lambda r: json.dumps(list(r.cfg.data.val_files)),
        "held-out set (eval_held_out.json set identity)": lambda r: (
            r.held_out["set"]["identity"] if r.stratified else None
        ),
    }
    out = []
    for what, get in checks.items():
        seen: dict[str, list[str]] = {}
        for r in runs:
            if (value := get(r)) is not None:
                seen.setdefault(value, []).append(r.dir.name)
        if len(seen) > 1:
            short = all(len(v) <= 16 for v in seen)  # show values when short, else only which runs differ
            out.append(f"{what} differ: " + " vs ".join(
                f"{v + ': ' if short else ''}{', '.join(names)}" for v, names in seen.items()
            ))  # fmt: skip
    return out
