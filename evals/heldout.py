"""The held-out set: one fixed, seeded sample of documents from ``data.val_files``, stratified by domain.

Every held-out number of a run is computed on this one set: the per-domain losses logged during training
(``eval.val_every``, ``evals/domains.py``) and the loss by token-frequency bucket of each evaluated checkpoint
(``evals/buckets.py``, ``evals/runner.py``). Every run of a study with the same held-out files, tokenizer and
settings draws the identical set: it depends on the documents' text, not on the files' order or the run's seed.

The rule (``docs/statistics.md`` says it for readers of a report):

1. **Order.** A document's rank is the SHA-256 of ``eval.val_seed`` and the SHA-256 of its text: a seeded
   random order that does not depend on how the held-out files are ordered or sharded.
2. **Domains** (``meta.pile_set_name``). Each domain of the held-out files gets ``eval.val_tokens_per_domain``
   tokens at least (all it has when it has fewer); the rest of ``eval.val_tokens`` is shared equally among the
   domains that have more (water-filling). So the set holds ``max(val_tokens, the floors' sum)`` tokens when the
   files hold that many, and a large domain cannot crowd out a small one.
3. **Documents within a domain.** Documents are taken in rank order, each giving its first tokens (an EOS
   closes it) but at most an eighth of its domain's quota (``DOC_SHARE``), until the quota is filled: no single
   document outweighs the rest while the domain has documents enough, so Kish's effective number of documents
   stays near their count. A domain whose documents fall short at that cap gives all of them, each cut at a
   common level (water-filling), until the quota is filled or its text is used up.
4. **Fine-tuning records** (held-out files of prompt/response or chat records) are one stratum: whole records in
   rank order until their scored (response) tokens reach ``eval.val_tokens``.

A domain named in ``eval.val_domains``, or in a ``manifest.json`` beside the held-out files with a ``domains``
table (``scripts/split_corpus.py`` writes one), that has no held-out document is a warning naming it; the set
records it under ``missing``. The set is written beside the run (``SET_FILE``: each document's key, text hash,
domain and token counts) and reused by every evaluation of the run.

The held-out files are read into memory once while sampling (they are a held-out split, not a corpus); later
evaluations read only the sampled documents back.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data.files import write_atomic
from data.shards import DataError, ReadStats, iter_documents, resolve_files
from data.tokenizer import Tokenizer

SET_FILE = "held_out_set.json"
"""The sampled set, beside the run (and beside a checkpoint evaluated without one)."""
SET_VERSION = 1
DOC_SHARE = 8
"""A document gives at most 1/DOC_SHARE of its domain's quota while the domain has documents enough."""
RECORDS = "records"
"""The one stratum of held-out fine-tuning records."""
TOKENIZE_BATCH = 64


class HeldOutError(DataError):
    """A held-out set file that does not match the run's held-out files, tokenizer or settings."""


@dataclass(frozen=True)
class SampleSpec:
    """What decides the sample (``eval.val_tokens``, ``eval.val_tokens_per_domain``, ``eval.val_seed``,
    ``eval.val_domains``)."""

    tokens: int = 200_000
    tokens_per_domain: int = 20_000
    seed: int = 0
    domains: tuple[str, ...] = ()
    """Domains the set must cover (a warning names any without a held-out document)."""


@dataclass(frozen=True)
class Document:
    """One sampled document."""

    key: str
    """``<file index>:<document index within the file>`` (good documents, in file order)."""
    sha: str
    """First 16 hex digits of the SHA-256 of its text (records: of the record)."""
    domain: str
    tokens: int
    """The tokens it gives to the set, its closing EOS included (records: its scored tokens)."""
    length: int
    """Its whole length in the same units."""


def kish(weights: Sequence[float]) -> float:
    """Kish's effective number of units, ``(sum w)^2 / sum w^2``: the number of equal units a weighted mean over
    these units is as precise as (a few huge documents make many tokens behave like a handful of documents)."""
    total, squares = math.fsum(weights), math.fsum(w * w for w in weights)
    return total * total / squares if squares > 0 else 0.0


@dataclass
class HeldOutSet:
    files: list[str]
    tokenizer_sha256: str
    spec: SampleSpec
    records: bool
    seq_len: int
    """The window the set is packed into (records are cut at ``seq_len + 1`` tokens)."""
    documents: list[Document]
    """Grouped by domain (domains sorted by name), each domain's documents in rank order."""
    domains: dict[str, dict[str, int]]
    """Per domain: ``documents`` and ``tokens`` sampled, ``quota`` asked, ``available_documents`` in the files."""
    missing: list[str] = field(default_factory=list)
    """Domains expected (``SampleSpec.domains``, a manifest) with no held-out document."""

    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.documents)

    @property
    def n_eff(self) -> float:
        """Kish's effective number of documents, weights = the tokens each gives."""
        return kish([d.tokens for d in self.documents])

    @property
    def identity(self) -> str:
        """A hash of the sampled documents, their token counts and the window they are scored in: equal for every
        run that scored this set the same way. The window is part of it because it changes the numbers: each
        window's first token is context, never a target, so the same documents packed at another ``seq_len``
        score another number of tokens (and an evaluation at another width must not file its result under the
        training's key)."""
        text = f"window {self.seq_len + 1}\n" + "\n".join(f"{d.sha} {d.domain} {d.tokens}" for d in self.documents)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def summary(self) -> str:
        missing = f"; no held-out document for {', '.join(self.missing)}" if self.missing else ""
        return (f"{len(self.documents)} documents, {self.tokens} tokens, {len(self.domains)} domain(s), "
                f"{self.n_eff:.1f} effective documents (Kish){missing}")  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SET_VERSION,
            "identity": self.identity,
            "files": self.files,
            "tokenizer_sha256": self.tokenizer_sha256,
            "spec": {**asdict(self.spec), "domains": list(self.spec.domains)},
            "records": self.records,
            "seq_len": self.seq_len,
            "rule": f"rank = sha256(seed, sha256(text)); per domain max(floor, equal share of the rest); a document "
            f"at most 1/{DOC_SHARE} of its domain's quota (its first tokens)",
            "n_documents": len(self.documents),
            "tokens": self.tokens,
            "n_eff": self.n_eff,
            "domains": self.domains,
            "missing": self.missing,
            "documents": [asdict(d) for d in self.documents],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeldOutSet:
        spec = dict(data["spec"])
        spec["domains"] = tuple(spec.get("domains") or ())
        return cls(
            files=list(data["files"]),
            tokenizer_sha256=data["tokenizer_sha256"],
            spec=SampleSpec(**spec),
            records=bool(data["records"]),
            seq_len=int(data["seq_len"]),
            documents=[Document(**d) for d in data["documents"]],
            domains=data["domains"],
            missing=list(data.get("missing") or []),
        )


@dataclass
class HeldOut:
    """The held-out set as model inputs."""

    windows: Tensor
    """[n, width] int64. Documents: the sampled pieces packed back to back (EOS closing each), cut into windows of
    ``seq_len + 1``, the last padded; records: one record a row, right-padded to the longest."""
    document: Tensor
    """[n, width] int64: the index in ``HeldOutSet.documents`` of each token's document; -1 on padding. A target
    token's document is ``document[:, 1:]``."""
    scored: Tensor | None = None
    """[n, width] bool: tokens scored as targets (records: the responses; padding never); None: all."""


# --- sampling ------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    file: int
    index: int
    domain: str
    sha: str
    rank: str
    item: Any
    """The document's text, or the fine-tuning record."""
    ids: list[int] | None = None
    """Tokens, EOS included (records: the record's tokens then EOS, cut at the window)."""
    mask: list[bool] | None = None
    """Records: which of ``ids`` carry loss."""

    @property
    def length(self) -> int:
        assert self.ids is not None
        return sum(self.mask[1:]) if self.mask is not None else len(self.ids)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _read(files: list[str], seed: int, records: bool) -> tuple[dict[str, list[_Entry]], ReadStats]:
    """Every good document (or record) of the files, per domain, in rank order."""
    from data.sft import FineTuningRecords

    stats = ReadStats()
    fmt = FineTuningRecords() if records else None
    by_domain: dict[str, list[_Entry]] = {}
    for f, path in enumerate(files):
        items = fmt.read(path, stats) if fmt is not None else iter_documents(path, stats)
        for i, item in enumerate(items):
            if fmt is not None:
                text, domain = json.dumps(asdict(item), sort_keys=True), RECORDS
            else:
                text, domain = item.text, item.source or "unknown"
            sha = _digest(text)
            rank = hashlib.sha256(f"{seed}\0{sha}".encode()).hexdigest()
            by_domain.setdefault(domain, []).append(_Entry(f, i, domain, sha[:16], rank, item))
    for entries in by_domain.values():
        entries.sort(key=lambda e: e.rank)
    return by_domain, stats


class _Tokens:
    """Tokenises a domain's entries lazily, in rank order, a batch at a time."""

    def __init__(self, entries: list[_Entry], tokenizer: Tokenizer, seq_len: int, records: bool) -> None:
        self.entries, self.tok, self.seq_len, self.records = entries, tokenizer, seq_len, records
        self.done = 0

    def length(self, i: int) -> int:
        while self.done <= i:
            batch = self.entries[self.done : self.done + TOKENIZE_BATCH]
            _encode(batch, self.tok, self.seq_len, self.records)
            self.done += len(batch)
        return self.entries[i].length

    def lengths(self) -> list[int]:
        return [self.length(i) for i in range(len(self.entries))] if self.entries else []

    def total_below(self, share: int) -> bool:
        """Whether all the domain's tokens together are fewer than ``share`` (tokenising only as far as needed)."""
        total = 0
        for i in range(len(self.entries)):
            total += self.length(i)
            if total >= share:
                return False
        return True


def _encode(entries: list[_Entry], tokenizer: Tokenizer, seq_len: int, records: bool) -> None:
    if records:
        from data.sft import FineTuningRecords

        for e, doc in zip(entries, FineTuningRecords().encode([e.item for e in entries], tokenizer), strict=True):
            # one record a row as the trainer sees one packed segment: tokens, then EOS carrying the response's mask
            e.ids = (doc["tokens"] + [tokenizer.eos_id])[: seq_len + 1]
            e.mask = (doc["loss_mask"] + doc["loss_mask"][-1:])[: seq_len + 1]
        return
    for e, ids in zip(entries, tokenizer.encode_batch([e.item.text for e in entries]), strict=True):
        e.ids = [*ids, tokenizer.eos_id]


def _level(lengths: list[int], quota: int) -> int:
    """The largest cut ``c`` with ``sum(min(L, c)) <= quota``."""
    lo, hi = 0, max(lengths)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= quota:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _take(tokens: _Tokens, quota: int) -> list[tuple[int, int]]:
    """(entry index, tokens it gives) of a domain filling ``quota`` by rule 3 of the module docstring."""
    cap = max(1, -(-quota // DOC_SHARE))
    taken, left, i, n = [], quota, 0, len(tokens.entries)
    while left > 0 and i < n:
        k = min(tokens.length(i), cap, left)
        taken.append((i, k))
        left, i = left - k, i + 1
    if left == 0:
        return taken
    lengths = tokens.lengths()  # every document taken at the cap and the quota not filled: one common, higher cut
    level = _level(lengths, quota)
    kept = [min(n_, level) for n_ in lengths]
    extra = quota - sum(kept)  # fewer than the documents longer than the level: one more token each, in rank order
    for j, n_ in enumerate(lengths):
        if extra <= 0:
            break
        if n_ > kept[j]:
            kept[j] += 1
            extra -= 1
    return [(j, k) for j, k in enumerate(kept) if k > 0]


def _take_records(tokens: _Tokens, quota: int) -> list[tuple[int, int]]:
    """Whole records in rank order until their scored tokens reach ``quota`` (the last may go over)."""
    taken, total = [], 0
    for i in range(len(tokens.entries)):
        if total >= quota:
            break
        n = tokens.length(i)
        if n:
            taken.append((i, n))
            total += n
    return taken


def _quotas(domains: dict[str, _Tokens], spec: SampleSpec) -> dict[str, int]:
    """Rule 2: each domain ``max(floor, equal share of what the small domains leave)``; a domain with fewer
    tokens than that gives them all."""
    fixed: dict[str, int] = {}
    while True:
        open_ = sorted(d for d in domains if d not in fixed)
        if not open_:
            return fixed
        rest = max(0, spec.tokens - sum(fixed.values()))
        base, extra = divmod(rest, len(open_))
        share = {d: max(spec.tokens_per_domain, base + (i < extra)) for i, d in enumerate(open_)}
        short = [d for d in open_ if domains[d].total_below(share[d])]
        if not short:
            return {**fixed, **share}
        for d in short:
            fixed[d] = sum(domains[d].lengths())


def expected_domains(files: list[str], listed: Sequence[str]) -> list[str]:
    """``listed`` and the domains of a ``manifest.json`` (``{"domains": {name: ...}}``) beside any held-out file."""
    names = set(listed)
    for folder in {Path(f).parent for f in files}:
        manifest = folder / "manifest.json"
        try:
            table = json.loads(manifest.read_text()).get("domains") if manifest.is_file() else None
        except (OSError, ValueError, AttributeError):
            table = None
        if isinstance(table, dict):
            names |= {str(k) for k in table}
    return sorted(names)


def sample_held_out(
    files: list[str], tokenizer: Tokenizer, seq_len: int, spec: SampleSpec, *, records: bool = False
) -> tuple[HeldOutSet, dict[str, tuple[list[int], list[bool] | None]]]:
    """The held-out set of ``files`` by the module's rule, and each sampled document's tokens (the piece it gives:
    its first tokens closed by EOS; records: the record and its loss mask) by key."""
    paths = resolve_files(files)
    by_domain, stats = _read(paths, spec.seed, records)
    if stats.skipped or stats.corrupt_files:  # counted, and said: never dropped in silence
        print(f"warning: held-out data {files}: skipped {stats.skipped} bad line(s) and {stats.corrupt_files} damaged "
              f"file(s) ({stats.as_dict()})", file=sys.stderr)  # fmt: skip
    if not by_domain:
        raise DataError(f"held-out data {files} hold no readable document")
    tokens = {d: _Tokens(entries, tokenizer, seq_len, records) for d, entries in by_domain.items()}
    quotas = {RECORDS: spec.tokens} if records else _quotas(tokens, spec)
    documents: list[Document] = []
    pieces: dict[str, tuple[list[int], list[bool] | None]] = {}
    summary: dict[str, dict[str, int]] = {}
    for name in sorted(by_domain):
        taken = (_take_records if records else _take)(tokens[name], quotas[name])
        for i, k in taken:
            e = by_domain[name][i]
            key = f"{e.file}:{e.index}"
            documents.append(Document(key, e.sha, name, k, e.length))
            assert e.ids is not None
            if records:
                pieces[key] = (e.ids, e.mask)
            else:  # the document's first k - 1 tokens and an EOS (all of it when k is its length)
                pieces[key] = (e.ids if k == len(e.ids) else [*e.ids[: k - 1], tokenizer.eos_id], None)
        summary[name] = {"documents": len(taken), "tokens": sum(k for _, k in taken), "quota": quotas[name],
                         "available_documents": len(by_domain[name])}  # fmt: skip
    if not documents:
        raise DataError(f"held-out data {files} hold no token to score")
    missing = [] if records else [d for d in expected_domains(paths, spec.domains) if d not in by_domain]
    held = HeldOutSet(list(files), tokenizer.sha256, spec, records, seq_len, documents, summary, missing)
    return held, pieces


def read_pieces(held: HeldOutSet, tokenizer: Tokenizer) -> dict[str, tuple[list[int], list[bool] | None]]:
    """The sampled documents' tokens read back from the held-out files, each checked against its text hash."""
    paths = resolve_files(held.files)
    wanted = {d.key: d for d in held.documents}
    from data.sft import FineTuningRecords

    fmt = FineTuningRecords() if held.records else None
    found: dict[str, _Entry] = {}
    for f, path in enumerate(paths):
        items = fmt.read(path, ReadStats()) if fmt is not None else iter_documents(path, ReadStats())
        for i, item in enumerate(items):
            key = f"{f}:{i}"
            if key in wanted:
                text = json.dumps(asdict(item), sort_keys=True) if fmt is not None else item.text
                if _digest(text)[:16] != wanted[key].sha:
                    raise HeldOutError(f"held-out file {path} changed since the held-out set was sampled "
                                       f"(document {key}); sample it again (delete {SET_FILE})")  # fmt: skip
                found[key] = _Entry(f, i, wanted[key].domain, wanted[key].sha, "", item)
    if len(found) != len(wanted):
        raise HeldOutError(f"held-out files {held.files} lack {len(wanted) - len(found)} of the sampled documents")
    entries = [found[d.key] for d in held.documents]
    for s in range(0, len(entries), TOKENIZE_BATCH):
        _encode(entries[s : s + TOKENIZE_BATCH], tokenizer, held.seq_len, held.records)
    pieces = {}
    for d, e in zip(held.documents, entries, strict=True):
        assert e.ids is not None
        if held.records:
            pieces[d.key] = (e.ids, e.mask)
        else:
            pieces[d.key] = (e.ids if d.tokens == len(e.ids) else [*e.ids[: d.tokens - 1], tokenizer.eos_id], None)
    return pieces


def load_set(path: Path, files: list[str], tokenizer: Tokenizer, records: bool) -> HeldOutSet | None:
    """The set saved at ``path`` if it was drawn from ``files`` with this tokenizer (None when there is none);
    one that was not is an error naming the file."""
    if not path.is_file():
        return None
    try:
        saved = HeldOutSet.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise HeldOutError(f"{path}: not a held-out set file ({e})") from None
    if (saved.files, saved.tokenizer_sha256, saved.records) != (list(files), tokenizer.sha256, records):
        raise HeldOutError(f"{path} was sampled from other held-out files or with another tokenizer than "
                           f"{files}")  # fmt: skip
    return saved


def load_or_sample(
    path: Path | None, files: list[str], tokenizer: Tokenizer, seq_len: int, spec: SampleSpec, *, records: bool = False
) -> tuple[HeldOutSet, dict[str, tuple[list[int], list[bool] | None]]]:
    """The set saved at ``path`` when it was sampled from these files with this tokenizer and these settings,
    else a fresh sample (written to ``path`` when given, and a warning naming any domain without a document)."""
    if path is not None and path.is_file():
        saved = HeldOutSet.from_json(json.loads(path.read_text()))
        if (saved.files, saved.tokenizer_sha256, saved.spec, saved.records, saved.seq_len) == (
            list(files), tokenizer.sha256, spec, records, seq_len
        ):  # fmt: skip
            return saved, read_pieces(saved, tokenizer)
    held, pieces = sample_held_out(files, tokenizer, seq_len, spec, records=records)
    if held.missing:
        print(f"warning: the held-out set has no document of domain(s) {', '.join(held.missing)}: no held-out "
              f"number covers them (data.val_files = {files})", file=sys.stderr)  # fmt: skip
    if path is not None:
        write_atomic(path, json.dumps(held.to_json(), indent=1) + "\n")
    return held, pieces


def pack(held: HeldOutSet, pieces: dict[str, tuple[list[int], list[bool] | None]], pad_id: int) -> HeldOut:
    """The set as model inputs (``HeldOut``): documents packed into windows of ``held.seq_len + 1``, records one a
    row."""
    if held.records:
        rows = [pieces[d.key] for d in held.documents]
        n, width = len(rows), max(len(ids) for ids, _ in rows)
        windows = torch.full((n, width), pad_id, dtype=torch.long)  # [n, width], right-padded
        scored = torch.zeros(n, width, dtype=torch.bool)
        document = torch.full((n, width), -1, dtype=torch.long)
        for i, (ids, mask) in enumerate(rows):
            windows[i, : len(ids)] = torch.tensor(ids)
            scored[i, : len(ids)] = torch.tensor(mask)
            document[i, : len(ids)] = i
        return HeldOut(windows=windows, document=document, scored=scored)
    stream: list[int] = []
    owner: list[int] = []
    for i, d in enumerate(held.documents):
        ids = pieces[d.key][0]
        stream.extend(ids)
        owner.extend([i] * len(ids))
    width = held.seq_len + 1
    n = -(-len(stream) // width)
    pad = n * width - len(stream)
    windows = torch.tensor(stream + [pad_id] * pad).view(n, width)  # [n, seq_len + 1]
    document = torch.tensor(owner + [-1] * pad).view(n, width)
    return HeldOut(windows=windows, document=document, scored=(document >= 0) if pad else None)
