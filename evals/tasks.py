"""Local lm-eval tasks: a JSONL file of documents plus a task YAML that reads it (no hub access)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

MULTIPLE_CHOICE_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """One JSON object per line (UTF-8, not escaped); returns the number of rows."""
    n = 0
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_multiple_choice_task(out_dir: str | Path, name: str, docs: list[dict]) -> Path:
    """docs: {"context": str, "choices": [str, ...], "label": int}. The choices follow the context directly
    (no delimiter), so they should carry their own leading space or newline. Returns the YAML path."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / f"{name}.jsonl"
    for doc in docs:
        if not 0 <= doc["label"] < len(doc["choices"]):
            raise ValueError(f"label {doc['label']} out of range for {len(doc['choices'])} choices")
    write_jsonl(data_file, docs)
    yaml_path = out / f"{name}.yaml"
    yaml_path.write_text(MULTIPLE_CHOICE_YAML.format(name=name, data_file=json.dumps(str(data_file))))
    return yaml_path
