"""Build a local lm-eval multiple-choice cloze task from held-out Pile-format text:
``python scripts/build_cloze_task.py --files corpus/cpu_study/text/val.jsonl.zst --name cpu_study_cloze
--out corpus/cpu_study/tasks``.

Each document: a few lines of held-out text and the start of the next line, then four words to continue it with —
the true word and three drawn from the same text by occurrence (``scripts/build_default_corpus.py``'s
``cloze_docs``, the demo task's construction), so word frequency alone gives no edge: chance is 25%. A downstream
task that a model of a few million parameters can do above chance, on the study's own held-out documents.
Idempotent: an existing task of the same inputs and settings is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout first on sys.path)

from data.shards import DataError, ReadStats, iter_documents, resolve_files
from evals.tasks import write_multiple_choice_task
from losslab.log import fail
from scripts.build_default_corpus import cloze_docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", required=True, help="held-out Pile-format shards")
    parser.add_argument("--name", required=True, help="task name (lm-eval --tasks NAME)")
    parser.add_argument("--out", required=True, help="task directory (eval.task_dir)")
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        files = resolve_files(args.files)
    except DataError as e:
        return fail(e)
    settings = {"files": {str(f): hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files},
                "docs": args.docs, "seed": args.seed}  # fmt: skip
    out = Path(args.out)
    stamp = out / f"{args.name}.settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and (out / f"{args.name}.yaml").is_file():
        print(f"{out}/{args.name}.yaml: already built from these inputs")
        return 0
    stats = ReadStats()
    texts = [doc.text for f in files for doc in iter_documents(f, stats)]
    docs = cloze_docs(texts, args.docs, args.seed)
    if not docs:
        return fail(f"{args.files}: no text to build cloze questions from")
    task = write_multiple_choice_task(out, args.name, docs)
    stamp.write_text(json.dumps(settings, indent=2) + "\n")
    print(f"wrote {task}: {len(docs)} four-way cloze questions from {len(texts)} held-out documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
