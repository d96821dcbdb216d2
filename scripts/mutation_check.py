"""Mutation check, run by hand before a release (not in CI): plausible bugs, introduced one at a time into a
copy of this checkout, must each make at least one test fail.

    python scripts/mutation_check.py                 # every mutant; a JSON + markdown report under --out
    python scripts/mutation_check.py --list          # the mutants and their tests
    python scripts/mutation_check.py --check         # only verify that every mutant's snippet is still in the code
    python scripts/mutation_check.py --only objective-labels-are-inputs loop-denominator-no-factor

Each mutant is (file, an exact snippet of the original code, its replacement, the tests that should catch it).
The checkout (tracked and untracked, not ignored, files: the working tree as it is) is copied once to a
temporary directory; each mutant is applied there, its tests run with a timeout (``python -m pytest -x``), and
the file is restored. A mutant whose tests fail is *killed*, one whose tests pass *survived*; a snippet no
longer found in the code is *stale* (update the list). The selected tests are first run on the unmutated copy
(the baseline): a mutant is only counted as killed by tests that pass without it. A copy, never this checkout,
is mutated: other work can go on here meanwhile. Curated rather than generated (mutmut, cosmic-ray): on two
cores a generated mutant set would take days with a suite of minutes; each mutant here names the few tests
that pin the behaviour it breaks. See docs/mutation.md for the latest score and the survivors' explanations.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from losslab.log import fail

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    """pytest selections, each ``FILE`` or ``FILE -k EXPR``; run one after the other, stopping at a failure."""
    what: str
    equivalent: str = ""
    """Why no test can kill it (the behaviour is unchanged), for a mutant kept to show that it is known."""


def m(id: str, file: str, original: str, replacement: str, tests: str, what: str, equivalent: str = "") -> Mutant:
    """``tests``: pytest selections separated by ";", each a file with an optional "-k EXPR"."""
    return Mutant(id, file, original, replacement, tuple(t.strip() for t in tests.split(";")), what, equivalent)


TRUTH_DIST = "tests/test_truth_distributed.py"
NONFINITE = "tests/test_truth_train.py -k nonfinite"
ROUND_TRIP = "tests/test_truth_train.py -k round_trip"
LOSSES = "tests/test_losses.py"
LOSSES_DIST = "tests/test_losses_distributed.py"
HF = "tests/test_hf.py -k export_matches_transformers or import_"

MUTANTS: list[Mutant] = [
    # --- the seven survivors of issue 14 -------------------------------------------------------------------------
    m("objective-labels-are-inputs", "trainer/objective.py",
      "labels = windows[:, 1:]", "labels = windows[:, :-1]",
      "tests/test_truth_objective.py", "labels equal to the inputs (the model learns to copy)"),
    m("loop-denominator-no-factor", "trainer/loop.py",
      "denominator = valid / (shape.grad_accum * shape.world_size)", "denominator = valid",
      TRUTH_DIST, "the global-token denominator loses its grad_accum * world_size factor"),
    m("nonfinite-run-never-resets", "trainer/loop.py",
      "tally.nonfinite_run = (tally.nonfinite_run + 1) * bad", "tally.nonfinite_run = tally.nonfinite_run + bad",
      NONFINITE, "the non-finite counter counts in total, not in a row"),
    m("is-greedy-any", "evals/lm.py",
      "all(token_greedy[s : s + len(c)])", "any(token_greedy[s : s + len(c)])",
      "tests/test_eval.py -k greedy", "is_greedy true when any continuation token is the argmax"),
    m("rolling-drops-first-window", "evals/lm.py",
      "out.append(sum(s for s, _ in scores))", "out.append(sum(s for s, _ in scores[1:]))",
      "tests/test_eval.py -k rolling", "loglikelihood_rolling drops its first window"),
    m("hf-import-ignores-layer-norm-eps", "models/hf.py",
      "norm_eps=hf_cfg.layer_norm_eps,", "norm_eps=1e-5,",
      HF, "HF import ignores the source's layer_norm_eps"),
    m("rng-not-restored", "trainer/checkpoint.py",
      "set_rng_state(load_json(rng_file))", "load_json(rng_file)",
      ROUND_TRIP, "RNG states not restored on resume"),
    # --- trainer/objective.py and trainer/loop.py ----------------------------------------------------------------
    m("objective-inputs-shifted", "trainer/objective.py",
      "inputs = windows[:, :-1]", "inputs = windows[:, 1:]",
      "tests/test_truth_objective.py", "inputs equal to the labels"),
    m("objective-predicts-across-documents", "trainer/objective.py",
      "labels = mask_document_starts(labels, segment_ids)", "labels = labels",
      "tests/test_truth_objective.py -k packed", "a document's last token is trained to predict the next document"),
    m("packing-attends-across-documents", "models/gpt.py",
      "return cls(positions=idx - first, mask=(same & causal)[:, None])",
      "return cls(positions=idx - first, mask=causal.expand(B, T, T)[:, None])",
      "tests/test_truth_objective.py -k packed", "attention crosses packed documents"),
    m("objective-ignores-given-labels", "trainer/objective.py",
      "        if labels is None:\n            labels = windows[:, 1:]",
      "        if True:\n            labels = windows[:, 1:]",
      "tests/test_truth_objective.py -k given_labels", "explicit (masked) labels replaced by the next tokens"),
    m("objective-drops-denominator", "trainer/objective.py",
      "self.loss_fn(h, w, labels, denominator=denominator,", "self.loss_fn(h, w, labels, denominator=None,",
      TRUTH_DIST, "the loop's global denominator never reaches the loss (per-micro-batch means)"),
    m("loop-valid-counts-inputs", "trainer/loop.py",
      "(labels(w) != IGNORE_INDEX)",
      '((w if isinstance(w, torch.Tensor) else w["tokens"])[:, 1:] != IGNORE_INDEX)',
      TRUTH_DIST, "the loop counts every target, also those a loss mask ignores"),
    m("loop-valid-not-all-reduced", "trainer/loop.py",
      "torch.distributed.all_reduce(valid)", "valid = valid",
      TRUTH_DIST, "each rank divides by its own valid-token count"),
    m("loop-denominator-no-world", "trainer/loop.py",
      "denominator = valid / (shape.grad_accum * shape.world_size)", "denominator = valid / shape.grad_accum",
      TRUTH_DIST, "the denominator forgets the world size"),
    m("loop-metrics-not-averaged-over-micro", "trainer/loop.py",
      "torch.nan_to_num(sums / shape.grad_accum)", "torch.nan_to_num(sums)",
      TRUTH_DIST, "logged step metrics summed, not averaged, over micro-steps"),
    m("nonfinite-limit-off-by-one", "trainer/loop.py",
      "if limit and max_run >= limit:", "if limit and max_run > limit:",
      NONFINITE, "the run stops one non-finite step too late"),
    m("nonfinite-last-step-wrong", "trainer/loop.py",
      "torch.where(bad.bool(), step, tally.last_nonfinite_step)",
      "torch.where(bad.bool(), step - 1, tally.last_nonfinite_step)",
      NONFINITE, "the error names the wrong step"),
    m("nonfinite-step-not-skipped", "trainer/loop.py",
      "optimizer.found_inf = bad.float()", "optimizer.found_inf = None",
      "tests/test_truth_train.py -k changes_no_weight", "a non-finite step updates the parameters"),
    # --- losslab/losses --------------------------------------------------------------------------------------------
    m("mile-weight-without-one", "losslab/losses/weighting.py",
      "w = (1.0 + rows.entropy).pow(self.gamma)", "w = rows.entropy.pow(self.gamma)",
      LOSSES, "MiLe's weight (H)^gamma instead of (1 + H)^gamma"),
    m("focal-weight-not-detached", "losslab/losses/weighting.py",
      "w = (-torch.expm1(-rows.ce.detach())).pow(self.gamma)", "w = (-torch.expm1(-rows.ce)).pow(self.gamma)",
      LOSSES, "the paper's focal weight carries gradient"),
    m("focal-lin-drops-alpha", "losslab/losses/weighting.py",
      "return self.focal_alpha * one_minus_p.pow(self.gamma) * ce,", "return one_minus_p.pow(self.gamma) * ce,",
      LOSSES, "Lin et al.'s alpha ignored"),
    m("pdl-exponent-sign", "losslab/losses/weighting.py",
      'w = (counts + p["smoothing"] + p["eps"]).pow(-p["alpha"])',
      'w = (counts + p["smoothing"] + p["eps"]).pow(p["alpha"])',
      LOSSES, "PDL weights grow with frequency"),
    m("pdl-no-smoothing", "losslab/losses/weighting.py",
      'w = (counts + p["smoothing"] + p["eps"]).pow(-p["alpha"])', 'w = (counts + p["eps"]).pow(-p["alpha"])',
      LOSSES, "PDL ignores its add-k smoothing"),
    m("normaliser-not-rank-averaged", "losslab/losses/module.py",
      "scale = scale / dist.get_world_size()", "scale = scale",
      LOSSES_DIST, "the rank-summed normaliser is not divided by the world size"),
    m("normaliser-local", "losslab/losses/module.py",
      "dist.all_reduce(scale, op=dist.ReduceOp.SUM)", "pass",
      LOSSES_DIST + ";" + TRUTH_DIST, "each rank normalises by its own weights only"),
    m("ignored-positions-counted", "losslab/losses/module.py",
      "counted = torch.ones_like(valid) if self.weighting.counts_ignored else valid",
      "counted = valid if self.weighting.counts_ignored else torch.ones_like(valid)",
      LOSSES, "count_ignored inverted"),
    m("token-mean-ignores-denominator", "losslab/losses/module.py",
      "tokens = (n if denom is None else denom).clamp_min(1.0)", "tokens = n.clamp_min(1.0)",
      LOSSES + ";" + TRUTH_DIST, "the trainer's denominator is ignored"),
    m("metric-ce-over-all-positions", "losslab/losses/module.py",
      '"ce": (ce * valid).sum() / safe_valid,', '"ce": (ce * valid).sum() / y.numel(),',
      LOSSES + ";tests/test_truth_objective.py", "the logged CE divides by ignored positions too"),
    m("torch-rows-entropy-sign", "losslab/losses/rows.py",
      "torch.sub(lse, (p.unsqueeze(1) @ z.to(acc).unsqueeze(2)).view(-1), out=ent_out)",
      "torch.add(lse, (p.unsqueeze(1) @ z.to(acc).unsqueeze(2)).view(-1), out=ent_out)",
      LOSSES, "the torch kernel's entropy sign (no gradients, or two passes)"),
    m("softmax-grads-entropy-sign", "losslab/losses/grads.py",
      "torch.sub(lse, (h.unsqueeze(1) @ p_w.unsqueeze(2)).view(-1), out=out)",
      "torch.add(lse, (h.unsqueeze(1) @ p_w.unsqueeze(2)).view(-1), out=out)",
      LOSSES, "the entropy from the gradient's p @ W: its sign (one pass)"),
    m("softmax-grads-onehot-sign", "losslab/losses/grads.py",
      "self.grad_w.index_add_(0, y, b * h, alpha=-1.0)", "self.grad_w.index_add_(0, y, b * h, alpha=1.0)",
      LOSSES, "fused head-weight gradient adds the one-hot instead of subtracting it"),
    m("torch-rows-ce-not-masked", "losslab/losses/rows.py",
      "torch.neg(logp_y, out=ce_out).masked_fill_(~valid, 0.0)", "torch.neg(logp_y, out=ce_out)",
      LOSSES, "fused CE of ignored positions not zeroed"),
    m("two-pass-gradients-skipped", "losslab/losses/blocks.py",
      "    if loop.grads is None:\n        return\n    for s, e in spans:",
      "    if loop.grads is not None:\n        return\n    for s, e in spans:",
      LOSSES, "the two-pass mode (rho1, a normalised loss with a z-loss) never takes its gradient pass"),
    # --- evals/lm.py and evals/buckets.py -------------------------------------------------------------------------
    m("loglikelihood-window-one-short", "evals/lm.py",
      "whole = (ctx + cont)[-(self.max_length + 1) :]", "whole = (ctx + cont)[-self.max_length :]",
      "tests/test_eval.py -k loglikelihood_equals", "truncation keeps one token of context too few"),
    m("loglikelihood-rows-off-by-one", "evals/lm.py",
      "hidden[i, len(x) - len(c) : len(x)]", "hidden[i, len(x) - len(c) - 1 : len(x) - 1]",
      "tests/test_eval.py -k loglikelihood_equals or greedy", "continuation scored from the wrong positions"),
    m("rolling-context-len", "evals/lm.py",
      "context_len=1,", "context_len=2,",
      "tests/test_eval.py -k rolling", "rolling windows overlap by a token"),
    m("prefix-token-bos", "evals/lm.py",
      "return self.tok.eos_id", "return self.tok.bos_id",
      "tests/test_eval.py -k rolling", "documents are read after BOS, which training never put before them"),
    m("generation-one-token-too-many", "evals/lm.py",
      "g.done = len(g.tokens) >= g.max_new", "g.done = len(g.tokens) > g.max_new",
      "tests/test_eval.py -k generation", "generation runs past max_gen_toks"),
    m("loglikelihood-sort-removed", "evals/lm.py",
      "items.sort(key=lambda it: -len(it[1]))", "pass",
      "tests/test_eval.py -k loglikelihood or greedy", "requests scored in arrival order, not longest first",
      equivalent="the sort only groups lengths to cut padding; results are put back by index, and a causal model's "
                 "padding after a sequence never reaches its scored positions"),
    m("buckets-threshold", "evals/buckets.py",
      'BUCKETS = (("high", 0.80), ("medium", 0.95), ("low", 1.0))',
      'BUCKETS = (("high", 0.90), ("medium", 0.95), ("low", 1.0))',
      "tests/test_eval.py -k frequency_buckets", "high bucket covers 90%"),
    m("buckets-by-input-token", "evals/buckets.py",
      "y = batch[:, 1:].reshape(-1)", "y = batch[:, :-1].reshape(-1)",
      "tests/test_eval.py -k bucket_losses", "held-out loss scored against the inputs"),
    # --- models/hf.py -------------------------------------------------------------------------------------------
    m("hf-import-rotary-pct-default", "models/hf.py",
      'rotary_pct=rope.get("partial_rotary_factor", getattr(hf_cfg, "rotary_pct", 0.25)),', "rotary_pct=0.25,",
      HF, "HF import ignores partial_rotary_factor"),
    m("hf-import-rope-base-default", "models/hf.py",
      'rotary_base=rope.get("rope_theta", getattr(hf_cfg, "rotary_emb_base", 10000.0)),', "rotary_base=10000.0,",
      HF, "HF import (neox) ignores rope_theta"),
    m("hf-import-ignores-rms-norm-eps", "models/hf.py",
      "norm_eps=hf_cfg.rms_norm_eps,", "norm_eps=1e-6,",
      HF, "HF import ignores the source's rms_norm_eps"),
    m("hf-export-ignores-layer-norm-eps", "models/hf.py",
      "layer_norm_eps=cfg.norm_eps,", "",
      HF, "HF export leaves layer_norm_eps at transformers' default"),
    m("hf-export-qkv-order", "models/hf.py",
      "qkv[:, g].reshape(KV * hd, d)", "qkv[:, g + 1].reshape(KV * hd, d)",
      HF, "LLaMA export splits the fused QKV in the wrong order"),
    m("hf-import-qkv-layout", "models/hf.py",
      "torch.cat([q, k, v], dim=1)", "torch.cat([k, q, v], dim=1)",
      HF, "LLaMA import fuses q, k, v in the wrong layout"),
    # --- data/ --------------------------------------------------------------------------------------------------
    m("batch-labels-ignore-loss-mask", "data/batch.py",
      'targets = targets.masked_fill(~batch["loss_mask"][:, 1:], IGNORE_INDEX)',
      'targets = targets.masked_fill(~batch["loss_mask"][:, :-1], IGNORE_INDEX)',
      TRUTH_DIST, "the loss mask read one position off (the prompt's last token becomes a target)"),
    m("batch-labels-are-inputs", "data/batch.py",
      "targets = tokens(batch)[:, 1:]", "targets = tokens(batch)[:, :-1]",
      TRUTH_DIST, "batch targets equal to the inputs"),
    m("packing-no-eos", "data/packing.py",
      "self.buffer.append(self.eos_id)", "pass",
      "tests/test_data.py -k packing", "documents packed without EOS between them"),
    m("counts-without-eos", "data/counts.py",
      "*(doc if isinstance(doc, list) else doc[\"tokens\"]), tokenizer.eos_id]",
      "*(doc if isinstance(doc, list) else doc[\"tokens\"])]",
      "tests/test_data.py -k token_counts", "token frequencies miss the EOS that packing adds to every document"),
    m("stream-resume-one-window-back", "data/stream.py",
      "self.windows_consumed = g + 1", "self.windows_consumed = g",
      "tests/test_data.py -k resume", "resume replays the last window"),
    m("memmap-ranks-overlap", "data/memmap.py",
      "g = k * B * self.world_size + self.rank * B + np.arange(B)", "g = k * B + self.rank * B + np.arange(B)",
      "tests/test_prepared.py -k ranks_disjoint", "ranks read overlapping samples"),
    m("mixing-rank-in-source-dropped", "data/mixing.py",
      "* self.per_period[source] + self.rank_in_source[slot]", "* self.per_period[source]",
      "tests/test_prepared.py -k one_epoch or mixing", "every sample of a period maps to one window"),
    m("permutation-same-every-epoch", "data/memmap.py",
      "seed=[self.seed, source, epoch]", "seed=[self.seed, source]",
      "tests/test_prepared.py -k one_epoch", "every epoch reads the windows in the same order"),
    # --- checkpoints (portable optimizer state) -----------------------------------------------------------------
    m("portable-adam-step-off-by-one", "trainer/engine.py",
      'state["step"].fill_(adam_step)', 'state["step"].fill_(adam_step + 1)',
      ROUND_TRIP, "the portable path restores Adam's step one too far"),
    m("portable-moments-swapped", "trainer/engine.py",
      "moments = [safe_get_full_optimizer_state(p, k) for k in PORTABLE_KEYS]",
      "moments = [safe_get_full_optimizer_state(p, k) for k in reversed(PORTABLE_KEYS)]",
      ROUND_TRIP, "the portable file holds each Adam moment under the other's name"),
]  # fmt: skip


def copy_checkout(dst: Path) -> None:
    """Tracked and untracked, not ignored, files of this checkout as they are now (uncommitted edits included)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def pytest_env(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    # the copy's packages, never this checkout's (an editable install would point here)
    env.update(PYTHONPATH=str(copy), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), WANDB_SILENT="true")
    return env


def run_tests(copy: Path, tests: tuple[str, ...], timeout: int) -> tuple[int | None, float, str]:
    """-> (pytest's exit code, None on timeout; seconds; output tail). Stops at the first failing selection."""
    start, out = time.perf_counter(), ""
    for selection in tests:
        path, _, expr = selection.partition(" -k ")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            path,
            *(["-k", expr] if expr else []),
        ]
        left = timeout - (time.perf_counter() - start)
        try:
            proc = subprocess.run(cmd, cwd=copy, env=pytest_env(copy), capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - start, "timeout"
        out = (out + proc.stdout)[-2000:]
        if proc.returncode != 0:
            return proc.returncode, time.perf_counter() - start, out
    return 0, time.perf_counter() - start, out[-600:]


def status_of(rc: int | None) -> str:
    if rc is None:
        return "killed (timeout)"
    if rc == 0:
        return "survived"
    if rc == 5:
        return "no tests selected"
    return "killed"


def check_snippets(mutants: list[Mutant], root: Path) -> dict[str, str]:
    """mutant id -> problem, for snippets that are not exactly once in their file."""
    problems = {}
    for mu in mutants:
        path = root / mu.file
        count = path.read_text().count(mu.original) if path.is_file() else 0
        if count != 1:
            problems[mu.id] = f"snippet found {count} times in {mu.file}"
    return problems


def write_reports(out: Path, results: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutation.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    lines = [f"# Mutation check {meta['date']}", "", f"Command: `{meta['command']}`", "",
             f"Score: {meta['killed']} killed / {meta['scored']} scored ({meta['score']:.0%}); {meta['equivalent']} "
             f"equivalent, {meta['stale']} stale, {meta['baseline_failures']} baseline failures", "",
             "| mutant | file | status | s | tests |", "|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['id']} | {r['file']} | {r['status']} | {r['seconds']:.0f} | `{'; '.join(r['tests'])}` |")
    (out / "mutation.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=[], help="mutant ids (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true", help="only check that every snippet is in the code")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per mutant (its tests, all together)")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the tests on the unmutated copy")
    parser.add_argument("--out", default="runs/mutation", help="directory for mutation.json and mutation.md")
    args = parser.parse_args(argv)

    unknown = sorted(set(args.only) - {mu.id for mu in MUTANTS})
    if unknown:
        return fail(f"unknown mutant ids {unknown}; see --list")
    mutants = [mu for mu in MUTANTS if not args.only or mu.id in args.only]
    if args.list:
        for mu in mutants:
            print(f"{mu.id:40s} {mu.file:30s} {'; '.join(mu.tests)}\n    {mu.what}")
        return 0
    problems = check_snippets(mutants, REPO)
    if args.check:
        for mid, problem in problems.items():
            print(f"stale: {mid}: {problem}")
        print(f"{len(mutants) - len(problems)} of {len(mutants)} mutants apply")
        return 1 if problems else 0

    results, baseline_failed = [], set()
    with tempfile.TemporaryDirectory(prefix="losslab-mutation-") as tmp:
        copy = Path(tmp) / "repo"
        copy_checkout(copy)
        if not args.no_baseline:
            for selection in sorted({mu.tests for mu in mutants}):
                rc, seconds, out = run_tests(copy, selection, args.timeout)
                print(f"baseline {'; '.join(selection)}: rc={rc} ({seconds:.0f}s)", flush=True)
                if rc != 0:
                    baseline_failed.add(selection)
                    print(out, flush=True)
        for i, mu in enumerate(mutants, 1):
            path = copy / mu.file
            if mu.id in problems:
                status, rc, seconds, out = "stale", None, 0.0, problems[mu.id]
            elif mu.tests in baseline_failed:
                status, rc, seconds, out = "baseline fails", None, 0.0, "its tests fail without the mutant"
            else:
                original = path.read_text()
                path.write_text(original.replace(mu.original, mu.replacement, 1))
                try:
                    rc, seconds, out = run_tests(copy, mu.tests, args.timeout)
                finally:
                    path.write_text(original)
                status = status_of(rc)
                if status == "survived" and mu.equivalent:
                    status = "equivalent"
            print(f"[{i}/{len(mutants)}] {mu.id}: {status} ({seconds:.0f}s)", flush=True)
            results.append({**asdict(mu), "status": status, "rc": rc, "seconds": seconds, "output_tail": out})

    killed = sum(r["status"].startswith("killed") for r in results)  # equivalent mutants are not scored
    scored = sum(r["status"].startswith(("killed", "survived")) for r in results)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "scripts/mutation_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "killed": killed,
        "scored": scored,
        "score": killed / scored if scored else 0.0,
        "equivalent": sum(r["status"] == "equivalent" for r in results),
        "stale": sum(r["status"] == "stale" for r in results),
        "baseline_failures": len(baseline_failed),
        "survived": [r["id"] for r in results if r["status"] == "survived"],
    }
    write_reports(Path(args.out), results, meta)
    print(f"score: {killed}/{scored} killed; survived: {meta['survived']}; report: {Path(args.out) / 'mutation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
