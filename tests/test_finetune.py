"""Fine-tuning data (``data.sft_files``): the loss falls on the responses only, packed records are kept apart,
malformed records are skipped and counted, PDL counts the response tokens, and a run resumes exactly."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from data.batch import labels, segment_ids
from data.counts import count_tokens
from data.sft import FineTuningRecords
from data.stream import PackedStream
from data.tokenizer import Tokenizer
from losslab.losses import IGNORE_INDEX
from tests.conftest import debug_overrides
from tests.corpus import documents
from tests.test_operator import assert_same_run, logged_steps, metrics, run, start, wait_for

SEQ = 32


def records(n: int, seed: int = 0) -> list[dict]:
    """Short prompt/response pairs cut from the test corpus (several fit in one window)."""
    out = []
    for doc in documents(n, seed=seed):
        words = doc["text"].split()
        out.append({"prompt": " ".join(words[:4]) + "\n", "response": " ".join(words[4:9])})
    return out


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "pairs.jsonl"
    rows = [json.dumps(r) for r in records(200)]
    # malformed: not JSON, an empty response, a chat without an assistant turn, a number for a prompt
    no_assistant = {"messages": [{"role": "user", "content": "hi"}]}
    bad = ["{not json", json.dumps({"prompt": "a", "response": " "}), json.dumps(no_assistant),
           json.dumps({"prompt": 3, "response": "b"})]  # fmt: skip
    rows[10:10] = bad
    path.write_text("\n".join(rows) + "\n")
    return path


def stream(path: Path, tokenizer: str, **kwargs) -> PackedStream:
    return PackedStream([str(path)], Tokenizer(tokenizer), seq_len=SEQ, batch_size=4, shuffle_buffer=0,
                        document_format=FineTuningRecords(**kwargs))  # fmt: skip


def expected_targets(tok: Tokenizer, rows: list[dict], n_windows: int) -> list[list[int]]:
    """The label of every position, built from the records directly: a response token (or the EOS after it)
    is its own label, a prompt token or the first token of a record is ignored."""
    flat: list[tuple[int, bool, int]] = []  # (token, carries loss, record index)
    for i, r in enumerate(rows):
        p, a = tok.encode(r["prompt"]), tok.encode(r["response"])
        flat += [(t, False, i) for t in p] + [(t, True, i) for t in a] + [(tok.eos_id, True, i)]
    window = SEQ + 1
    out = []
    for w in range(n_windows):
        chunk = flat[w * window : (w + 1) * window]
        out.append([t if loss and chunk[j][2] == i else IGNORE_INDEX
                    for j, (t, loss, i) in enumerate(chunk[1:])])  # fmt: skip
    return out


def test_labels_are_the_responses_and_records_stay_apart(sft_file, corpus):
    s = stream(sft_file, corpus["tokenizer"])
    batch = next(iter(s))  # 4 windows
    assert set(batch) == {"tokens", "loss_mask", "segments"}
    assert labels(batch).tolist() == expected_targets(Tokenizer(corpus["tokenizer"]), good_records(sft_file), 4)
    seg = segment_ids(batch)
    assert (seg[:, 0] == 0).all() and (seg.diff(dim=1) >= 0).all() and seg.max() > 0  # several records a row


def good_records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [json.loads(x) for x in lines[:10] + lines[14:]]  # the four malformed lines sit at 10..13


def test_prompt_positions_get_no_gradient(sft_file, corpus):
    from losslab.losses import build_loss
    from losslab.losses.config import LossConfig
    from models import GPT, GPTConfig

    batch = next(iter(stream(sft_file, corpus["tokenizer"])))
    model = GPT(GPTConfig(vocab_size=384, n_layers=2, d_model=32, n_heads=4, d_mlp=64, max_seq_len=64)).double()
    hidden = model(batch["tokens"][:, :-1], segment_ids=segment_ids(batch))  # [B, T, d]
    hidden.retain_grad()
    target = labels(batch)
    loss_fn = build_loss(LossConfig(name="ce", fused="false"))
    out = loss_fn(hidden.reshape(-1, 32), model.head.weight, target.reshape(-1))
    out.loss.backward()
    ignored = target == IGNORE_INDEX
    assert ignored.any() and (~ignored).any()
    assert (hidden.grad[ignored] == 0).all() and (hidden.grad[~ignored].abs().sum(-1) > 0).all()
    # the loss is the mean CE over the response targets, computed by hand in float64
    logits = hidden.detach() @ model.head.weight.detach()[:384].T  # [B, T, V]
    ce = torch.nn.functional.cross_entropy(logits[~ignored], target[~ignored])
    assert torch.allclose(out.loss.detach(), ce, rtol=1e-12)


def test_malformed_records_are_counted(sft_file, corpus):
    s = stream(sft_file, corpus["tokenizer"])
    it = iter(s)
    while s.stats.documents < 196:  # to the end of the first pass over the file
        next(it)
    assert s.stats.bad_records == 3 and s.stats.bad_json == 1


def test_pdl_counts_the_responses_unless_asked(sft_file, corpus):
    tok = Tokenizer(corpus["tokenizer"])
    fmt = FineTuningRecords()
    targets = count_tokens([str(sft_file)], tok, 10**9, document_format=fmt)
    everything = count_tokens([str(sft_file)], tok, 10**9, document_format=fmt, targets_only=False)
    by_hand = torch.zeros(tok.vocab_size, dtype=torch.int64)
    for r in good_records(sft_file):
        by_hand += torch.bincount(torch.tensor([*tok.encode(r["response"]), tok.eos_id]), minlength=tok.vocab_size)
    assert torch.equal(targets, by_hand)
    assert everything.sum() > targets.sum()


def test_chat_records_put_the_loss_on_assistant_turns(corpus, tmp_path):
    folder = _chat_tokenizer(tmp_path)
    tok = Tokenizer(folder)
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
             for r in records(20, seed=3)]  # fmt: skip
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    batch = next(iter(stream(path, str(folder))))
    target = labels(batch)
    kept = [tok.decode([t]) for t in target[target != IGNORE_INDEX].tolist()]
    ignored = (target == IGNORE_INDEX).flatten().tolist()
    dropped = [tok.decode([t]) for t, m in zip(batch["tokens"][:, 1:].flatten().tolist(), ignored, strict=True) if m]
    assert "<|im_start|>" not in kept and "<|im_end|>" in kept  # the turn's end is learned, its opening is not
    assert "user" in "".join(dropped) and "assistant" in "".join(dropped)


def _chat_tokenizer(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tests.test_tokenizers import CHAT_TEMPLATE

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator((d["text"] for d in documents(120, seed=0)), trainer)
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_finetuning_resumes_exactly(sft_file, corpus, tmp_path):
    """SIGKILL after the first checkpoint, relaunch with resume=auto: the same run, step for step."""
    sft = {"data.sft_files": f"[{sft_file}]", "data.val_files": f"[{sft_file}]", "data.train_files": "[]",
           "loss.name": "pdl", "train.max_steps": 20,
           "train.log_every": 1, "checkpoint.every": 10, "checkpoint.keep": 0}  # fmt: skip
    reference = tmp_path / "reference"
    assert run(debug_overrides(corpus, reference, **sft), tmp_path / "reference") == 0
    run_dir = tmp_path / "run"
    proc = start(debug_overrides(corpus, run_dir, **sft), log=tmp_path / "killed")
    wait_for(lambda: logged_steps(run_dir) >= 13, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    log = tmp_path / "resumed"
    assert run(debug_overrides(corpus, run_dir, **sft, **{"train.resume": "auto"}), log) == 0, log.with_suffix(
        ".err"
    ).read_text()
    assert_same_run(run_dir, reference)
    assert metrics(run_dir)[20]["data/bad_records"] == metrics(reference)[20]["data/bad_records"]


def test_prepared_records_hold_the_windows_streaming_makes(sft_file, corpus, tmp_path):
    """prepare_data.py --sft: the same windows, loss mask and segments as the streamed records, memory-mapped."""
    from data.memmap import MemmapBatches, PreparedCorpus
    from data.prepare import prepare

    out = tmp_path / "prepared"
    prepare([str(sft_file)], corpus["tokenizer"], out, workers=0, show_progress=False, records=FineTuningRecords())
    prepared = PreparedCorpus(out)
    batches = MemmapBatches(prepared, {}, seq_len=SEQ, batch_size=1)
    n = batches.num_windows[0]

    def key(w: dict) -> tuple:
        return tuple(w["tokens"].tolist()), tuple(w["loss_mask"].tolist()), tuple(w["segments"].tolist())

    from_memmap = sorted(key({k: v[0] for k, v in batches[i].items()}) for i in range(n))
    s = stream(sft_file, corpus["tokenizer"])
    s.batch_size = 1
    it = iter(s)
    from_stream = sorted(key({k: v[0] for k, v in next(it).items()}) for _ in range(n))
    assert from_memmap == from_stream
    targets = count_tokens([str(sft_file)], Tokenizer(corpus["tokenizer"]), 10**9, document_format=FineTuningRecords())
    assert torch.equal(prepared.token_counts(), targets)
    proc_dir = tmp_path / "run"
    assert run(debug_overrides(corpus, proc_dir, **{"data.prepared": out, "train.max_steps": 4}), tmp_path / "p") == 0
