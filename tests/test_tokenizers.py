"""The Hugging Face ``tokenizer.json`` backend on every path a sentencepiece model takes: streaming, prepared
data, training, checkpoints, resume, evaluation — with a real byte-level BPE trained here by ``tokenizers``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer
from evals.results_store import latest
from tests.conftest import debug_overrides
from tests.corpus import documents
from tests.test_train import REPO, clean_env

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> Path:
    """A folder as transformers saves one: tokenizer.json (byte-level BPE) and tokenizer_config.json."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("hf_tok")
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((d["text"] for d in documents(240, seed=0)), trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_backends_are_chosen_by_what_the_path_holds(hf_tokenizer, corpus):
    assert isinstance(Tokenizer(corpus["tokenizer"]), SentencePieceTokenizer)
    for path in (hf_tokenizer, hf_tokenizer / "tokenizer.json"):
        tok = Tokenizer(path)
        assert isinstance(tok, HFTokenizer)
        assert tok.eos_id == tok.tok.token_to_id("<|im_end|>") and tok.bos_id == -1
        assert tok.pad_id == tok.tok.token_to_id("<|endoftext|>")
        text = "Fair is foul, and foul is fair:\n  hover through the fog — café 🙂"
        assert tok.decode(tok.encode(text)) == text  # byte-level: lossless
        assert tok.encode_batch([text, "x"]) == [tok.encode(text), tok.encode("x")]


def test_chat_template_renders_as_transformers_does(hf_tokenizer):
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "user", "content": "What light through yonder window breaks?"},
                {"role": "assistant", "content": "It is the east."}]  # fmt: skip
    ours = Tokenizer(hf_tokenizer)
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(hf_tokenizer / "tokenizer.json"), chat_template=CHAT_TEMPLATE)
    for prompt in (False, True):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert ours.render_chat(messages, add_generation_prompt=prompt) == expected


def train(overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/train.py", "configs/experiments/demo.yaml", *overrides],
        cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_training_checkpoint_resume_and_eval_with_a_tokenizer_json(hf_tokenizer, corpus, tmp_path):
    run_dir = tmp_path / "run"
    common = {"data.tokenizer": hf_tokenizer, "train.max_steps": 12, "checkpoint.every": 6, "train.log_every": 1}
    first = train(debug_overrides(corpus, run_dir, **{**common, "train.max_steps": 6}))
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "step_0000006"
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in ckpt.iterdir()}
    assert Tokenizer(ckpt).vocab_size == Tokenizer(hf_tokenizer).vocab_size
    again = train(debug_overrides(corpus, run_dir, **common, **{"train.resume": "auto", "train.extend_to": 12}))
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "scripts/evaluate.py", "--checkpoint", str(run_dir), "--val-files", corpus["val"]],
        cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = latest(run_dir / "checkpoints" / "step_0000012").summary
    assert results["metrics"]["bucket/ppl"] > 1


def test_prepared_data_with_a_tokenizer_json(hf_tokenizer, corpus, tmp_path):
    from data.prepare import prepare

    out = tmp_path / "prepared"
    manifest = prepare([corpus["train_glob"]], str(hf_tokenizer), out, workers=0, show_progress=False)
    assert manifest["vocab_size"] == Tokenizer(hf_tokenizer).vocab_size
    assert manifest["fingerprint"]["tokenizer_sha256"] == Tokenizer(hf_tokenizer).sha256
    proc = train(debug_overrides(corpus, tmp_path / "run", **{"data.prepared": out, "data.tokenizer": hf_tokenizer,
                                                               "train.max_steps": 4}))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
