"""Turn the JSON that ``scripts/gpu/validate.sh OUTDIR`` left into a ``docs/benchmarks.md`` section: date, GPU,
command, the figures, and each target met or missed, next to the anchors measured on the lent H100.

    python scripts/gpu/report.py OUTDIR                                 # print the section
    python scripts/gpu/report.py OUTDIR --write docs/benchmarks.md      # insert it above "## GPU — not yet measured"

Files it reads (any may be missing: a stage that did not run is reported as not measured): stages.jsonl,
kernels.json, tests.jsonl (pytest-reportlog), bench_loss.json, bench_model.json (the hf stage's rows marked
``"bench": "hf_patch"``, the 1.2B rows ``"stage": "big"``; older folders: bench_model_1.2b.json), bench_eval.json,
scale_6.7b.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from losslab.log import fail

# The anchors (docs/anchors.md says how they were measured), read from the repository so that this script runs
# wherever the checkout is (the device, CI).
_ANCHOR_FILE = json.loads((Path(__file__).resolve().parent / "anchors.json").read_text())
ANCHOR_SOURCE = _ANCHOR_FILE["source"]
ANCHORS = {k: v for k, v in _ANCHOR_FILE.items() if k != "source"}
# Targets of issues #3, #5, #7 (docs/benchmarks.md), unchanged by #20.
TARGETS = {
    "fused_vs_liger": 1.0,
    "mile_vs_ce": 1.05,
    "vs_hf_compiled": 1.3,
    "mfu": 0.55,
    "6.7b_tokens_per_s": 7e3,
    "6.7b_host_gib": 100.0,
    # issue #25, against the stock tools on the same model: tokens/s ratios at least, wall-time ratio at most
    "eval_vs_stock": 1.0,
}
FILES = (
    "stages.jsonl",
    "kernels.json",
    "tests.jsonl",
    "bench_loss.json",
    "bench_model.json",
    "bench_eval.json",
    "scale_6.7b.json",
)
LEGACY = ("bench_model_1.2b.json",)  # read where present: folders written before the 1.2B rows joined bench_model


@dataclass
class Check:
    target: str
    measured: str
    verdict: str
    """meets | misses | not measured"""


def _read(path: Path):
    if not path.is_file() or not path.read_text().strip():
        return None
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(x) for x in text.splitlines() if x.strip()]
    return json.loads(text)


def load(out_dir: Path) -> dict:
    return {name: _read(out_dir / name) for name in FILES + LEGACY}


def model_rows(data: dict) -> tuple[list[dict], list[dict]]:
    """(the model stage's rows, the big stage's rows) of bench_model.json (and a legacy bench_model_1.2b.json)."""
    rows = data["bench_model.json"] or []
    big = [r for r in rows if r.get("stage") == "big"] + (data.get("bench_model_1.2b.json") or [])
    return [r for r in rows if r.get("stage") != "big"], big


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def fmt(x, spec: str = ".2f", suffix: str = "") -> str:
    return f"{x:{spec}}{suffix}" if finite(x) else "n/a"


def ratio(a, b) -> float:
    return a / b if finite(a) and finite(b) and b > 0 else math.nan


def verdict(value: float, limit: float, at_most: bool = True) -> str:
    if not finite(value):
        return "not measured"
    return "meets" if (value <= limit if at_most else value >= limit) else "misses"


def loss_checks(bench: dict | None) -> tuple[list[Check], list[str]]:
    lines: list[str] = []
    if not bench:
        return [
            Check("fused losses <= 1.0x Liger time and memory", "no bench_loss.json", "not measured"),
            Check("fused MiLe <= 1.05x fused CE time", "no bench_loss.json", "not measured"),
        ], lines
    rows = bench["losses"]
    liger = next((r for r in rows if r["impl"] == "liger" and "skipped" not in r), None)
    skipped = [r for r in rows if "skipped" in r]
    fused = {r["loss"]: r for r in rows if r["impl"] == "fused"}
    lines += [
        f"Loss alone: N = {bench.get('N')}, d = {bench.get('d')}, V = {rows[0]['V'] if rows else '?'}, bf16, "
        "forward + backward, median time, peak memory above the inputs"
        + (f"; Liger Kernel {liger['version']} in the same run." if liger else "."),
        "",
        "| loss | impl | row kernel | ms | peak GiB | time / Liger | memory / Liger | grad rel err vs naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['loss']} | {r['impl']} | | skipped: {r['skipped']} | | | | |")
            continue
        t = ratio(r["ms"], liger["ms"]) if liger else math.nan
        m = ratio(r["peak_gib"], liger["peak_gib"]) if liger else math.nan
        err = max(r.get("grad_h_rel", math.nan), r.get("grad_w_rel", math.nan))
        kernel = r.get("kernel", "").rsplit(":", 1)[-1]
        lines.append(
            f"| {r['loss']} | {r['impl']} | {kernel} | {fmt(r['ms'])} | {fmt(r['peak_gib'])} | "
            f"{fmt(t, '.2f', 'x')} | {fmt(m, '.2f', 'x')} | {fmt(err, '.1e')} |"
        )
    a = ANCHORS
    lines += [
        "",
        f"Anchors ({ANCHOR_SOURCE}): Liger {a['liger_ce']['ms']} ms / {a['liger_ce']['gib']} GiB, naive CE "
        f"{a['naive_ce']['ms']} ms / {a['naive_ce']['gib']} GiB, naive MiLe {a['naive_mile']['ms']} ms / "
        f"{a['naive_mile']['gib']} GiB.",
    ]
    checks = []
    why = "" if liger else f" (no Liger row: {skipped[0]['skipped'] if skipped else 'missing'})"
    for name, r in sorted(fused.items()):
        t = ratio(r["ms"], liger["ms"]) if liger else math.nan
        m = ratio(r["peak_gib"], liger["peak_gib"]) if liger else math.nan
        worst = max(t, m) if finite(t) and finite(m) else math.nan
        checks.append(
            Check(
                f"fused {name} <= 1.0x Liger time and memory",
                f"{fmt(t, '.2f', 'x')} time, {fmt(m, '.2f', 'x')} memory{why}",
                verdict(worst, TARGETS["fused_vs_liger"]),
            )
        )
    mile = ratio(fused.get("mile", {}).get("ms"), fused.get("ce", {}).get("ms"))
    checks.append(
        Check("fused MiLe <= 1.05x fused CE time", fmt(mile, ".3f", "x"), verdict(mile, TARGETS["mile_vs_ce"]))
    )
    return checks, lines


def model_checks(rows: list[dict] | None) -> tuple[list[Check], list[str]]:
    rows = [r for r in rows or [] if "bench" not in r]  # the hf stage's rows are its own (hf_checks)
    if not rows:
        return [Check("468M >= 1.3x HF compiled, >= 55% MFU", "no bench_model.json", "not measured")], []
    lines = [
        "Model step (forward, loss, backward, fused AdamW; bf16 autocast; MFU = tokens/s x (6N + 12 L d T) / "
        "989 TFLOP/s, N = all parameters):",
        "",
        "| block | impl | preset | seq | compiled | micro-batch | tokens/s | MFU | peak GiB | losslab / HF (this run) "
        "| HF compiled anchor (H100) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks, shares = [], []
    for r in rows:
        if not r.get("micro_batch"):
            lines.append(
                f"| {r['block']} | {r['impl']} | {r['preset']} | {r['seq']} | {r['compiled']} | — | "
                f"{r.get('error', 'did not run')[:120]} | | | | |"
            )
            continue
        hf = next(
            (
                h
                for h in rows
                if h["impl"] == "hf"
                and h["block"] == r["block"]
                and h["seq"] == r["seq"]
                and h["compiled"] == r["compiled"]
                and h.get("micro_batch")
            ),
            None,
        )
        rel = ratio(r["tokens_per_s"], hf["tokens_per_s"]) if hf and r["impl"] == "losslab" else math.nan
        anchor = ANCHORS["hf_compiled_468m"].get(r["block"]) if r["preset"] == "468m" and r["seq"] == 1024 else None
        anchor_txt = f"{anchor['tokens_per_s'] / 1e3:.1f}k ({anchor['mfu']:.0%} MFU)" if anchor else ""
        lines.append(
            f"| {r['block']} | {r['impl']} | {r['preset']} | {r['seq']} | {r['compiled']} | {r['micro_batch']} | "
            f"{r['tokens_per_s']:.0f} | {fmt(r['mfu'], '.1%')} | {fmt(r['peak_gib'], '.1f')} | "
            f"{fmt(rel, '.2f', 'x')} | {anchor_txt} |"
        )
        if r["impl"] != "losslab":
            continue
        mode = "compiled" if r["compiled"] else "eager"
        checks.append(
            Check(
                f"{r['preset']} {r['block']} >= 1.3x HF {mode} (same run)",
                fmt(rel, ".2f", "x"),
                verdict(rel, TARGETS["vs_hf_compiled"], at_most=False),
            )
        )
        checks.append(
            Check(
                f"{r['preset']} {r['block']} >= 55% MFU",
                fmt(r["mfu"], ".1%"),
                verdict(r["mfu"], TARGETS["mfu"], at_most=False),
            )
        )
        if r.get("time_share"):
            share = ", ".join(f"{k} {v:.0%}" for k, v in r["time_share"].items())
            shares.append(f"- {r['block']}: {share}")
    if shares:
        lines += [
            "",
            "What limits MFU — share of GPU kernel time by kind, losslab rows (matmuls at their best are "
            "the ceiling; the rest is overhead to cut):",
            *shares,
        ]
    return checks, lines


HF_LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 5e-3}
"""How far the patched ce may be from transformers' own loss, step by step (bf16: both round their logits)."""


def hf_checks(rows: list[dict] | None) -> tuple[list[Check], list[str]]:
    """The hf stage (bench_hf_patch.py, rows added to bench_model.json): losslab.hf's patch vs transformers'
    own loss in a few Trainer steps."""
    rows = [r for r in rows or [] if r.get("bench") == "hf_patch"]
    target = "HF Trainer + losslab.hf patch: ce = HF's loss, less memory, no slower"
    if not rows:
        return [Check(target, "not run", "not measured")], []
    plain = next((r for r in rows if r["variant"] == "plain ce"), None)
    patched = next((r for r in rows if r["variant"] == "patched ce"), None)
    if plain is None or patched is None:
        return [Check(target, "incomplete rows", "not measured")], []
    first = rows[0]
    lines = [
        f"HF Trainer steps ({first['model']}, {first['params'] / 1e6:.0f}M parameters, vocabulary {first['vocab']}, "
        f"{first['precision']}, micro-batch {first['batch']} x {first['seq']}; `scripts/bench_hf_patch.py`), "
        "with losslab.hf's patch and with transformers' own loss:",
        "",
        "| variant | s / step | tokens/s | peak MiB of a step | vs HF: time, memory | losses |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, m = ratio(r["s_per_step"], plain["s_per_step"]), ratio(r["peak_mib"], plain["peak_mib"])
        losses = ", ".join(f"{x:.4f}" for x in r["losses"])
        vs = f"{fmt(t, '.2f', 'x')}, {fmt(m, '.2f', 'x')}"
        lines.append(f"| {r['variant']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{fmt(r['peak_mib'], '.0f')} | {vs} | {losses} |")  # fmt: skip
    tolerance = HF_LOSS_TOLERANCE.get(first["precision"], 1e-5)
    diff = patched.get("max_rel_loss_diff_vs_plain", math.nan)
    checks = [
        Check(f"HF patch: ce loss = HF's, every step (rel. diff <= {tolerance:g})", fmt(diff, ".1e"),
              verdict(diff, tolerance)),
        Check("HF patch: peak memory of a step < HF's", fmt(ratio(patched["peak_mib"], plain["peak_mib"]), ".2f", "x"),
              verdict(ratio(patched["peak_mib"], plain["peak_mib"]), 0.999)),
        Check("HF patch: time per step <= HF's (2% noise)",
              fmt(ratio(patched["s_per_step"], plain["s_per_step"]), ".2f", "x"),
              verdict(ratio(patched["s_per_step"], plain["s_per_step"]), 1.02)),
    ]  # fmt: skip
    return checks, lines


def big_checks(rows: list[dict] | None) -> tuple[list[Check], list[str]]:
    a = ANCHORS["hf_compiled_1.2b"]
    if not rows:
        return [Check("1.2B >= 55% MFU", "not run (no time left)", "not measured")], []
    checks, lines = [], []
    for r in rows:
        if not r.get("micro_batch"):
            lines.append(f"- {r['preset']} {r['block']}: {r.get('error', 'did not run')[:200]}")
            checks.append(Check(f"{r['preset']} {r['block']} >= 55% MFU", "did not run", "not measured"))
            continue
        lines.append(
            f"- {r['preset']} {r['block']}, seq {r['seq']}, micro-batch {r['micro_batch']}, "
            f"{'compiled' if r['compiled'] else 'eager'}: {r['tokens_per_s']:.0f} tokens/s, "
            f"{fmt(r['mfu'], '.1%')} MFU, {fmt(r['peak_gib'], '.1f')} GiB peak; anchor HF Llama 1.2B compiled "
            f"{a['tokens_per_s'] / 1e3:.1f}k tokens/s ({a['mfu']:.0%} MFU)"
        )
        checks.append(
            Check(
                f"{r['preset']} {r['block']} >= 55% MFU",
                fmt(r["mfu"], ".1%"),
                verdict(r["mfu"], TARGETS["mfu"], at_most=False),
            )
        )
    return checks, lines


def scale_checks(row: dict | None) -> tuple[list[Check], list[str]]:
    a = ANCHORS["ds_6.7b_offload"]
    if not row:
        return [
            Check("6.7B ZeRO-3 offload >= 7k tokens/s, <= 100 GiB host", "not run (no time left)", "not measured")
        ], []
    if not row.get("steps"):
        why = row.get("skipped") or row.get("error") or "no step finished"
        return [
            Check(
                "6.7B ZeRO-3 offload >= 7k tokens/s, <= 100 GiB host",
                f"0 steps in {row.get('budget_s', '?')} s ({why})",
                "not measured",
            )
        ], []
    tps, host = row.get("tokens_per_s", math.nan), row.get("host_peak_gib", math.nan)
    line = (
        f"- 6.7B ZeRO-3 + optimizer offload ({row.get('overrides', '')}): {row['steps']} steps in "
        f"{row.get('budget_s', '?')} s{' (cut at the budget)' if row.get('killed_at_budget') else ''}, "
        f"{fmt(tps, '.0f')} tokens/s, {fmt(row.get('mfu'), '.1%')} MFU, GPU peak "
        f"{fmt(row.get('gpu_peak_gib'), '.1f')} GiB, host peak {fmt(host, '.1f')} GiB; anchor (HF + DeepSpeed) "
        f"{a['s_per_step']} s/step = {a['tokens_per_s'] / 1e3:.1f}k tokens/s, {a['host_gib']} GiB host"
    )
    v_tps, v_host = verdict(tps, TARGETS["6.7b_tokens_per_s"], at_most=False), verdict(host, TARGETS["6.7b_host_gib"])
    both = "not measured" if "not measured" in (v_tps, v_host) else "meets" if v_tps == v_host == "meets" else "misses"
    return [
        Check(
            "6.7B ZeRO-3 offload >= 7k tokens/s, <= 100 GiB host",
            f"{fmt(tps, '.0f')} tokens/s, {fmt(host, '.1f')} GiB host",
            both,
        )
    ], [line]


def kernel_lines(kernels: dict | None, tests: list[dict] | None) -> tuple[list[Check], list[str]]:
    checks, lines = [], []
    if kernels:
        rows = kernels["rows"]
        ok = sum(r["ok"] for r in rows)
        lines += [
            f"Kernels: every fused configuration in bf16 against float64, N = {kernels['N']}, d = {kernels['d']}, "
            f"V = {kernels['V']} (tolerance: loss {kernels['tol_loss']:g}, gradients {kernels['tol_grad']:g}): "
            f"{ok} of {len(rows)} within tolerance.",
            "",
            "| case | kernel asked | ran | loss rel err | grad_h rel err | grad_w rel err | ok |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            errs = " | ".join(fmt(r.get(k), ".1e") for k in ("loss_rel", "grad_h_rel", "grad_w_rel"))
            ran = r.get("ran", "").rsplit(":", 1)[-1] or r.get("error", "")[:100]
            lines.append(f"| {r['case']} | {r['kernel']} | {ran} | {errs} | {'yes' if r['ok'] else '**no**'} |")
        for name, v in (kernels.get("self_checks") or {}).items():
            lines.append(f"- self-check of {name}: {'passed' if v['ok'] else 'FAILED: ' + v['reason']}")
        checks.append(
            Check(
                "fused losses on CUDA within tolerance of float64 (Triton gradients included)",
                f"{ok} of {len(rows)}",
                "meets" if ok == len(rows) and rows else "misses",
            )
        )
    else:
        checks.append(Check("fused losses on CUDA within tolerance of float64", "no kernels.json", "not measured"))
    if tests is not None:
        count = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "skipped")}
        lines += [
            "",
            f"Tests on the device: {count['passed']} passed, {count['failed']} failed, {count['skipped']} skipped.",
        ]
        lines += [f"- failed: `{t['test']}` ({t['when']}): {t['message']}" for t in tests if t["outcome"] == "failed"]
        checks.append(
            Check(
                "tests/test_cuda.py and the Triton tests pass on the device",
                f"{count['passed']} passed, {count['failed']} failed, {count['skipped']} skipped",
                "misses" if count["failed"] else ("meets" if count["passed"] else "not measured"),
            )
        )
    return checks, lines


def test_results(reports: list[dict] | None) -> list[dict] | None:
    """pytest-reportlog's lines (``pytest --report-log tests.jsonl``: one per phase of each test, written as it
    ends, so a session cut at its time limit keeps what it reached) as one row per test — its call, or the
    setup or teardown that failed or skipped it: ``test``, ``outcome``, ``when``, ``seconds``, ``message`` (the
    skip reason, or the failure's message)."""
    if reports is None:
        return None
    rows = []
    for r in reports:
        if r.get("$report_type") != "TestReport" or (r["when"] != "call" and r["outcome"] == "passed"):
            continue
        rows.append({"test": r["nodeid"], "outcome": r["outcome"], "when": r["when"],
                     "seconds": round(r["duration"], 3), "message": _message(r)})  # fmt: skip
    return rows


def _message(report: dict) -> str:
    longrepr = report.get("longrepr")
    if report["outcome"] == "passed" or not longrepr:
        return ""
    if isinstance(longrepr, list):  # a skip: (file, line, "Skipped: reason")
        return str(longrepr[2])
    crash = longrepr.get("reprcrash") if isinstance(longrepr, dict) else None
    text = crash["message"] if crash else str(longrepr)
    lines = text.strip().splitlines()
    return lines[0][:500] if lines else ""


def eval_checks(bench: dict | None) -> tuple[list[Check], list[str]]:
    """Issue #25: generation, evaluate.py and the fine-tuning step next to the stock tools (scripts/bench_eval.py)."""
    wanted = [
        "generation >= 1.0x transformers generate() tokens/s, equal outputs",
        "evaluate.py <= 1.0x lm_eval --model hf wall time, same scores",
        "fine-tuning step >= 1.0x transformers tokens/s",
    ]
    if not bench or not bench.get("rows"):
        return [Check(t, "no bench_eval.json", "not measured") for t in wanted], []
    env, rows = bench.get("env", {}), bench["rows"]
    lines = [
        f"Evaluation next to the stock tools (`scripts/bench_eval.py`, issue #25): model {env.get('model', '?')}, "
        f"medians of the runs, each side's min-max; ratio = losslab / stock.",
        "",
        "| comparison | losslab | stock | ratio (paired min-max) | same output |",
        "|---|---|---|---|---|",
    ]
    checks, seen = [], set()
    for r in rows:
        part = r["part"]
        if "skipped" in r:
            lines.append(f"| {part} | | | not measured: {r['skipped']} | |")
            continue
        if part == "generation":
            what, same = f"greedy generation, batch {r['batch']} (tokens/s)", r["equal_outputs"]
            target, ok = f"generation batch {r['batch']} >= 1.0x generate() tokens/s, equal outputs", same
        elif part == "evaluate":
            what, same = f"evaluate.py, {r['task']}, {r['limit']} docs (s)", r["same_scores"]
            target, ok = f"evaluate.py on {r['task']} <= 1.0x lm_eval --model hf time, same scores", same
        else:
            what, same = f"fine-tuning step, {r['precision']}, {r['batch']} x {r['seq']} (tokens/s)", None
            target, ok = f"fine-tuning step {r['precision']} >= 1.0x transformers tokens/s", True
        seen.add(part)
        o, s_, p = r["losslab"], r["stock"], r["paired_ratio"]
        lines.append(
            f"| {what} | {o['median']:.1f} ({o['min']:.1f}-{o['max']:.1f}) | {s_['median']:.1f} "
            f"({s_['min']:.1f}-{s_['max']:.1f}) | {r['ratio']:.2f}x ({p['min']:.2f}-{p['max']:.2f}) | "
            f"{'' if same is None else 'yes' if same else '**no**'} |"
        )
        v = verdict(r["ratio"], TARGETS["eval_vs_stock"], at_most=not r["higher_is_better"])
        checks.append(Check(target, f"{r['ratio']:.2f}x" + ("" if ok else " (outputs differ)"),
                            v if ok or v == "not measured" else "misses"))  # fmt: skip
    for part, t in zip(("generation", "evaluate", "train_step"), wanted, strict=True):
        if part not in seen:
            checks.append(Check(t, "not run", "not measured"))
    return checks, lines


def parts(data: dict) -> list[tuple[list[Check], list[str]]]:
    """(checks against the targets, markdown lines) of each stage, in the order validate.sh runs them."""
    model, big = model_rows(data)
    return [
        kernel_lines(data["kernels.json"], test_results(data["tests.jsonl"])),
        loss_checks(data["bench_loss.json"]),
        model_checks(model),
        hf_checks(model),
        eval_checks(data["bench_eval.json"]),
        big_checks(big),
        scale_checks(data["scale_6.7b.json"]),
    ]


def checks_of(data: dict) -> list[Check]:
    return [c for part_checks, _ in parts(data) for c in part_checks]


def stage_note(stage: dict) -> str:
    if stage.get("timed_out"):
        return " (cut at its budget)"
    if stage.get("note"):
        return f" ({stage['note']})"
    return f" (exit {stage['rc']})" if stage["rc"] else ""


def section(data: dict) -> str:
    stages = data["stages.jsonl"] or []
    env = next((s for s in stages if s.get("stage") == "env"), {})
    runs = [s for s in stages if s.get("stage") != "env"]
    versions = env.get("versions", {})
    date = env.get("date", "date unknown")[:10]
    title = f"## GPU: {env.get('gpu', 'unknown device')}, {date} — `scripts/gpu/validate.sh`"
    head = [
        title,
        "",
        f"Command: `{env.get('command', '?')}` (one device call; `scripts/gpu/README.md`), at "
        f"{env.get('date', '?')}; " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
        "Stages: " + ", ".join(f"{s['stage']} {s['seconds']} s{stage_note(s)}" for s in runs) + ".",
    ]
    if env.get("toy"):
        head += [
            "",
            "**CPU dry run at toy sizes**: it checks the script end to end; none of its figures is a measurement.",
        ]
    checks, body = [], []
    for part_checks, part_lines in parts(data):
        checks += part_checks
        if part_lines:
            body += ["", *part_lines]
    table = ["", "| target | measured | verdict |", "|---|---|---|"]
    table += [f"| {c.target} | {c.measured} | {c.verdict} |" for c in checks]
    return "\n".join(head + table + body) + "\n"


def insert(doc: Path, text: str, marker: str = "## GPU — not yet measured") -> None:
    """Put the section above ``marker`` (the list of figures still owed), or at the end."""
    old = doc.read_text() if doc.is_file() else ""
    at = old.find(marker)
    new = old[:at] + text + "\n" + old[at:] if at >= 0 else old.rstrip("\n") + "\n\n" + text
    doc.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="the folder validate.sh wrote")
    parser.add_argument("--write", type=Path, help="insert the section into this file (docs/benchmarks.md)")
    args = parser.parse_args(argv)
    if not (args.out_dir / "stages.jsonl").is_file():
        return fail(f"{args.out_dir}/stages.jsonl not found: not a validate.sh output folder")
    try:
        text = section(load(args.out_dir))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return fail(f"{args.out_dir}: unreadable results ({type(e).__name__}: {e})")
    if args.write:
        insert(args.write, text)
        print(f"wrote the section into {args.write}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
