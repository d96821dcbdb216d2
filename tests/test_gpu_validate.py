"""The one-call GPU validation (scripts/gpu/validate.sh) dry-run end to end on the CPU at toy sizes, then its
report: a crash in either must show up here, not in the few GPU minutes a session gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from scripts.gpu import report

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["setup", "kernels", "tests", "loss", "model", "hf", "eval", "big", "scale"]
# what the device tool brings back: at most 8 files, named plainly, directly in OUTDIR
FILES = {
    "validate.log",
    "stages.jsonl",
    "kernels.json",
    "tests.jsonl",
    "bench_loss.json",
    "bench_model.json",
    "bench_eval.json",
    "scale_6.7b.json",
}


def make_wheel(folder: Path, name: str = "losslab_probe", version: str = "0.1") -> Path:
    """A minimal pure-Python wheel, standing in for the carried .whl/ folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "VERSION = '0.1'\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in files.items():
            zf.writestr(k, v)
    return path


def validate(out: Path, tmp: Path, corpus: dict, **env: str) -> subprocess.CompletedProcess:
    make_wheel(tmp / "wheels")
    full = {
        **os.environ,
        "PY": sys.executable,
        "OMP_NUM_THREADS": "1",
        "VALIDATE_WHEELS": str(tmp / "wheels"),
        "VALIDATE_SITE": str(tmp / "site"),
        "VALIDATE_WORK": str(tmp / "work"),
        "VALIDATE_SHARD": str(Path(corpus["dir"]) / "train_00.jsonl.zst"),
        "VALIDATE_TOKENIZER": corpus["tokenizer"],
        **env,
    }
    full.pop("TRITON_INTERPRET", None)  # --toy must set it itself
    cmd = ["bash", "scripts/gpu/validate.sh", "--toy", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.cpu_adam  # the 6.7B offload stage
def test_validate_dry_runs_every_stage_on_the_cpu_and_reports(corpus, tmp_path):
    out = tmp_path / "out"
    proc = validate(out, tmp_path, corpus)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == FILES
    stages = [json.loads(x) for x in (out / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == ["env", *STAGES]
    assert all(s["rc"] == 0 and not s["timed_out"] for s in stages[1:]), stages
    env = stages[0]
    assert env["toy"] and env["device"] == "cpu" and env["command"] == f"bash scripts/gpu/validate.sh --toy {out}"
    assert (tmp_path / "site" / "losslab_probe" / "__init__.py").is_file()  # the carried wheels were installed
    # stage 1: every fused loss with the Triton kernels (interpreter) and torch, both gradients, in tolerance
    kernels = json.loads((out / "kernels.json").read_text())
    from tests.test_losses import FUSED_CASES

    assert {(r["case"], r["kernel"]) for r in kernels["rows"]} == {
        (c, k) for c, _ in FUSED_CASES for k in ("triton", "torch")
    }
    assert all(r["ok"] and r["grad_w_rel"] < 2e-2 for r in kernels["rows"])
    assert {r["ran"] for r in kernels["rows"] if r["kernel"] == "triton"} == {"losslab.losses.rows:TritonRows"}
    tests = report.test_results([json.loads(x) for x in (out / "tests.jsonl").read_text().splitlines()])
    assert tests and all(t["outcome"] == "skipped" and "CUDA" in t["message"] for t in tests)  # no GPU here
    # stage 2: Liger cannot run here, and says so in its row
    loss_rows = json.loads((out / "bench_loss.json").read_text())["losses"]
    assert [r["skipped"] for r in loss_rows if r["impl"] == "liger"] == ["Liger's kernels need CUDA"]
    # stage 3, the hf stage's rows (marked "bench") and the big stage's (marked "stage"), all in one file
    rows = json.loads((out / "bench_model.json").read_text())
    model = [r for r in rows if "bench" not in r]
    hf_rows = {r["variant"]: r for r in rows if r.get("bench") == "hf_patch"}
    assert set(hf_rows) == {"patched ce", "plain ce", "patched mile"}
    assert hf_rows["patched ce"]["max_rel_loss_diff_vs_plain"] < 1e-5  # the patched ce is transformers' own loss
    assert all(r["peak_mib"] > 0 and r["s_per_step"] > 0 for r in hf_rows.values())
    assert [(r["block"], r["impl"], r.get("stage")) for r in model] == [
        ("neox", "losslab", None),
        ("neox", "hf", None),
        ("llama", "losslab", None),
        ("llama", "hf", None),
        ("llama", "losslab", "big"),
    ]
    assert all(r["micro_batch"] == 2 for r in model)
    # the eval stage (#25): generation and the fine-tuning step next to transformers (the lm_eval subprocesses
    # run in tests/test_bench.py)
    evals = json.loads((out / "bench_eval.json").read_text())
    assert evals["env"]["model"] == "random:toy"
    assert [(r["part"], r.get("batch"), r.get("precision")) for r in evals["rows"]] == [
        ("generation", 2, None),
        ("generation", 5, None),
        ("train_step", 2, "fp32"),
        ("train_step", 2, "bf16"),
    ]
    assert all(r["equal_outputs"] for r in evals["rows"] if r["part"] == "generation")
    scale = json.loads((out / "scale_6.7b.json").read_text())
    assert scale["steps"] == 3 and scale["rc"] == 0 and scale["tokens_per_s"] > 0
    log = (out / "validate.log").read_text()
    assert all(f"=== {s}: exit 0" in log for s in STAGES) and "=== done after" in log
    # the report, into a copy of docs/benchmarks.md, above the list of figures still owed
    doc = tmp_path / "benchmarks.md"
    doc.write_text((ROOT / "docs" / "benchmarks.md").read_text())
    proc = subprocess.run(
        [sys.executable, "scripts/gpu/report.py", str(out), "--write", str(doc)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    text = doc.read_text()
    at = text.index("## GPU: none (CPU dry run), ")
    assert at < text.index("## GPU — not yet measured") and text.startswith("# Benchmarks")
    section = text[at:]
    assert f"Command: `bash scripts/gpu/validate.sh --toy {out}`" in section and "CPU dry run at toy sizes" in section
    for target in (
        "fused ce <= 1.0x Liger time and memory",
        "fused MiLe <= 1.05x fused CE time",
        "debug neox >= 1.3x HF eager (same run)",
        "debug neox >= 55% MFU",
        "generation batch 2 >= 1.0x generate() tokens/s, equal outputs",
        "fine-tuning step bf16 >= 1.0x transformers tokens/s",
        "evaluate.py <= 1.0x lm_eval --model hf wall time, same scores | not run | not measured",
        "6.7B ZeRO-3 offload",
        "HF patch: ce loss = HF's, every step",
        "HF patch: peak memory of a step < HF's",
    ):
        assert f"| {target}" in section, target


def test_a_stage_cut_at_its_budget_keeps_what_ran_before_and_later_stages_are_skipped(corpus, tmp_path):
    out = tmp_path / "out"
    # model gets 1 s (killed while importing); big needs more time than the whole script has
    env = {"VALIDATE_STAGES": "setup model big", "BUDGET_MODEL": "1", "VALIDATE_BUDGET": "60", "MIN_BIG": "100"}
    proc = validate(out, tmp_path, corpus, **env)
    assert proc.returncode == 1
    stages = {s["stage"]: s for s in map(json.loads, (out / "stages.jsonl").read_text().splitlines())}
    assert stages["setup"]["rc"] == 0 and "versions" in stages["env"]
    assert stages["model"]["rc"] == 137 and stages["model"]["timed_out"]
    assert stages["big"]["note"].startswith("skipped:") and "100 s needed" in stages["big"]["note"]
    text = report.section(report.load(out))
    assert "model 1 s (cut at its budget)" in text or "model 0 s (cut at its budget)" in text
    assert "| 468M >= 1.3x HF compiled, >= 55% MFU | no bench_model.json | not measured |" in text


def fake_gpu_results(out: Path) -> None:
    """What validate.sh would leave on a GPU, with round numbers chosen to meet some targets and miss others."""
    out.mkdir()
    env = {
        "stage": "env",
        "date": "2026-12-02T04:00:00+00:00",
        "command": "bash scripts/gpu/validate.sh /tmp/o",
        "toy": False,
        "device": "cuda",
        "gpu": "NVIDIA H200",
        "versions": {"torch": "2.11"},
    }
    (out / "stages.jsonl").write_text(
        json.dumps(env)
        + "\n"
        + json.dumps({"stage": "loss", "rc": 0, "seconds": 30, "budget": 60, "timed_out": False, "note": ""})
        + "\n"
    )
    base = {"V": 50304, "loss_rel": 1e-4, "grad_h_rel": 1e-3, "grad_w_rel": 1e-3}
    rows = [
        {"V": 50304, "loss": "ce", "impl": "liger", "ms": 12.0, "peak_gib": 0.4, "version": "0.8.5"},
        {**base, "loss": "ce", "impl": "fused", "ms": 10.0, "peak_gib": 0.3, "kernel": "x:TritonRows"},
        {**base, "loss": "mile", "impl": "fused", "ms": 11.0, "peak_gib": 0.5, "kernel": "x:TritonRows"},
    ]
    (out / "bench_loss.json").write_text(json.dumps({"N": 16384, "d": 1024, "losses": rows}))
    model = [
        {
            "impl": "losslab",
            "block": "neox",
            "seq": 1024,
            "compiled": True,
            "preset": "468m",
            "micro_batch": 32,
            "tokens_per_s": 180e3,
            "mfu": 0.5,
            "peak_gib": 40.0,
            "time_share": {"matmul": 0.7, "other": 0.3},
        },
        {
            "impl": "hf",
            "block": "neox",
            "seq": 1024,
            "compiled": True,
            "preset": "468m",
            "micro_batch": 32,
            "tokens_per_s": 130e3,
            "mfu": 0.4,
            "peak_gib": 55.0,
        },
    ]
    (out / "bench_model.json").write_text(json.dumps(model))


def test_the_report_compares_against_the_targets(tmp_path):
    fake_gpu_results(tmp_path / "o")
    checks = {c.target: (c.measured, c.verdict) for c in report.checks_of(report.load(tmp_path / "o"))}
    assert checks["fused ce <= 1.0x Liger time and memory"] == ("0.83x time, 0.75x memory", "meets")
    assert checks["fused mile <= 1.0x Liger time and memory"] == ("0.92x time, 1.25x memory", "misses")
    assert checks["fused MiLe <= 1.05x fused CE time"] == ("1.100x", "misses")
    assert checks["468m neox >= 1.3x HF compiled (same run)"] == ("1.38x", "meets")
    assert checks["468m neox >= 55% MFU"] == ("50.0%", "misses")
    assert checks["6.7B ZeRO-3 offload >= 7k tokens/s, <= 100 GiB host"][1] == "not measured"
    text = report.section(report.load(tmp_path / "o"))
    assert text.startswith("## GPU: NVIDIA H200, 2026-12-02 — `scripts/gpu/validate.sh`")
    assert "| neox | losslab | 468m | 1024 | True | 32 | 180000 | 50.0% | 40.0 | 1.38x | 132.7k (42% MFU) |" in text
    assert "- neox: matmul 70%, other 30%" in text


def test_the_report_refuses_a_folder_that_is_not_validate_output(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/gpu/report.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "stages.jsonl" in proc.stderr


def test_the_report_reads_the_anchors_documented_in_docs_anchors():
    text = (ROOT / "docs" / "anchors.md").read_text()
    a = report.ANCHORS
    for phrase in (
        f"| {a['liger_ce']['ms']} ms | {a['liger_ce']['gib']} GiB |",
        f"| {a['naive_ce']['ms']} ms | {a['naive_ce']['gib']} GiB |",
        f"| {a['naive_mile']['ms']} ms | {a['naive_mile']['gib']} GiB |",
        "133.5k tokens/s, 42% MFU",
        "132.7k tokens/s, 42% MFU",
        "63.2k tokens/s, 49% MFU",
        "7.0 s/step = 2.3k tokens/s",
        "121 GiB host RSS",
        "NVIDIA H100 80GB HBM3, torch 2.11 + cu130, transformers 5.17",
    ):
        assert phrase in text, phrase
    assert a["hf_compiled_468m"]["llama"]["tokens_per_s"] == 133.5e3 and a["hf_compiled_1.2b"]["mfu"] == 0.49
    assert a["hf_compiled_468m"]["neox"] == {"tokens_per_s": 132.7e3, "mfu": 0.42}
    assert a["ds_6.7b_offload"] == {"s_per_step": 7.0, "tokens_per_s": 2.3e3, "host_gib": 121}
    assert report.ANCHOR_SOURCE.startswith("docs/anchors.md")
