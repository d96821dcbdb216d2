"""Fine-tuning records -> token documents with a loss mask (``data.sft_files``).

One JSON record a line, in ``.jsonl`` or ``.jsonl.zst`` files:

- ``{"prompt": "...", "response": "..."}``: the prompt's tokens carry no loss, the response's (and the EOS
  packing appends after it) do; the two are tokenised apart and concatenated, nothing is inserted between
  them (put any separator in the prompt).
- ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}``: rendered
  with the tokenizer's chat template; the tokens of each assistant turn (as the template writes it, end-of-turn
  token included) carry the loss, everything else does not. The template is rendered turn by turn and each new
  piece tokenised on its own, so a turn's tokens never merge with the next turn's.

``data.train_on_prompt=true`` puts the loss on every token. Records that are JSON but not one of these shapes
(missing or non-string fields, an empty response, no assistant turn) are skipped and counted
(``data/bad_records``). Documents are packed with ``segments``: the model keeps packed records apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from data.shards import DataError, ReadStats, _encodable, iter_records
from data.tokenizer import Tokenizer

if TYPE_CHECKING:  # preparing data never needs torch, which data.packing imports
    from data.packing import TokenDoc


@dataclass
class Record:
    prompt: str = ""
    response: str = ""
    messages: list[dict[str, str]] | None = None


def parse_record(line: str, obj: Any, stats: ReadStats) -> Record | None:
    record = _record(obj)
    if record is None or ("\\u" in line and not _encodable(line.encode("utf-8", "surrogatepass").decode("utf-8"))):
        stats.bad_records += 1
        return None
    stats.documents += 1
    return record


def _record(obj: Any) -> Record | None:
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        messages = obj["messages"]
        ok = isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok or not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            return None
        if not all(_encodable(m["content"]) for m in messages):  # lone surrogates are no text
            return None
        return Record(messages=[{"role": m["role"], "content": m["content"]} for m in messages])
    prompt, response = obj.get("prompt"), obj.get("response")
    if not (isinstance(prompt, str) and isinstance(response, str) and response.strip()):
        return None
    if not (_encodable(prompt) and _encodable(response)):  # lone surrogates are no text
        return None
    return Record(prompt=prompt, response=response)


def chat_pieces(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_target) pieces, turn by turn."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            opened = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
            pieces.append((_after(done, opened, tokenizer), False))
            done = opened
        full = tokenizer.render_chat(messages[: i + 1])
        pieces.append((_after(done, full, tokenizer), message["role"] == "assistant"))
        done = full
    return [(text, target) for text, target in pieces if text]


def _after(prefix: str, text: str, tokenizer: Tokenizer) -> str:
    if not text.startswith(prefix):
        raise DataError(
            f"the chat template of {tokenizer.path!r} does not render a conversation as the prefix of its "
            "continuation, so the assistant turns cannot be told apart; use prompt/response records"
        )
    return text[len(prefix) :]


class FineTuningRecords:
    """The ``DocumentFormat`` of fine-tuning records (see ``data.stream``)."""

    streams: Sequence[str] = ("loss_mask",)
    segments = True

    def __init__(self, train_on_prompt: bool = False) -> None:
        self.train_on_prompt = train_on_prompt

    def read(self, path: str, stats: ReadStats) -> Iterator[Record]:
        return iter_records(path, stats, parse_record)

    def encode(self, items: list[Record], tokenizer: Tokenizer) -> list[TokenDoc]:
        return [self._encode(record, tokenizer) for record in items]

    def _encode(self, record: Record, tokenizer: Tokenizer) -> TokenDoc:
        if record.messages is not None:
            pieces = chat_pieces(tokenizer, record.messages)
        else:
            pieces = [(record.prompt, False), (record.response, True)]
        texts = [text for text, _ in pieces]
        tokens: list[int] = []
        mask: list[bool] = []
        for ids, (_, target) in zip(tokenizer.encode_batch(texts), pieces, strict=True):
            tokens.extend(ids)
            mask.extend([target or self.train_on_prompt] * len(ids))
        return {"tokens": tokens, "loss_mask": mask}
