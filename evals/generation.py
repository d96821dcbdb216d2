"""Generation evaluation: what PDL claims to improve (more specific, informative outputs), measured.

The text metrics (ROUGE-1/2/L, corpus-level distinct-1/2, length, degenerate fraction) live in
``evals.generation_metrics`` and are re-exported here; that file is also copied into every generation task
written by ``write_generation_task``, so lm-eval computes them with the same code. Token rarity needs the
tokenizer and the training token counts, which lm-eval's metric hooks never see: it is computed here, on the
generated texts, by the caller (``generation_rarity``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from evals import generation_metrics
from evals.generation_metrics import (  # noqa: F401  (re-exported: the metrics' public home)
    degenerate_fraction,
    distinct_n,
    is_degenerate,
    length_words,
    mean_length,
    rouge,
    words,
)
from evals.tasks import write_jsonl

METRICS_MODULE = "generation_metrics"  # the file name (without .py) the task YAML's !function entries load

GENERATE_UNTIL_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: response
generation_kwargs:
  until: {until}
  do_sample: {do_sample}
  temperature: {temperature}
{seed_line}  max_gen_toks: {max_gen_toks}
process_results: !function {module}.process_results
metric_list:
  - metric: rouge1
    aggregation: mean
    higher_is_better: true
  - metric: rouge2
    aggregation: mean
    higher_is_better: true
  - metric: rougeL
    aggregation: mean
    higher_is_better: true
  - metric: length
    aggregation: mean
    higher_is_better: true
  - metric: degenerate
    aggregation: mean
    higher_is_better: false
  - metric: distinct1
    aggregation: !function {module}.distinct1
    higher_is_better: true
  - metric: distinct2
    aggregation: !function {module}.distinct2
    higher_is_better: true
metadata:
  version: 1.0
"""


def mean_token_rarity(outputs: Sequence[Sequence[int]], counts: torch.Tensor) -> float:
    """Mean over all output tokens (pooled over outputs) of -log p(t), p the add-one smoothed relative frequency
    under the training token counts: p(t) = (counts[t] + 1) / (counts.sum() + V). ``outputs``: token ids per
    output; ``counts``: [V] int64. Higher = rarer words. NaN when the outputs hold no tokens."""
    ids = torch.tensor([t for out in outputs for t in out], dtype=torch.long)  # [n]
    if ids.numel() == 0:
        return float("nan")
    if int(ids.min()) < 0 or int(ids.max()) >= counts.numel():
        raise ValueError(f"token id out of range for counts of size {counts.numel()}")
    counts = counts.to(torch.float64)  # [V]
    log_p = torch.log(counts + 1.0) - math.log(float(counts.sum()) + counts.numel())  # [V]
    return float(-log_p[ids].mean())


def generation_rarity(texts: Sequence[str], tokenizer, counts: torch.Tensor) -> float:
    """``mean_token_rarity`` of generated texts, tokenised with ``tokenizer`` (any ``data.tokenizer.Tokenizer``:
    it must be the one the counts were made with)."""
    return mean_token_rarity(tokenizer.encode_batch(list(texts)) if texts else [], counts)


def rarity_metrics(raw: dict, tokenizer, counts: torch.Tensor) -> dict[str, float]:
    """Token rarity for each generation task in an lm-eval result run with ``log_samples=True``:
    ``{"TASK/rarity": r, "TASK/rarity_reference": r_ref}``, the outputs' and the references' mean token rarity
    (the reference's is the level a model that writes like the held-out text would reach). Generation tasks are
    those whose logged samples carry this module's ``distinct1``; other tasks are skipped."""
    out: dict[str, float] = {}
    for task, samples in (raw.get("samples") or {}).items():
        if not samples or "distinct1" not in samples[0]:
            continue
        outputs = [s["filtered_resps"][0] for s in samples]
        references = [s["doc"]["response"] for s in samples]
        out[f"{task}/rarity"] = generation_rarity(outputs, tokenizer, counts)
        out[f"{task}/rarity_reference"] = generation_rarity(references, tokenizer, counts)
    return out


def write_generation_task(
    out_dir: str | Path,
    name: str,
    records: Sequence[dict],
    *,
    until: Sequence[str] = ("\n\n",),
    max_gen_toks: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
) -> Path:
    """A local lm-eval ``generate_until`` task from ``{"prompt", "response"}`` records: the model continues the
    prompt greedily until a stop string in ``until`` (or ``max_gen_toks`` tokens) and the output is scored against
    the response with ROUGE-1/2/L, length and degeneracy (means over documents) and distinct-1/2 (over all
    outputs). ``temperature`` > 0 samples instead, each document from its own generator seeded by ``seed`` and
    its position (``evals/lm.py``), so a sampled task is as reproducible as a greedy one. Writes ``NAME.yaml``,
    ``NAME.jsonl`` and ``generation_metrics.py`` (the metrics, copied) in ``out_dir``; returns the YAML path.
    For one-line replies (the Shakespeare dialogue data) ``until=("\\n",)``."""
    if not until or not all(isinstance(s, str) and s for s in until):
        raise ValueError(f"until={until!r}: give non-empty stop strings")
    if max_gen_toks < 1:
        raise ValueError(f"max_gen_toks={max_gen_toks}: must be positive")
    for i, rec in enumerate(records):
        if not (isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str)):
            raise ValueError(f"record {i} has no string prompt/response: {sorted(rec)}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / f"{name}.jsonl"
    write_jsonl(data_file, ({"prompt": r["prompt"], "response": r["response"]} for r in records))
    shutil.copyfile(generation_metrics.__file__, out / f"{METRICS_MODULE}.py")
    yaml_path = out / f"{name}.yaml"
    yaml_path.write_text(
        GENERATE_UNTIL_YAML.format(
            name=name,
            data_file=json.dumps(str(data_file)),
            until=json.dumps(list(until)),
            max_gen_toks=max_gen_toks,
            do_sample=json.dumps(temperature > 0),
            temperature=temperature,
            # greedy tasks carry no seed: transformers' generate() (lm_eval --model hf) refuses unknown arguments
            seed_line=f"  seed: {seed}\n" if temperature > 0 else "",
            module=METRICS_MODULE,
        )
    )
    return yaml_path
