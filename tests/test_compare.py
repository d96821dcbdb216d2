from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from evals.compare.stats import Paired, seeds_t
from evals.generation import write_generation_task
from evals.results_store import HELD_OUT_FILE, SAMPLES_FILE, find_results, latest
from evals.tasks import write_multiple_choice_task
from tests.conftest import debug_overrides
from tests.faults import as_args, sigterm_at
from tests.test_train import REPO, clean_env
from trainer.callbacks import run_names
from trainer.config import load_config
from trainer.loop import train


def _md_tables(md: str) -> dict[str, dict[str, dict[str, str]]]:
    """summary.md -> {section title: {row label: {column: cell}}}."""
    tables, title, header = {}, "", []
    for line in md.splitlines():
        if line.startswith("## "):
            title, header = line[3:], []
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not header:
                header = cells
            else:
                tables.setdefault(title, {})[cells[0]] = dict(zip(header, cells, strict=True))
    return tables


@pytest.fixture(scope="module")
def study(corpus, dist_env, tmp_path_factory):
    """Three short runs (CE seeds 0 and 1, MiLe seed 0) with a downstream task, the in-loop per-domain
    evaluation and a domain the held-out data lack, shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("study")
    # two and three choices: chance is the mean of 1/choices over the task's documents
    docs = [{"context": "The king loves", "choices": [" the crown", " zzz", " qq"][: 2 + i % 2], "label": i % 2}
            for i in range(6)]  # fmt: skip
    write_multiple_choice_task(tmp_path / "tasks", "toy_mc", docs)
    prompts = ["The king loves", "A fool fears", "My lord serves", "The duke betrays", "Her father", "The queen"]
    write_generation_task(tmp_path / "tasks", "toy_gen", [{"prompt": p, "response": "the crown in the morning."}
                          for p in prompts], until=["."], max_gen_toks=8)  # fmt: skip
    runs = []
    for loss, seed in (("ce", 0), ("ce", 1), ("mile", 0)):
        run_dir = tmp_path / f"{loss}-s{seed}"
        extra = {"loss.name": loss, "train.seed": seed, "train.max_steps": 8, "train.log_every": 2,
                 "checkpoint.every": 4, "eval.every_checkpoint": "true", "eval.tasks": "[toy_mc,toy_gen]",
                 "eval.task_dir": str(tmp_path / "tasks"), "eval.val_every": 4, "eval.val_tokens": 1500,
                 "eval.val_tokens_per_domain": 300, "eval.val_domains": "[Plays,Poems,Letters]"}  # fmt: skip
        train(load_config(None, debug_overrides(corpus, run_dir, **extra)))
        runs.append(run_dir)
    return tmp_path, runs, docs


def _compare(runs: list[Path], out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/compare_runs.py", *map(str, runs), "--out", str(out), *extra],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)  # fmt: skip


def test_every_run_scores_the_same_stratified_held_out_set(study):
    _, runs, _ = study
    sets = [json.loads((r / "held_out_set.json").read_text()) for r in runs]
    assert all(s["documents"] == sets[0]["documents"] and s["identity"] == sets[0]["identity"] for s in sets)
    assert set(sets[0]["domains"]) == {"Plays", "Poems"} and sets[0]["missing"] == ["Letters"]
    held = [latest(r / "checkpoints/step_0000008").json(HELD_OUT_FILE) for r in runs]
    assert all(h["sha"] == held[0]["sha"] and h["set"]["identity"] == sets[0]["identity"] for h in held)
    # per-domain losses use every sampled document of the domain: the in-loop evaluation at the last step (the
    # same set, the same windows) equals the checkpoint's per-document sums
    rows = [json.loads(x) for x in (runs[2] / "metrics.jsonl").read_text().splitlines()]
    inloop = [x for x in rows if "eval_domain/Plays/loss" in x][-1]
    for domain in ("Plays", "Poems"):
        mine = [i for i, d in enumerate(held[2]["domain"]) if d == domain]
        assert {held[2]["sha"][i] for i in mine} == {d["sha"] for d in sets[2]["documents"] if d["domain"] == domain}
        loss = sum(held[2]["loss"][i] for i in mine) / sum(held[2]["tokens"][i] for i in mine)
        assert loss == pytest.approx(inloop[f"eval_domain/{domain}/loss"], rel=1e-5)


def test_compare_runs_reports_every_number_with_intervals_and_verdicts(study):
    tmp_path, runs, docs = study
    out = tmp_path / "report"
    proc = _compare(runs, out, "--contrast", "ce:mile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = ("training_curves.png", "heldout_curves.png", "differences.png", "bucket_change.png", "downstream.png",
               "downstream_curves.png")  # fmt: skip
    for png in figures:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    md, table = (out / "summary.md").read_text(), (out / "summary.csv").read_text()
    for text in (md, table, (out / "curves.csv").read_text()):
        assert str(tmp_path) not in text and str(REPO) not in text  # no absolute path in any report file

    # the runs' own numbers, read here from their files
    rows = {r.name: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in runs}
    ckpt = "checkpoints/step_0000008"
    evals = {r.name: latest(r / ckpt).summary["metrics"] for r in runs}
    held = {r.name: latest(r / ckpt).json(HELD_OUT_FILE) for r in runs}
    with open(out / "summary.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    per_run = {(c["group"], c["seed"], c["metric"]): float(c["value"]) for c in csv_rows if c["kind"] == "run"}
    for r, (group, seed) in zip(runs, (("ce", "0"), ("ce", "1"), ("mile-g1", "0")), strict=True):
        train_rows = [x for x in rows[r.name] if "ce" in x]
        assert per_run[(group, seed, "train/final_ce")] == pytest.approx(train_rows[-1]["ce"], rel=1e-12)
        assert per_run[(group, seed, "eval/toy_mc/acc")] == pytest.approx(evals[r.name]["toy_mc/acc"], rel=1e-12)
        assert per_run[(group, seed, "heldout/ce")] == pytest.approx(evals[r.name]["bucket/loss"], rel=1e-12)
        assert per_run[(group, seed, "heldout/low")] == pytest.approx(evals[r.name]["bucket/low_loss"], rel=1e-12)
        h = held[r.name]
        poems = [i for i, d in enumerate(h["domain"]) if d == "Poems"]
        assert per_run[(group, seed, "domain/Poems")] == pytest.approx(
            sum(h["loss"][i] for i in poems) / sum(h["tokens"][i] for i in poems), rel=1e-12)  # fmt: skip
    # downstream scores at every evaluated checkpoint (steps 4 and 8), against tokens, as the runs logged them
    with open(out / "curves.csv") as fh:
        curve = [c for c in csv.DictReader(fh) if c["series"] == "downstream" and c["metric"] == "eval/toy_mc/acc"]
    for r in runs:
        logged = [x for x in rows[r.name] if "eval/toy_mc/acc" in x]
        tokens = {x["step"]: x["tokens"] for x in rows[r.name] if "tokens" in x}
        mine = [(float(c["tokens"]), float(c["value"])) for c in curve if c["run"].endswith(r.name)]
        assert mine == [(tokens[x["step"]], x["eval/toy_mc/acc"]) for x in logged] and len(mine) == 2
    chance = [c for c in csv_rows if c["kind"] == "chance"]
    assert float(chance[0]["value"]) == pytest.approx(sum(1 / len(d["choices"]) for d in docs) / len(docs))

    # differences: recomputed here from the per-document files with the interval's own function
    diffs = {(c["contrast"], c["metric"]): c for c in csv_rows if c["kind"] == "diff"}
    for metric, num, den in (("heldout/ce", "loss", "tokens"), ("heldout/low", "low_loss", "low_tokens")):
        a, b = held["mile-s0"], [held["ce-s0"], held["ce-s1"]]
        expect = seeds_t(Paired.of([a[num]], [x[num] for x in b], a[den], strata=a["domain"]))
        row = diffs[("mile-g1 − ce", metric)]
        assert (float(row["value"]), float(row["lo"]), float(row["hi"])) == pytest.approx(
            (expect.diff, expect.lo, expect.hi), rel=1e-9)  # fmt: skip
        assert row["method"].startswith("t over 1 vs 2 seeds")
    # the requested contrast: the reverse, the same interval mirrored
    fwd, back = diffs[("mile-g1 − ce", "heldout/ce")], diffs[("ce − mile-g1", "heldout/ce")]
    assert float(back["value"]) == pytest.approx(-float(fwd["value"])) and back["requested"] == "True"
    assert (float(back["lo"]), float(back["hi"])) == pytest.approx((-float(fwd["hi"]), -float(fwd["lo"])), rel=1e-6)
    # secondary metrics: Holm-adjusted p never below the raw p, verdict words from the declared set
    secondary = [c for c in csv_rows if c["kind"] == "diff" and c["primary"] == "False"]
    assert secondary and all(float(c["p_holm"]) >= float(c["p"]) for c in secondary if c["p"] != "nan")
    words = ("better", "worse", "inconclusive", "no information", "equivalent within ±0.01")
    assert all(c["verdict"].startswith(words) for c in csv_rows if c["kind"] == "diff")

    tables = _md_tables(md)
    primary = tables["Primary: held-out ce"]["mile-g1 − ce"]
    assert (
        primary["verdict"].strip("*") == fwd["verdict"] and primary["Δ (nats/token)"] == f"{float(fwd['value']):+.4f}"
    )
    assert "one seed per group" not in primary["notes"] and "effective documents" in primary["notes"]
    assert "No held-out document for Letters" in md and "## Held-out set" in md
    assert "## The paper's effects beside ours" in md  # MiLe against CE: the paper's bucket effects and our power
    every = tables["Every run's numbers"]
    assert every["held-out ce"]["mile-g1 s0"] == f"{evals['mile-s0']['bucket/loss']:.4f}"


def test_generation_table_has_per_prompt_intervals_and_the_model_before_fine_tuning(study):
    from evals.compare.stats import prompt_bootstrap
    from evals.generation_metrics import distinct_n

    _, runs, _ = study
    before = runs[0] / "checkpoints/step_0000004"  # stands for the model before fine-tuning: an earlier checkpoint
    proc = subprocess.run([sys.executable, "scripts/generation_table.py", *map(str, runs), "--task", "toy_gen",
                           "--baseline", str(before)], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = _md_tables("## t\n" + proc.stdout.split("\n\n")[0])["t"]
    assert list(tables) == ["before fine-tuning", "ce-s0", "ce-s1", "mile-s0"]
    ckpt = "checkpoints/step_0000008"
    evals = {r.name: latest(r / ckpt).summary["metrics"] for r in runs}
    samples = {r.name: latest(r / ckpt).json(SAMPLES_FILE)["toy_gen"] for r in runs}
    for name in ("ce-s0", "mile-s0"):
        cell = lambda c, name=name: float(tables[name][c].split(" [")[0])  # noqa: E731
        lo, hi = (float(x) for x in tables[name]["rouge1"].split(" [")[1].rstrip("]").split(", "))
        assert cell("rouge1") == pytest.approx(evals[name]["toy_gen/rouge1"], abs=6e-5) and lo <= cell("rouge1") <= hi
        assert cell("distinct1") == pytest.approx(evals[name]["toy_gen/distinct1"], abs=6e-5)  # the saved outputs
        assert cell("distinct2") == pytest.approx(distinct_n(samples[name]["output"], 2), abs=6e-5)
    # rarity under the reference run's own counts is the evaluation's own number
    assert float(tables["ce-s0"]["rarity"].split(" [")[0]) == pytest.approx(evals["ce-s0"]["toy_gen/rarity"], abs=6e-5)
    # the paired difference to the reference (ce-s0) on the same resampled prompts, recomputed here
    a, b = (np.array(samples[n]["rouge1"]) for n in ("mile-s0", "ce-s0"))
    n = len(a)
    boot = prompt_bootstrap([lambda i: a[i].mean(), lambda i: b[i].mean()], n, 2000)
    # the script draws its resamples for every statistic of the table at once; the same seed gives the same prompts
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| mile-s0 | rouge1 |"))
    delta, interval = row.split(" | ")[2], row.split(" | ")[3]
    assert float(delta) == pytest.approx(a.mean() - b.mean(), abs=6e-5)
    lo, hi = (float(x) for x in interval.strip("[]").split(", "))
    ref_lo, ref_hi = np.quantile(boot[:, 0] - boot[:, 1], [0.025, 0.975])
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi), abs=6e-5)
    # distinct-n: the delete-1 jackknife over the prompts, centred on the value (not the bootstrap, whose resamples
    # repeat prompts and sit below it), for the row and for the paired difference
    from evals.compare.stats import jackknife_estimate
    from evals.generation_metrics import distinct_n_left_out

    jack = {k: (distinct_n(samples[k]["output"], 1), np.array(distinct_n_left_out(samples[k]["output"], 1)))
            for k in ("ce-s0", "mile-s0")}  # fmt: skip
    one = jackknife_estimate(*jack["mile-s0"], "prompt jackknife")
    lo, hi = (float(x) for x in tables["mile-s0"]["distinct1"].split(" [")[1].rstrip("]").split(", "))
    assert (lo, hi) == pytest.approx((one.lo, one.hi), abs=6e-5) and lo <= one.diff <= hi
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| mile-s0 | distinct1 |"))
    (a1, a_out), (b1, b_out) = jack["mile-s0"], jack["ce-s0"]
    diff = jackknife_estimate(a1 - b1, a_out - b_out, "paired prompt jackknife")
    interval = [float(x) for x in row.split(" | ")[3].strip("[]").split(", ")]
    assert interval == pytest.approx([diff.lo, diff.hi], abs=6e-5)
    assert "| before fine-tuning | rouge1 |" in proc.stdout.split("Differences to")[1]
    # the loss settings: each setting's seed mean against CE's (two seeds), the seeds paired by number
    settings = proc.stdout.split("**Loss settings**")[1].split("Held-out perplexity")[0]
    lines = [x for x in settings.splitlines() if x.startswith("| ") and not x.startswith("| setting")]
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line.split(" | ") for line in lines}
    base = latest(before).json(SAMPLES_FILE)["toy_gen"]
    ce = np.array([samples[k]["rouge1"] for k in ("ce-s0", "ce-s1")])  # [2, n]
    row = rows[("before fine-tuning", "1 (no seed)", "rouge1")]
    assert float(row[3]) == pytest.approx(np.mean(base["rouge1"]) - ce.mean(), abs=6e-5)
    # MiLe has one seed: a number, the prompts' spread alone, and no verdict
    assert rows[("mile", "1", "rouge1")][-1].strip(" |") == "— (one seed a side)"
    # the held-out perplexity setting by setting: the token-weighted loss of the seeds' mean, as a change
    by_setting = proc.stdout.split("**setting by setting**")[1].split("Evaluations (CKPT")[0]
    row = next(
        x.split(" | ") for x in by_setting.splitlines() if x.startswith("| before fine-tuning | 1 (no seed) | ppl")
    )
    held = {k: latest(runs[i] / ckpt).json(HELD_OUT_FILE) for i, k in ((0, "ce-s0"), (1, "ce-s1"))}
    before_held = latest(before).json(HELD_OUT_FILE)
    loss = {k: np.sum(h["loss"]) / np.sum(h["tokens"]) for k, h in held.items()}
    expected = np.expm1(np.sum(before_held["loss"]) / np.sum(before_held["tokens"]) - np.mean(list(loss.values())))
    assert float(row[3].rstrip("%")) == pytest.approx(100 * expected, abs=6e-3)
    bucket_rows = {line.split(" | ")[0].strip("| "): line for line in proc.stdout.split("Held-out perplexity")[1]
                   .splitlines() if line.startswith("| ") and not line.startswith("| run")}  # fmt: skip
    assert bucket_rows["ce-s0"].endswith("| — | — | — | — |") and "%" in bucket_rows["mile-s0"]


def test_a_declared_primary_metric_leads_the_generation_report_unadjusted_with_its_margin(study, tmp_path):
    """--primary/--margin (the fine-tuning study declares greedy ROUGE-L): its setting-by-setting verdicts first,
    with the TOST interval and no Holm; the same estimates as without the declaration; the other metrics Holm-
    corrected among themselves only; a primary metric without a margin is refused in one line."""
    _, runs, _ = study
    before = runs[0] / "checkpoints/step_0000004"

    def gen(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "scripts/generation_table.py", *map(str, runs), "--task", "toy_gen",
                               "--baseline", str(before), *extra], cwd=REPO, env=clean_env(), capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    png = tmp_path / "settings.png"
    plain, declared = gen(), gen("--primary", "rougeL", "--margin", "0.05", "--plot", str(png))
    assert plain.returncode == 0 and declared.returncode == 0, declared.stderr[-2000:]
    out = declared.stdout
    assert out.lstrip().startswith("**Primary metric: `rougeL`**") and out.index("| run | loss |") > 0
    primary = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in
               out.split("**Primary metric")[1].split("| run | loss |")[0].splitlines() if line.startswith("| ")
               and not line.startswith(("| setting", "|---"))}  # fmt: skip
    assert set(primary) == {"before fine-tuning", "mile"}

    def settings_rows(text: str) -> dict[tuple[str, str], list[str]]:
        part = text.split("**Loss settings**")[1].split("Held-out perplexity")[0]
        return {(x.split(" | ")[0].strip("| "), x.split(" | ")[2]): x.split(" | ") for x in part.splitlines()
                if x.startswith("| ") and not x.startswith(("| setting", "|---"))}  # fmt: skip

    old, new = settings_rows(plain.stdout), settings_rows(out)
    # the same estimate, now in the primary table: Δ and 95% interval unchanged
    for name in primary:
        assert primary[name][2:4] == old[(name, "rougeL")][3:5]
    # the secondary table: every other metric, Holm over fewer tests (adjusted p never above the plain one's)
    assert set(new) == {k for k in old if k[1] != "rougeL"}
    for key, row in new.items():
        a, b = float(row[6]), float(old[key][6])
        assert a <= b + 1e-12 or (np.isnan(a) and np.isnan(b))
    # the verdict is the margin's: recomputed from the printed intervals for the setting with seeds on both sides
    row = primary["before fine-tuning"]
    lo, hi = (float(x) for x in row[3].strip("[]").split(", "))
    lo90, hi90 = (float(x) for x in row[4].strip("[]").split(", "))
    word = row[9].strip(" |*")
    # the power columns: the estimate's own MDE and its power at the margin (both from its SE and df)
    mde, power = float(row[7]), float(row[8])
    assert mde > 0 and 0 <= power <= 1
    assert (power <= 0.85 or mde < 0.05) and (power >= 0.75 or mde > 0.05)  # 80% power at the MDE, by definition
    if lo90 > -0.05 and hi90 < 0.05:
        assert word.startswith("equivalent") or "within ±0.05" in word
    elif lo > 0 or hi < 0:
        assert word in ("better", "worse")
    else:
        assert word == "inconclusive"
    assert primary["mile"][9].strip(" |*") == "— (one seed a side)"
    # the figure: a PNG, a panel per metric of the settings table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    refused = gen("--primary", "rougeL")
    assert refused.returncode == 2 and "--margin" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_published_runs_give_the_same_reports_without_weights_and_stay_finished(study, tmp_path):
    """Runs published without their weights (scripts/publish_runs.py, as the fine-tuning study keeps its finished
    runs in the repository) and restored elsewhere give byte-for-byte the reports the runs gave; a restored run
    is a finished run to train.py, a reader of its weights is told why they are absent, and a damaged record is
    one line that restores nothing."""
    _, runs, _ = study

    def cmd(*args: str, script: str = "publish_runs.py") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=REPO, env=clean_env(),
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    pub, pub2, restored = tmp_path / "pub", tmp_path / "pub2", tmp_path / "restored"
    for out in (pub, pub2):  # twice: the same runs give the same bytes (no timestamps; a republished run is no diff)
        assert cmd("pack", *map(str, runs), "--out", str(out)).returncode == 0
    files = {p.relative_to(pub): p.read_bytes() for p in sorted(pub.rglob("*")) if p.is_file()}
    assert files == {p.relative_to(pub2): p.read_bytes() for p in sorted(pub2.rglob("*")) if p.is_file()}
    names = {p.name for p in files}
    assert "model.safetensors" not in names and not any(n.endswith(".pt") or n == "wandb_id" for n in names)
    assert not any(p.parts[1] == "wandb" for p in files if len(p.parts) > 1)
    proc = cmd("restore", *(str(pub / r.name) for r in runs), "--runs", str(restored))
    assert proc.returncode == 0 and proc.stdout.count("restored from the published record") == 3, proc.stderr
    # ... and the restored runs published again are the same record (what was left out still said)
    assert cmd("pack", *(str(restored / r.name) for r in runs), "--out", str(tmp_path / "pub4")).returncode == 0
    assert files == {p.relative_to(tmp_path / "pub4"): p.read_bytes() for p in sorted((tmp_path / "pub4").rglob("*"))
                     if p.is_file()}  # fmt: skip

    # the same reports: the generation table (the baseline an earlier checkpoint) and the comparison of the runs
    def table(root: Path) -> str:
        rs = [root / r.name for r in runs]
        proc = cmd(*map(str, rs), "--task", "toy_gen", "--baseline", str(rs[0] / "checkpoints/step_0000004"),
                   script="generation_table.py")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    assert table(restored) == table(runs[0].parent)
    for root, out in ((runs[0].parent, tmp_path / "report-runs"), (restored, tmp_path / "report-restored")):
        assert _compare([root / r.name for r in runs], out).returncode == 0
    # every number and word the same; only the runs' paths (relative to each report) differ
    summaries = []
    for out in ("report-runs", "report-restored"):
        with open(tmp_path / out / "summary.csv") as fh:
            summaries.append([{k: v for k, v in row.items() if k != "run"} for row in csv.DictReader(fh)])
    assert summaries[0] == summaries[1] and len(summaries[0]) > 50

    # the study's provenance says which runs were read from records rather than trained for the report
    out = tmp_path / "provenance"
    proc = cmd("--out", str(out), "--published", str(pub), "--command", "x", str(restored / runs[0].name),
               str(runs[1]), script="study_record.py")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((out / "provenance.json").read_text())
    assert [r["from_published_record"] for r in rec["runs"]] == [True, False]
    assert f"in `{pub}`; trained earlier" in (out / "provenance.md").read_text()

    # a restored run is finished: relaunched with its own config it does nothing
    run = restored / runs[0].name
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "run.lock"}
    proc = cmd(str(run / "config.yaml"), f"run.dir={run}", "train.resume=auto", script="train.py")
    assert proc.returncode == 0 and "holds a finished run" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # ... and whoever reads its weights is told why they are not there
    proc = cmd("--checkpoint", str(run), "--tasks", "toy_gen", "--task-dir", str(runs[0].parent / "tasks"),
               script="evaluate.py")  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "model.safetensors: missing" in lines[-1] and "published record" in lines[-1]

    # trained again from step 1 over the restored run: a run of its own again, with its weights, no longer marked
    proc = cmd(str(run / "config.yaml"), f"run.dir={run}", "train.resume=none", "run.overwrite=true", script="train.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (run / "published_record.json").exists()
    assert (run / "checkpoints/step_0000008/model.safetensors").is_file()
    assert cmd("pack", str(run), "--out", str(tmp_path / "pub5")).returncode == 0
    assert "weights" in json.loads((tmp_path / "pub5" / run.name / "published_record.json").read_text())["left_out"]

    # large files are kept gzipped, once (a run holding a 300 KB log here); a damaged record — a file or a blob —
    # is one line naming it, and restores nothing, not even half a run
    big = tmp_path / "big" / runs[0].name
    shutil.copytree(runs[0], big)
    log = "".join(f"step {i} loss {np.sin(i):.6f}\n" for i in range(12_000)).encode()  # ~300 KB
    (big / "train.log").write_bytes(log)
    assert cmd("pack", str(big), "--out", str(tmp_path / "pub3")).returncode == 0
    (blob,) = (tmp_path / "pub3/_blobs").glob("*.gz")
    assert blob.stat().st_size < len(log) / 2 and not (tmp_path / "pub3" / big.name / "train.log").exists()
    proc = cmd("restore", str(tmp_path / "pub3" / big.name), "--runs", str(tmp_path / "big3"))
    assert proc.returncode == 0 and (tmp_path / "big3" / big.name / "train.log").read_bytes() == log
    samples = next((pub / runs[1].name).rglob("eval_samples.json"))
    for damaged in (blob, samples):
        data = bytearray(damaged.read_bytes())
        data[len(data) // 2] ^= 0x01
        damaged.write_bytes(bytes(data))
    again = tmp_path / "again"
    for record in (tmp_path / "pub3" / big.name, pub / runs[1].name):
        damaged = blob if record.parent.name == "pub3" else samples
        proc = cmd("restore", str(record), "--runs", str(again))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert str(damaged) in proc.stderr
        assert not again.exists() or not any(again.iterdir())


def test_another_model_scores_a_runs_held_out_set_beside_its_checkpoint(study, corpus, tmp_path):
    """The model before fine-tuning (here: a copy of an early checkpoint, outside any run) is scored on a run's
    held-out set by copying the run's held_out_set.json beside it, not on a set of its own."""
    _, runs, _ = study
    other = tmp_path / "before"
    subprocess.run(["cp", "-r", str(runs[0] / "checkpoints/step_0000004"), str(other)], check=True)
    shutil.rmtree(other / "evals")  # the run's evaluations of that checkpoint
    (other / "held_out_set.json").write_bytes((runs[0] / "held_out_set.json").read_bytes())
    proc = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(other), "--val-files",
                           corpus["val"]], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_set = json.loads((runs[0] / "held_out_set.json").read_text())
    scored = latest(other).json(HELD_OUT_FILE)
    assert scored["set"]["identity"] == run_set["identity"] and set(scored["sha"]) == {
        d["sha"] for d in run_set["documents"]}  # fmt: skip
    # frequency buckets from the counts of given files instead of training's: an evaluation of its own
    counted = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(other), "--val-files",
                              corpus["val"], "--bucket-files", corpus["train_glob"]], cwd=REPO, env=clean_env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert counted.returncode == 0, counted.stderr[-3000:]
    first, second = find_results(other)[::-1]
    assert first.settings.buckets == "training" and second.settings.buckets.startswith("files-")
    assert second.summary["metrics"]["bucket/loss"] == first.summary["metrics"]["bucket/loss"]
    m = second.summary["metrics"]
    assert m["bucket/high_tokens"] + m["bucket/medium_tokens"] + m["bucket/low_tokens"] == m["bucket/tokens"]
    assert second.json(HELD_OUT_FILE)["buckets"] == second.settings.buckets and first.complete


def test_a_baseline_scored_on_other_held_out_records_is_named_not_silently_dropped(study, corpus, tmp_path):
    """The model before fine-tuning scored on a held-out set of its own (no held_out_set.json beside it) cannot be
    paired with the runs record by record: the setting-by-setting perplexity table names it as left out and still
    compares the runs; scored on the runs' set, it is a row of that table."""
    _, runs, _ = study
    rows = {}
    for name, with_set in (("own", False), ("runs_set", True)):
        other = tmp_path / name
        shutil.copytree(runs[0] / "checkpoints/step_0000004", other)
        shutil.rmtree(other / "evals")
        if with_set:
            shutil.copy(runs[0] / "held_out_set.json", other / "held_out_set.json")
        proc = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint", str(other), "--val-files",
                               corpus["val"], "--val-tokens", "900"], cwd=REPO, env=clean_env(), capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = subprocess.run([sys.executable, "scripts/generation_table.py", *map(str, runs), "--task", "toy_gen",
                               "--baseline", str(other)], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[name] = proc.stdout.split("**setting by setting**")[1]
    assert "Left out of the setting-by-setting perplexity table" in rows["own"]
    assert "`before fine-tuning`" in rows["own"].split("Left out")[1]
    assert "| mile | 1 | ppl |" in rows["own"]  # the runs are still compared
    assert "Left out" not in rows["runs_set"] and "| before fine-tuning | 1 (no seed) | ppl |" in rows["runs_set"]


def test_runs_made_before_the_stratified_set_compare_with_a_note(study, tmp_path):
    """An older run's per-document file (documents read in file order: no set, no domains) still compares, and so
    does the layout before evaluations were keyed by their settings (one eval_results.json beside the checkpoint,
    no settings recorded)."""
    _, runs, _ = study
    old = []
    for r in runs:
        copy = tmp_path / r.name
        subprocess.run(["cp", "-r", str(r), str(copy)], check=True)
        ckpt = copy / "checkpoints/step_0000008"
        (evaluation,) = find_results(ckpt)
        for f in evaluation.dir.iterdir():
            f.rename(ckpt / f.name)
        shutil.rmtree(ckpt / "evals")
        results = json.loads((ckpt / "eval_results.json").read_text())
        for key in ("settings", "key", "source", "complete", "parts"):
            results.pop(key)
        (ckpt / "eval_results.json").write_text(json.dumps(results))
        h = json.loads((ckpt / HELD_OUT_FILE).read_text())
        for key in ("set", "domain", "sha", "key"):
            h.pop(key)
        (ckpt / HELD_OUT_FILE).write_text(json.dumps(h))
        (copy / "held_out_set.json").unlink()
        old.append(copy)
    proc = _compare(old, tmp_path / "report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "come from the evaluation `toy_gen+toy_mc-fs0-limitall-lmevalunknown-heldoutunknown`" in md
    assert "predate the stratified held-out set" in md and "Primary: held-out ce" in md
    assert "no per-document data" in md  # per-domain losses of old runs: from the seeds alone


def test_the_statistics_import_neither_matplotlib_nor_the_trainer():
    code = ("import sys, evals.compare.stats, evals.compare.metrics, evals.compare.runs, evals.compare.coverage; "
            "bad = [m for m in ('matplotlib', 'trainer', 'deepspeed') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_compare_runs_refuses_runs_of_other_budgets_tokenizers_or_data(corpus, dist_env, tmp_path):
    from data.tokenizer import train_tokenizer
    from tests.corpus import documents

    other_tok = train_tokenizer((d["text"] for d in documents(240, seed=0)), str(tmp_path / "tok"), vocab_size=320,
                                num_threads=1)  # fmt: skip
    variants = {
        "ce-s0": {},
        "longer-s0": {"train.max_steps": 6},  # another token budget
        "tok-s0": {"data.tokenizer": other_tok},
        "data-s0": {"data.train_files": f"[{corpus['dir']}/train_00.jsonl.zst]"},
    }
    for name, extra in variants.items():
        train(load_config(None, debug_overrides(corpus, tmp_path / name, **{"train.max_steps": 4,
              "train.log_every": 2, "eval.buckets": "false", **extra})))  # fmt: skip

    def compare(*names: str, force: bool = False) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "scripts/compare_runs.py", *(str(tmp_path / n) for n in names), "--out",
               str(tmp_path / "out"), *(["--force"] if force else [])]  # fmt: skip
        return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)

    for other, why in (("longer-s0", "final tokens differ: 1024: ce-s0 vs 1536: longer-s0"),
                       ("tok-s0", "tokenizer (run_info.json tokenizer_sha256) differ"),
                       ("data-s0", "training data (run_info.json data_files) differ: ce-s0 vs data-s0")):  # fmt: skip
        proc = compare("ce-s0", other)
        assert proc.returncode == 2 and why in proc.stderr, proc.stderr[-2000:]
        assert (
            len(proc.stderr.strip().splitlines()) == 1 and "--force" in proc.stderr and "Traceback" not in proc.stderr
        )
        assert not (tmp_path / "out").exists()
    forced = compare("ce-s0", "longer-s0", force=True)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "Forced comparison of mismatched runs" in (tmp_path / "out" / "summary.md").read_text()


def test_compare_runs_refuses_a_directory_that_is_not_a_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/compare_runs.py", str(tmp_path), "--out", str(tmp_path / "out")],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "not run directories" in proc.stderr and "Traceback" not in proc.stderr


def test_wandb_names_follow_the_experiment():
    cfg = load_config(
        None, ["model.preset=468m", "model.block=llama", "loss.name=mile", "train.seed=3", "data.seq_len=128"]
    )
    assert run_names(cfg) == ("468m-llama-mile-g1-s3", "468m-llama", ["loss:mile", "size:468m", "block:llama"])


def test_grid_runs_resume_after_an_interruption_and_skip_finished_runs(corpus, tmp_path):
    grid = tmp_path / "toy"
    grid.mkdir()
    (grid / "mile.yaml").write_text("includes:\n  - loss/mile.yaml\n")
    overrides = [o for o in debug_overrides(corpus, tmp_path / "unused", **{"train.max_steps": 6, "train.log_every": 2})
                 if not o.startswith("run.dir=")]  # fmt: skip
    env = {**clean_env(), "RUNS": str(tmp_path / "runs"), "LAUNCHER": sys.executable, "PYTHON": sys.executable}

    def grid_run(*extra: str) -> subprocess.CompletedProcess:
        cmd = ["bash", "scripts/run_grid.sh", str(grid), "0", "--", *overrides, *extra]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    run_dir = tmp_path / "runs" / "toy" / "mile-s0"
    first = grid_run(*as_args(sigterm_at(3)))  # pre-empted: a checkpoint, not finished
    assert first.returncode == 75, first.stdout[-2000:] + first.stderr[-2000:]
    assert '"complete": false' in (run_dir / "result.json").read_text()
    second = grid_run()
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout and (tmp_path / "runs" / "toy" / "report" / "summary.md").is_file()
    assert '"complete": true' in (run_dir / "result.json").read_text()
    third = grid_run()
    assert third.returncode == 0 and "final training loss" not in third.stdout  # nothing left to train
    longer = grid_run("train.max_steps=8")  # a grid over a smoke test's runs: refused, never reused or spliced
    assert longer.returncode == 2 and "train.max_steps: 6 -> 8" in longer.stderr, longer.stderr[-2000:]


def test_groups_that_differ_only_by_a_modifier_or_a_loss_option_stay_apart():
    """A grid with CE, CE + label smoothing and CE + z-loss (the CPU study's): three groups, none merged into or
    dropped under another's name, and the plain CE group is the baseline whatever the order given."""
    from evals.compare.runs import Run, baseline, group_runs

    def run(tag: str, seed: int, **loss) -> Run:
        cfg = load_config(None, [f"train.seed={seed}", f"run.dir=runs/{tag}-s{seed}",
                                 *(f"loss.{k}={v}" for k, v in loss.items())])  # fmt: skip
        return Run(dir=Path(f"runs/{tag}-s{seed}"), cfg=OmegaConf.structured(cfg), seed=seed, steps=[], tokens=[],
                   ce=[], loss=[])  # fmt: skip

    runs = [run(n, s, **kw) for s in (0, 1) for n, kw in (("zloss", {"z_loss": 1e-4}),
            ("smooth", {"label_smoothing": 0.1}), ("ce", {}), ("pdl_eps", {"name": "pdl", "eps": 1e-3}),
            ("pdl", {"name": "pdl"}))]  # fmt: skip
    groups, _ = group_runs(runs)
    assert len(groups) == 5 and sum(len(g) for g in groups.values()) == len(runs)
    assert {"ce", "ce-ls0.1", "ce-z0.0001"} <= set(groups) and baseline(groups) == "ce"
    assert all({r.seed for r in g} == {0, 1} for g in groups.values())
    pdl = [label for label in groups if label.startswith("pdl")]  # every declared parameter is in the tag
    assert sorted(pdl) == ["pdl-a1", "pdl-a1-eps0.001"], pdl


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/evaluate.py", *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_an_evaluation_with_another_limit_is_kept_beside_trainings_and_compare_never_mixes_them(study, tmp_path):
    """scripts/evaluate.py with another --limit writes a second evaluation and leaves training's as it was;
    compare reads every run with the one setting they share, refuses runs that share none (one line listing each
    run's settings, exit 2), and with --force labels every number with its setting."""
    root, runs, _ = study
    copies = []
    for r in runs:
        subprocess.run(["cp", "-r", str(r), str(tmp_path / r.name)], check=True)
        copies.append(tmp_path / r.name)
    ckpt = copies[2] / "checkpoints/step_0000008"
    (trained,) = find_results(ckpt)
    assert trained.source == "training" and trained.settings.limit == 0 and trained.key.startswith("toy_gen+toy_mc-")
    before = {p.name: p.read_bytes() for p in trained.dir.iterdir()}
    proc = _evaluate("--checkpoint", str(copies[2]), "--tasks", "toy_mc", "--task-dir", str(root / "tasks"),
                     "--limit", "3")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = find_results(ckpt)
    assert [s.source for s in again] == ["evaluate", "training"]
    assert again[0].settings.limit == 3 and "-limit3-lmeval" in again[0].key and again[0].complete
    assert again[0].summary["n_samples"]["toy_mc"]["effective"] == 3 and f"results: {again[0].dir}" in proc.stdout
    assert "loglikelihood" in proc.stderr.lower()  # lm-eval logs its requests (what the test below looks for)
    assert {p.name: p.read_bytes() for p in trained.dir.iterdir()} == before  # training's evaluation untouched

    ok = _compare(copies, tmp_path / "report")  # the setting all three share: training's
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"come from the evaluation `{trained.key}`" in (tmp_path / "report" / "summary.md").read_text()

    shutil.rmtree(trained.dir)  # as if this run had been trained with eval.limit=3: no setting in common
    refused = _compare(copies, tmp_path / "refused")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-3000:]
    assert "no evaluation setting common to all runs" in refused.stderr and "Traceback" not in refused.stderr
    assert f"mile-s0: {again[0].key}" in refused.stderr and f"ce-s0: {trained.key}" in refused.stderr
    assert not (tmp_path / "refused").exists()
    unknown = _compare(copies, tmp_path / "refused", "--eval-setting", again[0].key)  # not every run's
    assert unknown.returncode == 2 and "is not an evaluation of every run" in unknown.stderr

    forced = _compare(copies, tmp_path / "forced", "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    md = (tmp_path / "forced" / "summary.md").read_text()
    assert "Forced comparison of mixed evaluation settings" in md
    assert f"- S1: `{trained.key}`" in md and f"- S2: `{again[0].key}`" in md and "mile-g1 s0 [S2]" in md
    assert "evaluation settings S1 vs S2 mixed" in md  # the contrasts with MiLe mix them, and say so
    with open(tmp_path / "forced" / "summary.csv") as fh:
        labelled = {(r["run"].rsplit("/", 1)[-1], r["eval_setting"]) for r in csv.DictReader(fh)
                    if r["kind"] == "run" and r["metric"].startswith("eval/")}  # fmt: skip
    assert labelled == {("ce-s0", trained.key), ("ce-s1", trained.key), ("mile-s0", again[0].key)}
    # the downstream curves are each run's setting's only: mile-s0's has the one checkpoint evaluated with limit 3
    # (its in-loop lines are another setting's), the CE runs' every checkpoint of training's setting
    with open(tmp_path / "forced" / "curves.csv") as fh:
        curve = [c for c in csv.DictReader(fh) if c["series"] == "downstream" and c["metric"] == "eval/toy_mc/acc"]
    points = {n: [float(c["value"]) for c in curve if c["run"].endswith(n)] for n in ("ce-s0", "ce-s1", "mile-s0")}
    assert points["mile-s0"] == [again[0].summary["metrics"]["toy_mc/acc"]]
    assert len(points["ce-s0"]) == len(points["ce-s1"]) == 2


def test_a_failing_check_stops_an_evaluation_before_lm_eval_runs(study, corpus, tmp_path):
    """Missing held-out files, bucket files or task directory: one line, exit 2, before any lm-eval request, and
    nothing written."""
    root, runs, _ = study
    ckpt = runs[0] / "checkpoints/step_0000008"
    before = sorted(p.name for p in (ckpt / "evals").iterdir())
    task = ["--checkpoint", str(runs[0]), "--tasks", "toy_mc", "--task-dir", str(root / "tasks")]
    for args, named in (
        ([*task, "--val-files", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        ([*task, "--val-files", corpus["val"], "--bucket-files", str(tmp_path / "no.zst")], "no.zst"),
        (["--checkpoint", str(runs[0]), "--tasks", "toy_mc", "--task-dir", str(tmp_path / "nowhere")], "nowhere"),
    ):  # fmt: skip
        proc = _evaluate(*args)
        assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-3000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert "loglikelihood" not in proc.stderr.lower()  # lm-eval never started (it logs its requests)
    assert sorted(p.name for p in (ckpt / "evals").iterdir()) == before
