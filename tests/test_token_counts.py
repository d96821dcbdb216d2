"""losslab.losses.token_counts: PDL's counts in one call, from texts with a real tokenizer or from a tokenized
dataset, the trained tokens only by default."""

from __future__ import annotations

import pytest
import torch

from losslab.losses import token_counts

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(["fair", "is", "foul", "and"])}}
    tok = Tokenizer(models.WordLevel(vocab, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


def test_texts_count_the_tokens_training_predicts(tokenizer):
    texts = ["fair is foul", "and foul is fair", "foul"]
    counts = token_counts(texts, tokenizer=tokenizer)
    ids = [tokenizer(t)["input_ids"] for t in texts]
    expected = torch.zeros(len(tokenizer), dtype=torch.long)
    for row in ids:
        for i in row[1:]:  # a row's first token is never a target
            expected[i] += 1
    assert torch.equal(counts, expected) and counts.shape == (len(tokenizer),)
    everything = token_counts(texts, tokenizer=tokenizer, targets_only=False)
    assert everything.sum() == sum(map(len, ids)) > counts.sum()
    with pytest.raises(ValueError, match="texts need a tokenizer"):
        token_counts(texts)


def test_a_tokenized_dataset_counts_its_trained_tokens_only():
    from datasets import Dataset

    rows = Dataset.from_list([
        {"input_ids": [2, 3, 4, 5, 0], "labels": [-100, -100, 4, 5, -100]},  # a prompt and padding masked
        {"input_ids": [2, 5, 5, 3, 0], "labels": [2, 5, 5, 3, -100]},
    ])  # fmt: skip
    assert token_counts(rows, 8).tolist() == [0, 0, 0, 1, 1, 3, 0, 0]
    trl_style = [{"input_ids": [2, 3, 4, 5, 7], "completion_mask": [0, 0, 1, 1, 1], "attention_mask": [1, 1, 1, 1, 0]}]
    assert token_counts(trl_style, 8).tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert token_counts(trl_style, 8, targets_only=False).tolist() == [0, 0, 1, 1, 1, 1, 0, 1]
    with pytest.raises(ValueError, match="id 9 is outside a vocabulary of 8"):
        token_counts([{"input_ids": [1, 9], "labels": [1, 9]}], 8)
