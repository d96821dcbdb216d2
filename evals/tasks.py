"""Local lm-eval tasks: a JSONL file of documents plus a task YAML that reads it (no hub access)."""

from __future__ import annotations

import json
import re
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


_QUOTED_PATH = re.compile(r'"(/[^"\n]+)"')


def relocate_tasks(task_dir: str | Path) -> int:
    """Make a copied or moved task directory usable where it now is: task YAMLs name their data files and the
    stock task they include by absolute path (lm-eval resolves neither relative to the YAML), so paths that no
    longer exist are pointed at this directory's data (same file name) and at this machine's lm-eval tasks.
    Idempotent; returns the number of YAML files rewritten. An unresolvable path is an error naming it."""
    import lm_eval

    root = Path(task_dir).resolve()
    stock = Path(lm_eval.__file__).parent / "tasks"

    def moved(match: re.Match) -> str:
        path = Path(match.group(1))
        if path.exists():
            return match.group(0)
        if "/lm_eval/tasks/" in path.as_posix():
            candidates = [stock / path.as_posix().split("/lm_eval/tasks/", 1)[1]]
        else:
            candidates = [root / "data" / path.name, root / path.name]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise FileNotFoundError(f"{path} (named in a task file under {root}) not found, nor at {candidates}")
        return json.dumps(str(found))

    rewritten = 0
    for yaml_path in sorted(root.glob("*.yaml")):
        text = yaml_path.read_text()
        new = _QUOTED_PATH.sub(moved, text)
        if new != text:
            yaml_path.write_text(new)
            rewritten += 1
    return rewritten
