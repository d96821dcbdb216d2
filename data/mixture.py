"""The mixture a run actually gets, said before training: the domains present in the data, their tokens, and
the weight each gets once ``data.mix`` is restricted to what is present.

A ``data.mix`` domain the prepared data does not hold (a Pile mirror without Books3, a download of a few shards)
is an error naming it, unless ``data.mix_missing=renormalise``, which drops it and spreads the weights of the
others to sum to 1. The report is printed and saved with the run (``mixture.json``, ``run_info.json``).
Streamed shards have no ``data.mix``: their domains come in their natural proportions, estimated from a
sample of their text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from data.config import DataConfig
from data.shards import DataError, ReadStats, iter_documents, resolve_files


def effective_mix(mix: dict[str, float], available: dict[str, int], policy: str, where: str) -> dict[str, float]:
    """``data.mix`` restricted to the domains in ``available``: a missing one is an error naming it unless
    ``policy == "renormalise"``. Weights are returned as given (the sampler normalises them)."""
    missing = sorted(set(mix) - set(available))
    if missing and policy != "renormalise":
        raise DataError(
            f"data.mix names domains that {where} does not hold: {missing} (it holds {sorted(available)}); "
            "remove them from data.mix, or set data.mix_missing=renormalise to share their weight among the others"
        )
    kept = {name: w for name, w in mix.items() if name in available}
    if mix and not any(w > 0 for w in kept.values()):
        raise DataError(f"data.mix gives no weight to any domain {where} holds ({sorted(available)})")
    return kept


@dataclass
class Domain:
    name: str
    weight: float
    """Share of the training samples it gets (0: not drawn)."""
    requested: float | None
    """Its weight in data.mix as written (None: not named there)."""
    tokens: int | None = None
    """Prepared data: its tokens."""
    sampled_bytes: int | None = None
    """Streamed data: bytes of its text in the sample read."""
    planned_tokens: int | None = None
    epochs: float | None = None
    """Planned tokens over the tokens available: above 1, the run sees its data more than once."""


@dataclass
class MixtureReport:
    data: str
    """What was read: the prepared folder, or the streamed files."""
    how: str
    """Where the weights come from."""
    domains: list[Domain]
    missing: dict[str, float] = field(default_factory=dict)
    """data.mix domains the data does not hold, with their requested weights (renormalised away)."""
    planned_tokens: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        planned = f"; {_si(self.planned_tokens)} tokens planned" if self.planned_tokens else ""
        lines = [f"data mixture: {self.data}, {self.how}{planned}"]
        streamed = any(d.sampled_bytes is not None for d in self.domains)
        head = ("sample bytes" if streamed else "tokens") + "  data.mix   weight" + ("" if streamed else "  epochs")
        width = max([len(d.name) for d in self.domains] + [6])
        lines.append(f"  {'domain':<{width}}  {head}")
        for d in self.domains:
            amount = d.sampled_bytes if streamed else d.tokens
            requested = "-" if d.requested is None else f"{d.requested:.4f}"
            epochs = "" if d.epochs is None else f"  {d.epochs:6.2f}"
            size = 12 if streamed else 6
            lines.append(f"  {d.name:<{width}}  {_si(amount):>{size}}  {requested:>8}  {d.weight:7.4f}{epochs}")
        if self.missing:
            gone = ", ".join(f"{k} {v:.4f}" for k, v in sorted(self.missing.items()))
            lines.append(f"  not in the data, renormalised away (data.mix_missing=renormalise): {gone}")
        unused = [d.name for d in self.domains if d.weight == 0]
        if unused:
            lines.append(f"  in the data but given no weight (not in data.mix): {', '.join(unused)}")
        return "\n".join(lines)


def _si(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def describe(cfg: DataConfig, planned_tokens: int | None = None, sample_bytes: int = 8_000_000) -> MixtureReport | None:
    """The mixture of the run's training data (None for fine-tuning records, which have no domains)."""
    if cfg.prepared:
        from data.memmap import PreparedCorpus  # torch: only for prepared data

        corpus = PreparedCorpus(cfg.prepared)
        if corpus.records:
            return None
        available = {name: int(s["tokens"]) for name, s in corpus.sources.items()}
        where = f"prepared data {cfg.prepared!r}"
        mix = effective_mix(cfg.mix, available, cfg.mix_missing, where)
        raw = mix or {name: float(t) for name, t in available.items()}
        how = (
            "data.mix" + (" renormalised over the domains present" if len(mix) < len(cfg.mix) else "")
            if cfg.mix
            else "no data.mix: each domain in proportion to its tokens"
        )
        report = _report(where, how, raw, cfg.mix, tokens=available, planned_tokens=planned_tokens)
        report.missing = {k: v for k, v in cfg.mix.items() if k not in available}
        return report
    if not cfg.train_files:
        return None
    files = resolve_files(cfg.train_files)
    sampled = _sample_sources(files, sample_bytes)
    how = f"streamed: natural proportions, estimated from {_si(sum(sampled.values()))}B of text read"
    return _report(f"{len(files)} streamed files", how, {k: float(v) for k, v in sampled.items()}, {},
                   sampled=sampled, planned_tokens=planned_tokens)  # fmt: skip


def _report(where, how, raw: dict[str, float], requested: dict[str, float], *, tokens: dict[str, int] | None = None,
            sampled: dict[str, int] | None = None, planned_tokens: int | None) -> MixtureReport:  # fmt: skip
    names = sorted(set(raw) | set(tokens or {}) | set(sampled or {}))
    total = sum(w for w in raw.values() if w > 0)
    domains = []
    for name in names:
        weight = max(raw.get(name, 0.0), 0.0) / total
        d = Domain(name, weight, requested.get(name))
        if tokens is not None:
            d.tokens = tokens[name]
            if planned_tokens:
                d.planned_tokens = round(weight * planned_tokens)
                d.epochs = d.planned_tokens / d.tokens if d.tokens else None
        if sampled is not None:
            d.sampled_bytes = sampled.get(name, 0)
        domains.append(d)
    return MixtureReport(where, how, domains, planned_tokens=planned_tokens)


def _sample_sources(files: list[str], budget: int) -> dict[str, int]:
    """Text bytes per ``meta.pile_set_name`` in the first ``budget / len(files)`` bytes of text of each file."""
    per_file = max(1, budget // len(files))
    sizes: dict[str, int] = {}
    for path in files:
        read = 0
        for doc in iter_documents(path, ReadStats()):
            n = len(doc.text.encode("utf-8", "replace"))
            sizes[doc.source or "(no pile_set_name)"] = sizes.get(doc.source or "(no pile_set_name)", 0) + n
            read += n
            if read >= per_file:
                break
    if not sizes:
        raise DataError(f"no documents in {files}")
    return sizes
