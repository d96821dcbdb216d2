"""The held-out set (evals/heldout.py): a seeded sample of the held-out files stratified by domain, the same for
every run, whatever the files' order."""

from __future__ import annotations

import json
import random

import pytest

from data.shards import ReadStats, iter_documents, write_shard
from data.tokenizer import Tokenizer
from evals.heldout import (
    DOC_SHARE,
    HeldOutError,
    SampleSpec,
    kish,
    load_or_sample,
    pack,
    read_pieces,
    sample_held_out,
)
from tests.corpus import sentence

# A held-out file sorted by domain, as scripts/split_corpus.py once wrote one: a big first domain (alone more than
# the whole budget), a domain of one long document, one of short documents, one of three mid-sized ones.
DOMAINS = {"Anarchist FAQ": (40, (30, 60)), "Bible": (1, (400, 400)), "Django": (25, (2, 6)), "GCIDE": (3, (60, 90)),
           "Jane Austen": (12, (10, 40)), "Wordnet": (10, (1, 2))}  # fmt: skip


def _documents(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for domain, (n, (lo, hi)) in sorted(DOMAINS.items()):
        for _ in range(n):
            text = " ".join(sentence(rng) for _ in range(rng.randint(lo, hi)))
            docs.append({"text": text, "meta": {"pile_set_name": domain}})
    return docs


@pytest.fixture(scope="module")
def val(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("heldout")
    docs = _documents()
    write_shard(str(root / "val.jsonl.zst"), docs)  # sorted by domain
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)  # the same documents, in another order, in two shards
    write_shard(str(root / "other_a.jsonl.zst"), shuffled[:50])
    write_shard(str(root / "other_b.jsonl.zst"), shuffled[50:])
    return root, Tokenizer(corpus["tokenizer"])


def test_every_domain_of_a_file_sorted_by_domain_is_in_the_held_out_set(val):
    root, tok = val
    spec = SampleSpec(tokens=6000, tokens_per_domain=400)
    held, pieces = sample_held_out([str(root / "val.jsonl.zst")], tok, 32, spec)
    # read in file order, the budget would hold the first domain only
    first = [d.source for d in iter_documents(str(root / "val.jsonl.zst"), ReadStats())]
    lengths = [len(tok.encode(d.text)) + 1 for d in iter_documents(str(root / "val.jsonl.zst"), ReadStats())]
    in_order = {first[i] for i in range(len(first)) if sum(lengths[:i]) < spec.tokens}
    assert in_order == {"Anarchist FAQ"}
    # the stratified set: every domain, each its share: all of Wordnet's (fewer tokens than an equal share), the rest
    # shared equally by the others
    assert set(held.domains) == set(DOMAINS) and not held.missing
    have = {d: sum(lengths[i] for i in range(len(first)) if first[i] == d) for d in DOMAINS}
    small = {d for d in DOMAINS if have[d] < spec.tokens / len(DOMAINS)}
    share = (spec.tokens - sum(have[d] for d in small)) // (len(DOMAINS) - len(small))
    assert small == {"Wordnet"}  # the rule's case of a domain with fewer tokens than its share is exercised
    for d, info in held.domains.items():
        assert info["tokens"] == sum(x.tokens for x in held.documents if x.domain == d)
        assert info["tokens"] == (have[d] if d in small else pytest.approx(share, abs=1)), d
    # no document over an eighth of its domain's quota where the domain has documents enough
    faq = [x for x in held.documents if x.domain == "Anarchist FAQ"]
    assert len(faq) >= DOC_SHARE and max(x.tokens for x in faq) <= -(-held.domains["Anarchist FAQ"]["quota"] // 8)
    # a domain of few documents gives all of them, cut at a common level
    gcide = [x.tokens for x in held.documents if x.domain == "GCIDE"]
    assert len(gcide) == 3 and max(gcide) - min(gcide) <= 1 and sum(gcide) == held.domains["GCIDE"]["quota"]
    # each piece is the document's first tokens closed by EOS; the set's Kish number counts documents by weight
    for x in held.documents:
        ids = pieces[x.key][0]
        assert len(ids) == x.tokens and ids[-1] == tok.eos_id
    assert held.n_eff == pytest.approx(kish([x.tokens for x in held.documents]))


def test_the_set_is_the_same_for_every_run_whatever_the_files_order(val, tmp_path):
    root, tok = val
    spec = SampleSpec(tokens=6000, tokens_per_domain=400)
    one, _ = sample_held_out([str(root / "val.jsonl.zst")], tok, 32, spec)
    again, _ = sample_held_out([str(root / "val.jsonl.zst")], tok, 32, spec)
    other, _ = sample_held_out([str(root / "other_*.jsonl.zst")], tok, 32, spec)
    assert again.to_json() == one.to_json()
    same = [(d.sha, d.domain, d.tokens) for d in one.documents]
    assert [(d.sha, d.domain, d.tokens) for d in other.documents] == same and other.identity == one.identity
    assert [d.key for d in other.documents] != [d.key for d in one.documents]  # found elsewhere, the same text
    reseeded, _ = sample_held_out([str(root / "val.jsonl.zst")], tok, 32, SampleSpec(6000, 400, seed=1))
    assert reseeded.identity != one.identity  # eval.val_seed draws another sample
    # the same documents in wider windows: fewer window starts, so more targets scored; another identity
    wider, pieces = sample_held_out([str(root / "val.jsonl.zst")], tok, 64, spec)
    assert [(d.sha, d.tokens) for d in wider.documents] == [(d.sha, d.tokens) for d in one.documents]
    targets = [(pack(s, pieces, tok.eos_id).document[:, 1:] >= 0).sum().item() for s in (one, wider)]
    assert targets[0] < targets[1] and wider.identity != one.identity


def test_a_domain_without_held_out_documents_is_a_warning_naming_it(val, tmp_path, capfd):
    root, tok = val
    files = [str(root / "val.jsonl.zst")]
    (root / "manifest.json").write_text(json.dumps({"domains": {d: {} for d in [*DOMAINS, "Jargon File"]}}))
    try:
        held, _ = load_or_sample(tmp_path / "set.json", files, tok, 32, SampleSpec(6000, 400, domains=("Ubuntu IRC",)))
    finally:
        (root / "manifest.json").unlink()
    err = capfd.readouterr().err
    assert "Jargon File" in err and "Ubuntu IRC" in err and "warning" in err
    assert held.missing == ["Jargon File", "Ubuntu IRC"]
    saved = json.loads((tmp_path / "set.json").read_text())
    assert saved["missing"] == held.missing and len(saved["documents"]) == len(held.documents)


def test_a_saved_set_is_reused_and_a_changed_file_is_refused(val, tmp_path):
    _, tok = val
    path, spec = tmp_path / "set.json", SampleSpec(6000, 400)
    files = [str(tmp_path / "val.jsonl.zst")]
    docs = _documents()
    write_shard(files[0], docs)
    held, pieces = load_or_sample(path, files, tok, 32, spec)
    before = path.stat().st_mtime_ns
    again, again_pieces = load_or_sample(path, files, tok, 32, spec)
    assert path.stat().st_mtime_ns == before and again_pieces == pieces  # read back, not sampled again
    key = held.documents[0].key
    index = int(key.split(":")[1])
    docs[index] = {**docs[index], "text": docs[index]["text"] + " Changed."}
    write_shard(files[0], docs)
    with pytest.raises(HeldOutError, match="changed since the held-out set was sampled"):
        read_pieces(again, tok)


def test_fine_tuning_records_are_whole_records_in_a_seeded_order(tmp_path, corpus):
    tok = Tokenizer(corpus["tokenizer"])
    records = tmp_path / "records.jsonl"
    rows = [{"prompt": f"KING {i}: the crown.\nQUEEN:", "response": " the sea " * (1 + i % 5)} for i in range(40)]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held, pieces = sample_held_out([str(records)], tok, 64, SampleSpec(tokens=60), records=True)
    scored = [x.tokens for x in held.documents]
    assert sum(scored) >= 60 > sum(scored[:-1]) and set(held.domains) == {"records"}
    for x in held.documents:
        ids, mask = pieces[x.key]
        assert sum(mask[1:]) == x.tokens == x.length and ids[-1] == tok.eos_id  # the whole record and its EOS
    keys = [int(x.key.split(":")[1]) for x in held.documents]
    assert keys != sorted(keys)  # not the file's first records
