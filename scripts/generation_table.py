"""Generation metrics of fine-tuned runs side by side, with 95% intervals from a per-prompt bootstrap:
``python scripts/generation_table.py runs/finetune/ce runs/finetune/pdl_a1 --baseline runs/smollm2-imported
[--task shakespeare_dialogue] [--reference ce]``, or ``python scripts/generation_table.py OUT_DIR`` (every run in the
directory that ``scripts/finetune_demo.sh --out OUT_DIR`` wrote).

Reads each run's (or checkpoint's) newest complete evaluation that scored the task (``CKPT/evals/<settings>/``:
the in-loop evaluation or ``scripts/evaluate.py``; ``evals/results_store.py``), and the held-out losses of the
same evaluation (else of the newest one that has them); the table names the evaluation each row comes from.
``--primary METRIC --margin M``: the study's declared primary metric, whose setting-by-setting verdicts come first,
with the equivalence test against ±M and no multiplicity adjustment; the other metrics are Holm-corrected among
themselves. ``--baseline``: the model before fine-tuning (e.g. the imported HF checkpoint, evaluated with
``scripts/evaluate.py`` on the same task) as the first row. Every metric gets a 95% interval from resampling
the prompts (2,000 times; ROUGE, length and the degenerate fraction are means over prompts, rarity a pooled ratio,
recomputed on each resample) — except distinct-n, which a resample with replacement distorts (a prompt drawn twice
repeats all its n-grams) and which gets the delete-1 jackknife over the prompts instead — and every row its
difference to the reference row (``--reference``: a row's name; default the first run) with a *paired* interval —
both rows on the same resampled prompts, or without the same prompt — a p-value, its Holm adjustment over the
table and a verdict where the metric has a better direction. Runs named ``SETTING-sSEED`` (``scripts/run_grid.sh``)
are also compared setting by setting: each setting's mean over its seeds against the reference row's setting,
seeds paired by number, the interval taking the seeds' spread through t and the prompts' through the bootstrap or
the jackknife (``seeds_t``, ``seeds_jackknife``), Holm over that table; a row is a single run's seed and prompts,
a setting's is the study's answer. Rarity uses
the reference run's tokenizer and training counts for every row, so the rows are comparable. The response
perplexity by frequency bucket (``eval.buckets`` on held-out records) gets intervals from resampling records.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _bootstrap  # noqa: F401  (this checkout first on sys.path)
import numpy as np

from losslab.log import fail, get_logger

COLUMNS = ("rouge1", "rouge2", "rougeL", "distinct1", "distinct2", "rarity", "length", "degenerate")
DIRECTION = {"rouge1": 1, "rouge2": 1, "rougeL": 1, "distinct1": 1, "distinct2": 1, "degenerate": -1}
"""+1: higher is better, -1: lower is better; length and rarity have no better direction (no verdict)."""
N_BOOT = 2000


@dataclass
class Row:
    name: str
    loss: str
    ckpt: Path
    metrics: dict[str, float]
    samples: dict[str, Any] | None
    """The task's per-prompt values (``eval_samples.json``): scores, ``doc_id`` and, where saved, ``output``."""
    held_out: dict[str, Any] | None
    evaluation: str = ""
    """The settings key(s) of the evaluation(s) the row comes from."""


SettingDiffs = tuple[list[tuple[str, str, str, Any]], str]
"""(setting, seeds column, metric, Estimate) for each setting and metric against the reference setting; and the
reference setting's name."""


def load_row(path: str, task: str, name: str = "") -> Row:
    from evals.results_store import HELD_OUT_FILE, SAMPLES_FILE, find_results
    from models.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    done = [s for s in find_results(ckpt) if s.complete]
    scored = [s for s in done if any(k.startswith(f"{task}/") for k in s.summary.get("metrics", {}))]
    with_held = [s for s in done if s.held_out_path.is_file()]
    main = (scored or with_held or [None])[0]
    if main is None:
        raise FileNotFoundError(f"{ckpt} holds no complete evaluation (evals/*/eval_results.json)")
    held = main if main in with_held else (with_held or [None])[0]
    metrics = {**(held.summary["metrics"] if held is not None else {}), **main.summary["metrics"]}
    evaluation = main.key if held in (None, main) else f"{main.key} + {held.key}"
    return Row(name or Path(path).name, _loss_name(ckpt), ckpt, metrics, (main.json(SAMPLES_FILE) or {}).get(task),
               held.json(HELD_OUT_FILE) if held is not None else None, evaluation)  # fmt: skip


def _loss_name(ckpt: Path) -> str:
    from omegaconf import OmegaConf

    if not (ckpt / "config.yaml").is_file():
        return "—"
    loss = OmegaConf.load(ckpt / "config.yaml").loss
    return f"{loss.name}" + (f" (alpha {loss.alpha})" if loss.name == "pdl" else "")


def rarity_parts(outputs: list[str], tokenizer: Any, counts: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per output: the summed -log p of its tokens and their number, with ``evals.generation``'s add-one smoothed
    relative training frequency (their pooled ratio is ``mean_token_rarity``)."""
    counts = np.asarray(counts, dtype=np.float64)
    log_p = np.log(counts + 1.0) - math.log(counts.sum() + len(counts))  # [V]
    ids = tokenizer.encode_batch(list(outputs)) if outputs else []
    return np.array([-log_p[i].sum() for i in ids]), np.array([float(len(i)) for i in ids])


JACKKNIFED = ("distinct1", "distinct2")
"""Metrics whose intervals come from the delete-1 jackknife over the prompts (``evals/compare/stats.py``
``jackknife_estimate``), not from the bootstrap."""


def statistics(row: Row, tokenizer: Any, counts: Any) -> dict[str, Callable[[np.ndarray], float]]:
    """Each bootstrapped metric of a row as a function of the drawn prompts (only the metrics its samples allow)."""
    s = row.samples or {}
    out: dict[str, Callable[[np.ndarray], float]] = {}
    for c in ("rouge1", "rouge2", "rougeL", "length", "degenerate"):
        if c in s:
            values = np.asarray(s[c], dtype=np.float64)
            out[c] = lambda idx, v=values: float(v[idx].mean())
    outputs = s.get("output")
    if outputs is not None and tokenizer is not None and counts is not None:
        r, n = rarity_parts(outputs, tokenizer, counts)
        out["rarity"] = lambda idx, r=r, n=n: float(r[idx].sum() / n[idx].sum()) if n[idx].sum() else math.nan
    return out


def jackknifed(row: Row) -> dict[str, tuple[float, np.ndarray]]:
    """Each jackknifed metric of a row: its value over every prompt and its [n] values with each prompt left out."""
    from evals.generation_metrics import distinct_n, distinct_n_left_out

    outputs = (row.samples or {}).get("output")
    if outputs is None:
        return {}
    n_of = {"distinct1": 1, "distinct2": 2}
    return {c: (distinct_n(outputs, n_of[c]), np.asarray(distinct_n_left_out(outputs, n_of[c]))) for c in JACKKNIFED}


def table(rows: list[Row], reference: str, task: str, primary: str = "",
          margin: float = 0.0) -> tuple[list[str], SettingDiffs | None]:  # fmt: skip
    """The value of each metric per row with its 95% interval, then each row minus the reference row, then each
    loss setting minus the reference setting; with a declared ``primary`` metric (and its equivalence ``margin``)
    its setting-by-setting verdicts come first."""
    from evals.compare.stats import holm, jackknife_estimate, percentile_estimate, prompt_bootstrap, verdict
    from models.checkpoint import COUNTS_FILE, checkpoint_tokenizer, saved_model_config
    from models.checkpoint_files import load_safetensors

    ref = next(r for r in rows if r.name == reference)
    tokenizer = checkpoint_tokenizer(ref.ckpt, saved_model_config(ref.ckpt))
    counts = load_safetensors(ref.ckpt / COUNTS_FILE)["token_counts"].numpy() if (
        ref.ckpt / COUNTS_FILE).is_file() else None  # fmt: skip
    ids = {json.dumps((r.samples or {}).get("doc_id")) for r in rows}
    paired = len(ids) == 1 and ref.samples is not None
    n = len(ref.samples["doc_id"]) if ref.samples else 0
    stats = {r.name: statistics(r, tokenizer, counts) for r in rows}
    jack = {r.name: jackknifed(r) for r in rows}
    keys = [(r.name, c) for r in rows for c in COLUMNS if c in stats[r.name]]
    boot = prompt_bootstrap([stats[r][c] for r, c in keys], n, N_BOOT) if paired and keys else None
    col = {k: i for i, k in enumerate(keys)}
    everything = np.arange(n)

    lines = [f"| run | loss | {' | '.join(COLUMNS)} | prompts |", "|---" * (len(COLUMNS) + 3) + "|"]
    for r in rows:
        cells = []
        for c in COLUMNS:
            if c in stats[r.name] and boot is not None:
                value = stats[r.name][c](everything)
                lo, hi = np.nanquantile(boot[:, col[(r.name, c)]], [0.025, 0.975])
                cells.append(f"{value:.4f} [{lo:.4f}, {hi:.4f}]")
            elif c in jack[r.name] and paired:
                e = jackknife_estimate(*jack[r.name][c], "prompt jackknife")
                cells.append(f"{e.diff:.4f} [{e.lo:.4f}, {e.hi:.4f}]")
            else:
                value = r.metrics.get(f"{task}/{c}")
                cells.append("—" if value is None else f"{value:.4f} (no per-prompt data)")
        prompts = len(r.samples["doc_id"]) if r.samples else "?"
        lines.append(f"| {r.name} | {r.loss} | " + " | ".join(cells) + f" | {prompts} |")
    lines.append("\n[95% interval]: percentiles of 2,000 resamples of the prompts; for distinct-n, which a resample "
                 "distorts (a prompt drawn twice repeats all its n-grams, so every resample's value would sit below "
                 "the sample's), the delete-1 jackknife over the prompts (t on n - 1 degrees of freedom).")  # fmt: skip
    reference_rarity = ref.metrics.get(f"{task}/rarity_reference")
    if reference_rarity is not None:
        lines.append(f"Rarity of the reference replies: {reference_rarity:.4f} (mean -log relative training frequency "
                     f"under `{ref.name}`'s counts).")  # fmt: skip
    if not paired or (boot is None and not jack[ref.name]):
        lines.append("\nNo paired differences: the rows were not scored on the same prompts, or saved no per-prompt "
                     "values.")  # fmt: skip
        return lines, None
    found = []
    for r in rows:
        if r.name == ref.name:
            continue
        for c in COLUMNS:
            if (r.name, c) in col and (ref.name, c) in col:
                value = stats[r.name][c](everything) - stats[ref.name][c](everything)
                diff = boot[:, col[(r.name, c)]] - boot[:, col[(ref.name, c)]]
                found.append((r.name, c, percentile_estimate(value, diff, "paired prompt bootstrap", n)))
            elif c in jack[r.name] and c in jack[ref.name]:  # both without the same prompt
                (a, a_out), (b, b_out) = jack[r.name][c], jack[ref.name][c]
                found.append((r.name, c, jackknife_estimate(a - b, a_out - b_out, "paired prompt jackknife")))
    adjusted = holm([e.p for *_, e in found])
    lines += ["", f"Differences to `{ref.name}` (paired over the same {n} prompts; p-values Holm-adjusted over the "
              f"{len(found)} differences of this table; verdicts where the metric has a better direction):", "",
              "| run | metric | Δ | 95% interval | p | p (Holm) | verdict |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for (name, c, e), p in zip(found, adjusted, strict=True):
        word = "—"
        if c in DIRECTION:
            word = verdict(e, 0.0, lower_is_better=DIRECTION[c] < 0, p=p).word
        pv = "< 0.001" if e.p < 0.001 else f"{e.p:.3f}"
        lines.append(f"| {name} | {c} | {e.diff:+.4f} | [{e.lo:+.4f}, {e.hi:+.4f}] | {pv} | {p:.3f} | {word} |")
    diffs = setting_differences(rows, reference, (tokenizer, counts))
    first, secondary = loss_table(diffs, primary, margin)
    return first + ([""] if first else []) + lines + secondary, diffs


SEEDED = re.compile(r"(?P<group>.+)-s(?P<seed>\d+)")
"""A run named ``GROUP-sSEED`` (``scripts/run_grid.sh``): seed SEED of the loss setting GROUP."""


def per_run(row: Row, rarity: tuple[Any, Any]) -> dict[str, tuple[str, Any]]:
    """Each metric of one run for the loss-level comparison: ``("prompts", [n] values)`` for a mean over prompts,
    ``("jackknife", (value, [n] values with each prompt left out))`` for a corpus-level number."""
    s = row.samples or {}
    means = [c for c in ("rouge1", "rouge2", "rougeL", "length", "degenerate") if c in s]
    out: dict[str, tuple[str, Any]] = {c: ("prompts", np.asarray(s[c], dtype=np.float64)) for c in means}
    out.update({c: ("jackknife", v) for c, v in jackknifed(row).items()})
    if s.get("output") is not None and rarity[0] is not None and rarity[1] is not None:
        r, n = rarity_parts(s["output"], *rarity)
        if n.sum() > 0 and (n.sum() - n > 0).all():
            out["rarity"] = ("jackknife", (float(r.sum() / n.sum()), (r.sum() - r) / (n.sum() - n)))
    return out


def settings(rows: list[Row], reference: str) -> tuple[dict[str, dict[int, Row]], str] | None:
    """The rows by loss setting (runs named ``GROUP-sSEED``; another row is a setting of its own with seed -1)
    and the reference row's setting; None unless that setting has two seeds or more."""
    groups: dict[str, dict[int, Row]] = {}
    for r in rows:
        m = SEEDED.fullmatch(r.name)
        groups.setdefault(m["group"] if m else r.name, {})[int(m["seed"]) if m else -1] = r
    m = SEEDED.fullmatch(reference)
    ref_group = m["group"] if m else reference
    return (groups, ref_group) if len(groups[ref_group]) >= 2 else None


def pairing(seeds: list[int], ref_seeds: list[int]) -> tuple[list[int], list[int], bool, str]:
    """Which runs of a setting and of the reference setting to compare: the seeds both have, paired; a setting
    of one model and no seed (the model before fine-tuning) against every reference seed, paired; else all of
    each, unpaired (Welch). Also the seeds column's text."""
    if seeds == [-1]:
        return [-1] * len(ref_seeds), sorted(ref_seeds), True, "1 (no seed)"
    both = sorted(set(seeds) & set(ref_seeds))
    if both:
        return both, both, True, str(len(both))
    return sorted(seeds), sorted(ref_seeds), False, f"{len(seeds)} vs {len(ref_seeds)}"


ONE_SEED = "— (one seed a side)"


def _judged(found: list[tuple[str, str, str, Any]], lower_is_better: dict[str, bool]) -> list[tuple[float, str]]:
    """(Holm-adjusted p, verdict word) of each (setting, seeds, metric, estimate), Holm over them all; "—" for a
    metric without a better direction. A comparison with one seed a side gets no verdict: its interval holds the
    prompts' spread alone (docs/statistics.md)."""
    from evals.compare.stats import holm, verdict

    out = []
    for (_, _, c, e), p in zip(found, holm([e.p for *_, e in found]), strict=True):
        word = verdict(e, 0.0, lower_is_better=lower_is_better[c], p=p).word if c in lower_is_better else "—"
        out.append((p, ONE_SEED if max(e.seeds) < 2 else word))
    return out


def _primary_judged(e: Any, primary: str, margin: float) -> tuple[Any, str]:
    """The primary metric's verdict (TOST against ±``margin``, at the estimate's own p) and its word."""
    from evals.compare.stats import verdict

    v = verdict(e, margin, lower_is_better=DIRECTION[primary] < 0)
    return v, ONE_SEED if max(e.seeds) < 2 else v.word


def decided(diffs: SettingDiffs, primary: str = "", margin: float = 0.0) -> set[tuple[str, str]]:
    """The (setting, metric) pairs the settings' tables call better or worse (``loss_table``)."""
    found = diffs[0]
    secondary = [f for f in found if f[2] != primary]
    words = {(n, c): _primary_judged(e, primary, margin)[1] for n, _, c, e in found if c == primary}
    lower = {c: d < 0 for c, d in DIRECTION.items()}
    words |= {(n, c): w for (n, _, c, _), (_, w) in zip(secondary, _judged(secondary, lower), strict=True)}
    return {k for k, w in words.items() if w.startswith(("better", "worse"))}


def _verdict_rows(found: list[tuple[str, str, str, Any]], lower_is_better: dict[str, bool],
                  show: Callable[[Any], tuple[str, str]]) -> list[str]:  # fmt: skip
    """One table row per (setting, seeds, metric, estimate), Holm-adjusted over them (``_judged``); ``show``
    renders Δ and its interval."""
    out = []
    for (name, k, c, e), (p, word) in zip(found, _judged(found, lower_is_better), strict=True):
        pv = "< 0.001" if e.p < 0.001 else f"{e.p:.3f}"
        delta, interval = show(e)
        out.append(f"| {name} | {k} | {c} | {delta} | {interval} | {pv} | {p:.3f} | {word} |")
    return out


def setting_differences(rows: list[Row], reference: str, rarity: tuple[Any, Any]) -> SettingDiffs | None:
    """Each loss setting's seed mean against the reference row's setting (``settings``, ``pairing``): per-prompt
    means through ``seeds_t`` (the seeds through t, the prompts through the bootstrap), corpus-level numbers
    through ``seeds_jackknife`` (the prompts through the jackknife). None unless the reference setting has two
    seeds or more."""
    from evals.compare.stats import Paired, seeds_jackknife, seeds_t

    grouped = settings(rows, reference)
    if grouped is None:
        return None
    groups, ref_group = grouped
    values = {name: {seed: per_run(r, rarity) for seed, r in g.items()} for name, g in groups.items()}
    ref_runs = values[ref_group]
    found = []
    for name, runs in values.items():
        if name == ref_group:
            continue
        a_seeds, b_seeds, paired, k = pairing(sorted(runs), sorted(ref_runs))
        for c in COLUMNS:
            if not all(c in runs[s] for s in a_seeds) or not all(c in ref_runs[s] for s in b_seeds):
                continue
            if ref_runs[b_seeds[0]][c][0] == "prompts":
                a = np.stack([runs[s][c][1] for s in a_seeds])  # [ka, n]
                b = np.stack([ref_runs[s][c][1] for s in b_seeds])
                e = seeds_t(Paired.of(a, b, paired=paired))
            else:
                a, a_left = zip(*(runs[s][c][1] for s in a_seeds), strict=True)
                b, b_left = zip(*(ref_runs[s][c][1] for s in b_seeds), strict=True)
                e = seeds_jackknife(a, np.stack(a_left), b, np.stack(b_left), paired=paired)
            found.append((name, k, c, e))
    return found, ref_group


def loss_table(diffs: SettingDiffs | None, primary: str = "", margin: float = 0.0) -> tuple[list[str], list[str]]:
    """The settings' differences (``setting_differences``) as tables: (the declared ``primary`` metric's, with TOST
    against ``margin`` and no adjustment; the other metrics', Holm over it)."""
    if diffs is None:
        none = ["", f"**Primary metric: `{primary}`** (equivalence margin ±{margin:g}): no verdict — the reference "
                "setting has fewer than two seeds, so no interval can hold the seeds' spread; the run-by-run "
                "differences below describe single runs."]  # fmt: skip
        return (none if primary else []), []
    found, ref_group = diffs
    first = primary_table([f for f in found if f[2] == primary], ref_group, primary, margin) if primary else []
    found = [f for f in found if f[2] != primary]
    if not found:
        return first, []
    what = "the other metrics (secondary)" if primary else "every metric"
    head = ["", f"**Loss settings** (runs `SETTING-sSEED`), {what}: the mean over each setting's seeds minus "
            f"`{ref_group}`'s, seeds paired by number; the interval takes the seeds' spread through t and the prompts' "
            "through the bootstrap (means over prompts) or the jackknife (distinct-n, rarity); p-values Holm-adjusted "
            f"over the {len(found)} differences of this table:", "",
            "| setting | seeds | metric | Δ | 95% interval | p | p (Holm) | verdict |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lower = {c: d < 0 for c, d in DIRECTION.items()}
    return first, head + _verdict_rows(found, lower, lambda e: (f"{e.diff:+.4f}", f"[{e.lo:+.4f}, {e.hi:+.4f}]"))


def primary_table(found: list[tuple[str, str, str, Any]], ref_group: str, primary: str, margin: float) -> list[str]:
    """The declared primary metric, setting by setting against the reference setting: the 95% interval, the 90%
    one of the equivalence test (TOST against ±``margin``) and the verdict at the estimate's own p — the one
    declared metric is not adjusted for multiplicity (docs/statistics.md)."""
    lines = ["", f"**Primary metric: `{primary}`**, declared before the comparison with its equivalence margin "
             f"±{margin:g}: the mean over each setting's seeds minus `{ref_group}`'s, seeds paired by number (the "
             "seeds' spread through t, the prompts' through the bootstrap or the jackknife); *equivalent* when the "
             "90% interval lies inside the margin, *better*/*worse* when the 95% one excludes 0, else "
             "*inconclusive*; not adjusted for multiplicity (the one declared metric). MDE: the smallest true "
             "difference this comparison finds significant with 80% probability; power: its probability of finding "
             "a true difference as large as the margin.", "",
             "| setting | seeds | Δ | 95% interval | 90% interval | p | p (TOST) | MDE (80%) | power at the margin "
             "| verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, k, _, e in found:
        v, word = _primary_judged(e, primary, margin)
        p = "< 0.001" if e.p < 0.001 else f"{e.p:.3f}"
        lines.append(f"| {name} | {k} | {e.diff:+.4f} | [{e.lo:+.4f}, {e.hi:+.4f}] | [{e.lo90:+.4f}, {e.hi90:+.4f}] "
                     f"| {p} | {v.p_tost:.3f} | {e.mde():.4f} | {e.power(margin):.2f} | **{word}** |")  # fmt: skip
    if not found:
        lines.append(f"| — | — | no setting besides `{ref_group}` has `{primary}` | | | | | | | |")
    return lines


def bucket_loss_table(rows: list[Row], reference: str) -> list[str]:
    """The held-out response loss by frequency bucket, setting by setting (``settings``, ``pairing``): each
    setting's seed mean against the reference setting's through ``seeds_t`` (seeds through t, records through
    the bootstrap), shown as the change of the perplexity; Holm over the table. Empty unless every run scored
    the same records with the same token counts."""
    from evals.compare.stats import Paired, seeds_t

    grouped = settings([r for r in rows if r.held_out is not None and "loss" in r.held_out], reference)
    if grouped is None:
        return []
    groups, ref_group = grouped
    ref_runs = groups[ref_group]
    first = next(iter(ref_runs.values())).held_out

    def same(r: Row) -> bool:  # the reference's records, with the same tokens in each bucket
        return r.held_out.get("sha", r.held_out["doc_id"]) == first.get("sha", first["doc_id"]) and all(
            r.held_out[c.replace("loss", "tokens")] == first[c.replace("loss", "tokens")] for c in BUCKET_COLUMNS
        )

    # a setting scored on other records (or with other counts) cannot be paired with the reference: it is named and
    # left out, never dropped silently (the model before fine-tuning once was, scored on a held-out set of its own)
    apart = [name for name, g in groups.items() if not all(same(r) for r in g.values())]
    note = [] if not apart else ["", "Left out of the setting-by-setting perplexity table, scored on other held-out "
                                 f"records (or counts) than `{ref_group}`: " + ", ".join(f"`{n}`" for n in apart)
                                 + "."]  # fmt: skip
    if ref_group in apart:
        return note
    found = []
    for name, runs in groups.items():
        if name == ref_group or name in apart:
            continue
        a_seeds, b_seeds, paired, k = pairing(sorted(runs), sorted(ref_runs))
        for c in BUCKET_COLUMNS:
            den = np.asarray(first[c.replace("loss", "tokens")], dtype=np.float64)
            if not den.sum():
                continue
            a = np.stack([np.asarray(runs[s].held_out[c], dtype=np.float64) for s in a_seeds])  # [ka, n]
            b = np.stack([np.asarray(ref_runs[s].held_out[c], dtype=np.float64) for s in b_seeds])
            found.append((name, k, c.replace("loss", "ppl"), seeds_t(Paired.of(a, b, den, paired=paired))))
    if not found:
        return note
    head = ["", f"Held-out perplexity by bucket, **setting by setting**: the change of each setting's perplexity "
            f"(from the mean over its seeds of the loss, nats/token) against `{ref_group}`'s, seeds paired by "
            "number, the interval taking the seeds' spread through t and the records' through the bootstrap; "
            f"p-values Holm-adjusted over the {len(found)} differences of this table:", "",
            "| setting | seeds | bucket | Δ ppl | 95% interval | p | p (Holm) | verdict |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def pct(x: float) -> str:
        return f"{100 * math.expm1(x):+.2f}%"

    lower = {c.replace("loss", "ppl"): True for c in BUCKET_COLUMNS}
    return head + _verdict_rows(found, lower, lambda e: (pct(e.diff), f"[{pct(e.lo)}, {pct(e.hi)}]")) + note


BUCKET_COLUMNS = ("loss", "high_loss", "medium_loss", "low_loss")


def bucket_table(rows: list[Row], reference: str) -> list[str]:
    """Held-out perplexity (response perplexity on held-out records) by training-frequency bucket, each with a 95%
    interval from resampling the documents or records, and each row's change against the reference row (paired
    over the same documents)."""
    from evals.compare.stats import Paired, two_level

    have = [r for r in rows if r.held_out is not None and "loss" in r.held_out]
    if not have:
        return []
    ref = next((r for r in have if r.name == reference), have[0])
    out = ["Held-out perplexity (of the responses, for fine-tuning records) by frequency bucket of the training "
           "counts (high: the tokens of "
           "the first 80% of occurrences, medium: the next 15%, low: the last 5%), with a 95% interval from resampling "
           "the records; Δ: the change of the perplexity against "
           f"`{ref.name}` (paired over the same records), 95% interval:", "",
           "| run | " + " | ".join(c.replace("loss", "ppl") for c in BUCKET_COLUMNS) + " | records | "
           + " | ".join(f"Δ {c.replace('loss', 'ppl')}" for c in BUCKET_COLUMNS) + " |",
           "|---" * (2 * len(BUCKET_COLUMNS) + 2) + "|"]  # fmt: skip
    rng = np.random.default_rng(0)
    for r in have:
        h = r.held_out
        cells, deltas = [], []
        for c in BUCKET_COLUMNS:
            den_key = c.replace("loss", "tokens")
            num, den = np.asarray(h[c], dtype=np.float64), np.asarray(h[den_key], dtype=np.float64)
            if not den.sum():
                cells.append("—")
                deltas.append("—")
                continue
            counts = rng.multinomial(len(num), np.full(len(num), 1 / len(num)), size=N_BOOT).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                reps = np.exp((counts @ num) / (counts @ den))
            lo, hi = np.nanquantile(reps, [0.025, 0.975])
            cells.append(f"{math.exp(num.sum() / den.sum()):.4g} [{lo:.4g}, {hi:.4g}]")
            same = r is not ref and ref.held_out.get("sha", ref.held_out["doc_id"]) == h.get("sha", h["doc_id"]) and (
                ref.held_out[den_key] == h[den_key])  # fmt: skip
            if same:
                e = two_level(Paired.of(num, np.asarray(ref.held_out[c], dtype=np.float64), den))
                deltas.append(f"{100 * math.expm1(e.diff):+.2f}% [{100 * math.expm1(e.lo):+.2f}, "
                              f"{100 * math.expm1(e.hi):+.2f}]")  # fmt: skip
            else:
                deltas.append("—")
        out.append(f"| {r.name} | " + " | ".join(cells) + f" | {len(h['doc_id'])} | " + " | ".join(deltas) + " |")
    return out


def run_dirs(paths: list[str]) -> list[str]:
    """Each argument is a run or checkpoint directory, or a directory of runs (its runs, by name)."""
    out = []
    for p in map(Path, paths):
        runs = []
        if p.is_dir() and not (p / "checkpoints").is_dir() and not (p / "meta.json").is_file():
            runs = sorted(str(d) for d in p.iterdir() if (d / "checkpoints").is_dir())
        out.extend(runs or [str(p)])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run (or checkpoint) directories, or a directory of runs")
    parser.add_argument("--task", default="shakespeare_dialogue")
    parser.add_argument("--baseline", default="", help="the model before fine-tuning (a checkpoint or run), first row")
    parser.add_argument("--reference", default="", help="the row the differences are against (default: first run)")
    parser.add_argument("--no-buckets", action="store_true", help="leave out the held-out perplexity bucket table")
    parser.add_argument("--primary", default="", choices=["", *DIRECTION],
                        help="the study's declared primary metric: its setting-by-setting verdicts first, unadjusted; "
                        "the other metrics Holm-corrected apart")  # fmt: skip
    parser.add_argument("--margin", type=float, default=0.0, help="with --primary: its equivalence margin (> 0)")
    parser.add_argument("--plot", type=Path, help="a PNG of the loss settings' differences, a panel per metric")
    args = parser.parse_args(argv)
    if args.primary and not args.margin > 0:
        return fail(f"--primary {args.primary} needs its equivalence margin: --margin M with M > 0")
    from models.checkpoint_files import CheckpointError

    try:
        rows = [load_row(args.baseline, args.task, "before fine-tuning")] if args.baseline else []
        runs = run_dirs(args.runs)
        rows += [load_row(r, args.task) for r in runs]
        names = [r.name for r in rows]
        if len(set(names)) != len(names):
            return fail(f"two rows share a name ({names}): give run directories with different names")
        reference = args.reference or Path(runs[0]).name
        if reference not in names:
            return fail(f"--reference {reference!r} is not one of the rows {names}")
        lines, diffs = table(rows, reference, args.task, args.primary, args.margin)
        buckets = [] if args.no_buckets else bucket_table(rows, reference) + bucket_loss_table(rows, reference)
    except (CheckpointError, FileNotFoundError, KeyError) as e:
        return fail(e)
    if args.plot:
        from evals.compare.generation_plot import plot_settings

        losses = {(m["group"] if (m := SEEDED.fullmatch(r.name)) else r.name): r.loss for r in rows}
        drawn = diffs is not None and plot_settings(
            *diffs, losses, DIRECTION, decided(diffs, args.primary, args.margin), args.plot, args.task, args.primary,
            args.margin)  # fmt: skip
        if not drawn:
            args.plot.unlink(missing_ok=True)  # an old figure would not be this table's
            get_logger("scripts").warning(f"no figure: {args.plot} needs two seeds or more of the reference setting")
    sources = ["", "Evaluations (CKPT/evals/...): " + "; ".join(f"{r.name}: `{r.evaluation}`" for r in rows)]
    print("\n".join(lines + (["", *buckets] if buckets else []) + sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
