"""Text metrics of generations against references — the single source of the metrics, used two ways.

In losslab it is imported (``evals.generation`` re-exports it). In an lm-eval ``generate_until`` task written by
``evals.generation.write_generation_task`` this very file is copied beside the task YAML, which names
``process_results`` and the corpus-level aggregations with lm-eval's ``!function`` (lm-eval loads a file beside
the YAML by path). So it imports nothing from losslab: the standard library and ``rouge_score`` only.

Word-level metrics (distinct-n, length, degeneracy) use **whitespace tokens, lower-cased**: ``text.lower().split()``.
ROUGE uses its own tokenizer (lower-cased, every non-alphanumeric character a separator, no stemming).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
DEGENERATE_NGRAM = 3
DEGENERATE_SHARE = 0.5


def words(text: str) -> list[str]:
    """Whitespace tokens, lower-cased: the unit of every word-level metric here."""
    return text.lower().split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The ``len(tokens) - n + 1`` contiguous n-grams of ``tokens`` (none when it is shorter than ``n``)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


def rouge(generated: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L (longest common subsequence) F-measures of ``generated`` against
    ``reference`` with Google's ``rouge_score`` (no stemming): {"rouge1": f, "rouge2": f, "rougeL": f}, each in
    [0, 1]; 0 when either side has no tokens."""
    scores = _scorer().score(reference, generated)  # score(target, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def distinct_n(outputs: Iterable[str], n: int) -> float:
    """Corpus-level distinct-n: the number of different n-grams over all outputs divided by the number of
    n-grams over all outputs (n-grams never span two outputs; words as in ``words``). 0.0 when no output has
    ``n`` words."""
    grams = [g for text in outputs for g in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_n_left_out(outputs: Sequence[str], n: int) -> list[float]:
    """Distinct-n of the outputs with each output left out once (the delete-1 jackknife's replicates): entry ``i``
    equals ``distinct_n`` of every output but the ``i``-th, from one count of the n-grams — leaving output ``i``
    out removes its n-grams from the total, and from the different ones those that occur in no other output."""
    per = [Counter(ngrams(words(text), n)) for text in outputs]
    total: Counter = Counter()
    for counts in per:
        total.update(counts)
    grams, different = sum(total.values()), len(total)
    out = []
    for counts in per:
        left = grams - sum(counts.values())
        gone = sum(1 for gram, k in counts.items() if total[gram] == k)  # every occurrence is in this output
        out.append((different - gone) / left if left else 0.0)
    return out


def length_words(text: str) -> int:
    """Length of one output in whitespace tokens."""
    return len(text.split())


def mean_length(outputs: Sequence[str]) -> float:
    """Mean output length in whitespace tokens (0.0 for no outputs)."""
    return sum(length_words(t) for t in outputs) / len(outputs) if outputs else 0.0


def is_degenerate(text: str) -> bool:
    """True when the output is empty after ``strip()``, or is a phrase repeated: its most frequent 3-gram
    (words as in ``words``) occurs at least twice and makes up at least half of its 3-grams, or at most half of
    its 3-grams are distinct (a short phrase looping after an opening, "... A soldier. A soldier. A soldier.").
    An output of one or two words, or whose 3-grams are all different, is never degenerate unless empty."""
    if not text.strip():
        return True
    grams = ngrams(words(text), DEGENERATE_NGRAM)
    if not grams:
        return False
    counted = Counter(grams)
    top = counted.most_common(1)[0][1]
    return (top >= 2 and top / len(grams) >= DEGENERATE_SHARE) or len(counted) / len(grams) <= DEGENERATE_SHARE


def degenerate_fraction(outputs: Sequence[str]) -> float:
    """Share of outputs for which ``is_degenerate`` holds (0.0 for no outputs)."""
    return sum(is_degenerate(t) for t in outputs) / len(outputs) if outputs else 0.0


# --- lm-eval hooks: per-document values, then aggregations over the task's documents ---------------------------


def process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval ``process_results`` of a ``generate_until`` task with a ``response`` field: per-document ROUGE,
    length and degeneracy (averaged by lm-eval's ``mean``), and the output itself for the corpus-level distinct-n
    aggregations below."""
    generated = results[0]
    scores = rouge(generated, doc["response"])
    return {
        **scores,
        "length": float(length_words(generated)),
        "degenerate": float(is_degenerate(generated)),
        "distinct1": generated,
        "distinct2": generated,
    }


def distinct1(outputs: list[str]) -> float:
    """lm-eval aggregation: corpus-level distinct-1 over the task's outputs."""
    return distinct_n(outputs, 1)


def distinct2(outputs: list[str]) -> float:
    """lm-eval aggregation: corpus-level distinct-2 over the task's outputs."""
    return distinct_n(outputs, 2)
