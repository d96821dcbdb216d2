from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from evals.stats import difference, seed_interval
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


def _shows(cell: str, *numbers: float) -> bool:
    """A table cell ("1.2345" or "1.2345 ± 0.0100") shows these numbers, rounded to the digits it prints
    (at least 4 significant ones)."""
    parts = cell.split(" ± ")
    if len(parts) != len(numbers):
        return False
    for text, value in zip(parts, numbers, strict=True):
        decimals = len(text.partition(".")[2])
        if decimals < 1 or abs(float(text) - value) > 0.5 * 10**-decimals or len(text.replace(".", "")) < 4:
            return False
    return True


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values)


def test_compare_runs_plots_ce_and_its_tables_equal_the_runs_metrics(corpus, dist_env, tmp_path):
    # two and three choices: chance is the mean of 1/choices over the task's documents
    docs = [{"context": "The king loves", "choices": [" the crown", " zzz", " qq"][: 2 + i % 2], "label": i % 2}
            for i in range(6)]  # fmt: skip
    write_multiple_choice_task(tmp_path / "tasks", "toy_mc", docs)
    runs = []
    for loss, seed in (("ce", 0), ("ce", 1), ("mile", 0)):
        run_dir = tmp_path / f"{loss}-s{seed}"
        extra = {"loss.name": loss, "train.seed": seed, "train.max_steps": 8, "train.log_every": 2,
                 "checkpoint.every": 4, "eval.every_checkpoint": "true", "eval.tasks": "[toy_mc]",
                 "eval.task_dir": str(tmp_path / "tasks"), "eval.val_every": 4}  # fmt: skip
        train(load_config(None, debug_overrides(corpus, run_dir, **extra)))
        runs.append(run_dir)
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "scripts/compare_runs.py", *map(str, runs), "--out", str(out)],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for png in ("ce_vs_tokens.png", "bucket_ppl.png", "downstream.png", "differences.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png

    # the runs' own numbers, read here from their files
    rows = {r.name: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in runs}
    train_rows = {name: [x for x in rs if "ce" in x] for name, rs in rows.items()}
    evals = {
        r.name: json.loads((r / "checkpoints/step_0000008/eval_results.json").read_text())["metrics"] for r in runs
    }

    # the curve plotted is ce, every logged value of every run
    with open(out / "curves.csv") as fh:
        plotted = {(c["run"], float(c["tokens"])): float(c["ce"]) for c in csv.DictReader(fh)}
    for r in runs:
        for x in train_rows[r.name]:
            assert plotted[(str(r), float(x["tokens"]))] == pytest.approx(x["ce"], rel=1e-12)

    # the CSV holds every run's numbers at full precision
    with open(out / "summary.csv") as fh:
        numbers = {(c["group"], c["seed"], c["metric"]): float(c["value"]) for c in csv.DictReader(fh)}
    for r, (group, seed) in zip(runs, (("ce", "0"), ("ce", "1"), ("mile-g1", "0")), strict=True):
        assert numbers[(group, seed, "final_train_ce")] == pytest.approx(train_rows[r.name][-1]["ce"], rel=1e-12)
        assert numbers[(group, seed, "eval/toy_mc/acc")] == pytest.approx(evals[r.name]["toy_mc/acc"], rel=1e-12)
        low = numbers[(group, seed, "eval_bucket/low_ppl")]
        assert low == pytest.approx(evals[r.name]["bucket/low_ppl"], rel=1e-12)
    chance = statistics.fmean(1 / len(d["choices"]) for d in docs)
    assert numbers[("chance", "", "eval/toy_mc")] == pytest.approx(chance)

    # the markdown rows: one seed -> the run's value; two seeds -> mean ± sd
    tables = _md_tables((out / "summary.md").read_text())
    loss_table = tables["Training and held-out loss"]
    assert set(loss_table) == {"ce", "mile-g1"}
    assert _shows(loss_table["mile-g1"]["final train ce"], train_rows["mile-s0"][-1]["ce"])
    assert _shows(loss_table["mile-g1"]["final train loss (own scale)"], train_rows["mile-s0"][-1]["loss"])
    assert _shows(loss_table["mile-g1"]["held-out ce"], evals["mile-s0"]["bucket/loss"])
    assert loss_table["ce"]["seeds"] == "0,1"
    assert _shows(loss_table["ce"]["final train ce"], *_mean_sd([train_rows[f"ce-s{s}"][-1]["ce"] for s in (0, 1)]))
    ppl = tables["Held-out perplexity by token frequency"]
    assert _shows(ppl["mile-g1"]["low_ppl"], evals["mile-s0"]["bucket/low_ppl"])
    assert _shows(ppl["ce"]["high_ppl"], *_mean_sd([evals[f"ce-s{s}"]["bucket/high_ppl"] for s in (0, 1)]))
    rel = evals["mile-s0"]["bucket/low_ppl"] / evals["ce-s0"]["bucket/low_ppl"] - 1  # paired with ce's seed 0
    assert ppl["mile-g1"]["Δ low_ppl vs ce"] == f"{100 * rel:+.1f}%"
    (downstream,) = [v for k, v in tables.items() if k.startswith("Downstream")]
    acc, err = evals["mile-s0"]["toy_mc/acc"], evals["mile-s0"]["toy_mc/acc_stderr"]
    assert _shows(downstream["mile-g1"]["toy_mc/acc"], acc, err)  # one seed: lm-eval's stderr
    assert _shows(downstream["chance"]["toy_mc/acc"], chance)
    # held-out loss at each of the two evaluations (steps 4 and 8) made it into the rows behind the curves
    assert [x["step"] for x in rows["ce-s0"] if "eval_bucket/loss" in x] == [4, 8]

    # differences against ce with 95% intervals: recomputed here from the files the evaluation saved
    with open(out / "summary.csv") as fh:
        diffs = {c["metric"]: c for c in csv.DictReader(fh) if c["seed"] == "diff"}
    ckpt = "checkpoints/step_0000008"
    held = {r.name: json.loads((r / ckpt / "eval_held_out.json").read_text()) for r in runs}
    samples = {r.name: json.loads((r / ckpt / "eval_samples.json").read_text()) for r in runs}
    for key, num, den in (("eval_bucket/loss", "loss", "tokens"), ("eval_bucket/low_loss", "low_loss", "low_tokens")):
        expect = difference([held["mile-s0"][num]], [held["ce-s0"][num], held["ce-s1"][num]], held["ce-s0"][den])
        row = diffs[f"{key}/diff_vs_ce"]
        name = key.replace("eval_bucket/", "bucket/")
        point = evals["mile-s0"][name] - statistics.fmean(evals[f"ce-s{s}"][name] for s in (0, 1))
        assert float(row["value"]) == pytest.approx(point, abs=1e-5)  # float64 sums vs the fp32 mean
        assert (float(row["lo"]), float(row["hi"])) == pytest.approx((expect.lo, expect.hi), rel=1e-9)
        assert row["verdict"] == expect.verdict and "paired bootstrap over" in row["note"]
    acc = [samples[name]["toy_mc"]["acc"] for name in ("mile-s0", "ce-s0", "ce-s1")]
    expect = difference([acc[0]], acc[1:], lower_is_better=False)
    row = diffs["eval/toy_mc/acc/diff_vs_ce"]
    assert (float(row["lo"]), float(row["hi"]), row["verdict"]) == pytest.approx((expect.lo, expect.hi, expect.verdict))
    # per-domain: no per-document data, the seeds' spread alone
    domain = [[x for x in rows[n] if "eval_domain/Plays/loss" in x][-1]["eval_domain/Plays/loss"]
              for n in ("mile-s0", "ce-s0", "ce-s1")]  # fmt: skip
    expect = seed_interval(domain[:1], domain[1:])
    row = diffs["eval_domain/Plays/loss/diff_vs_ce"]
    assert (float(row["lo"]), float(row["hi"])) == pytest.approx((expect.lo, expect.hi), rel=1e-9)
    assert row["note"].startswith("seeds only")
    table = tables["Differences against `ce` (95% intervals)"]
    cell = table["mile-g1: held-out loss"]
    lo, hi = (float(x) for x in cell["95% interval"].strip("[]").split(", "))
    assert (lo, hi) == pytest.approx((float(diffs["eval_bucket/loss/diff_vs_ce"]["lo"]),
                                      float(diffs["eval_bucket/loss/diff_vs_ce"]["hi"])), abs=6e-5)  # fmt: skip
    assert (
        cell["verdict"] in ("better", "worse", "no difference at this power")
        and cell["interval"] == "documents + seeds"
    )
    assert table["mile-g1: domain Plays loss"]["interval"] == "seeds"


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
    from scripts.compare_runs import Run, baseline, group_runs

    def run(tag: str, seed: int, **loss) -> Run:
        cfg = load_config(None, [f"train.seed={seed}", f"run.dir=runs/{tag}-s{seed}",
                                 *(f"loss.{k}={v}" for k, v in loss.items())])  # fmt: skip
        return Run(dir=Path(f"runs/{tag}-s{seed}"), cfg=OmegaConf.structured(cfg), seed=seed, steps=[], tokens=[],
                   ce=[], loss=[], val=[], eval={})  # fmt: skip

    runs = [run(n, s, **kw) for s in (0, 1) for n, kw in (("zloss", {"z_loss": 1e-4}),
            ("smooth", {"label_smoothing": 0.1}), ("ce", {}), ("pdl_eps", {"name": "pdl", "eps": 1e-3}),
            ("pdl", {"name": "pdl"}))]  # fmt: skip
    groups, _ = group_runs(runs)
    assert len(groups) == 5 and sum(len(g) for g in groups.values()) == len(runs)
    assert {"ce", "ce-ls0.1", "ce-z0.0001"} <= set(groups) and baseline(groups) == "ce"
    assert all({r.seed for r in g} == {0, 1} for g in groups.values())
    pdl = [label for label in groups if label.startswith("pdl")]  # eps is not in the tag: it tells them apart
    assert len(pdl) == 2 and any("eps=0.001" in label for label in pdl), pdl
