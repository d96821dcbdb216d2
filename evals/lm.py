"""lm-eval's model interface around a losslab GPT: log-likelihoods, rolling log-likelihoods, greedy generation."""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from data.tokenizer import Tokenizer
from models import GPT, KVCache


@dataclass
class _Generation:
    """One generation in progress: greedy, or sampled at ``temperature`` from its own seeded generator."""

    prompt: list[int]
    until: list[str]
    max_new: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    temperature: float = 0.0
    rng: torch.Generator | None = None

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from [V] logits."""
        if self.rng is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.rng))


def uses_bf16(precision: str, device: str | torch.device) -> bool:
    """``auto``: bf16 on CUDA (the precision the model trained in), fp32 elsewhere; ``fp32`` / ``bf16`` force one."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: choose auto, fp32 or bf16")
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


class LosslabLM(TemplateLM):
    """``precision``: see ``uses_bf16``; with bf16 the forward runs under autocast and log-probabilities are still
    computed in fp32. ``kv_cache``: generation
    caches keys and values (one token per step) where the context window allows; False re-reads the window
    every step (the reference the cached path is tested against). ``move``: put the model on ``device`` first."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 16,
        device: str = "cpu",
        precision: str = "auto",
        kv_cache: bool = True,
        move: bool = True,
    ) -> None:
        super().__init__()
        # move=False: a model in training's hands (ZeRO-3 placeholders, offloaded weights) stays where it is
        self.model = (model.to(device) if move else model).eval()
        self.tok = tokenizer
        self.batch_size = batch_size
        self._device = torch.device(device)
        self.max_length = model.cfg.max_seq_len
        self._bf16 = uses_bf16(precision, self._device)
        self.kv_cache = kv_cache

    def _before_forward(self) -> None:
        """Called before each forward pass (the trunk, then the head): a no-op here; a share of a distributed
        evaluation under ZeRO-3 keeps the ranks' passes paired (``evals/distributed.py``)."""

    def _autocast(self):
        return torch.autocast(self._device.type, dtype=torch.bfloat16) if self._bf16 else nullcontext()

    @property
    def eot_token_id(self) -> int:
        # Training separates documents with EOS, so EOS is what precedes a document's first token.
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    @torch.no_grad()
    def _score(self, inputs: list[list[int]], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """One padded batch: inputs[i] ends just before the last continuation token. Only the continuation
        positions go through the output head (never the whole [B, T, V] logits)."""
        T = max(len(x) for x in inputs)
        ids = torch.full((len(inputs), T), self.tok.eos_id, dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, : len(x)] = torch.tensor(x)
        self._before_forward()
        with self._autocast():
            hidden = self.model(ids.to(self._device))  # [B, T, d]
            # the continuation's predictions: rows len(x) - n .. len(x) - 1 of each sequence
            rows = [hidden[i, len(x) - len(c) : len(x)] for i, (x, c) in enumerate(zip(inputs, conts, strict=True))]
            picked = torch.cat(rows)  # [sum n, d]
            logp = F.log_softmax(self.model.head(picked).float(), dim=-1)  # [sum n, V]
        target = torch.tensor([t for c in conts for t in c], device=logp.device)  # [sum n]
        token_logp = logp.gather(1, target[:, None])[:, 0].tolist()
        token_greedy = (logp.argmax(-1) == target).tolist()
        out, s = [], 0
        for c in conts:
            out.append((sum(token_logp[s : s + len(c)]), all(token_greedy[s : s + len(c)])))
            s += len(c)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # request: ((context, continuation), context_enc, continuation_enc)
        items = []
        for idx, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError("empty continuation in a loglikelihood request")
            whole = (ctx + cont)[-(self.max_length + 1) :]  # keep the continuation, truncate the context
            n = min(len(cont), len(whole) - 1)  # a continuation longer than the window is scored in part
            items.append((idx, whole[:-1], cont[len(cont) - n :]))
        items.sort(key=lambda it: -len(it[1]))  # longest first: less padding, early OOM
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for s in tqdm(range(0, len(items), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            chunk = items[s : s + self.batch_size]
            scores = self._score([it[1] for it in chunk], [it[2] for it in chunk])
            for (idx, _, _), score in zip(chunk, scores, strict=True):
                results[idx] = score
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (string,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self._generate(requests, range(len(requests)), disable_tqdm)

    @torch.no_grad()
    def _generate(self, requests, indices, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding, or with ``do_sample`` (and ``temperature``, default 1) sampling seeded per request:
        ``seed`` (default 0) and the request's index in the call (``indices``: in the whole call when this is a
        rank's share of it) fix each request's generator, so a sample does not depend on how requests were
        batched or shared out. Batched without padding: prompts of the same length in tokens
        decode together, so every row of a batch grows by one token a step (the model takes no attention mask).
        A row stops at end-of-text, at a stop sequence or at its ``max_gen_toks``, and leaves the batch."""
        gens = []
        for index, req in zip(indices, requests, strict=True):
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            prompt = self.tok_encode(context) or [self.prefix_token_id]
            g = _Generation(prompt, until, int(gen_kwargs.get("max_gen_toks", 256)))
            temperature = float(gen_kwargs.get("temperature", 1.0))
            if gen_kwargs.get("do_sample") and temperature > 0:
                g.temperature = temperature
                g.rng = torch.Generator().manual_seed(int(gen_kwargs.get("seed", 0)) * 1_000_003 + index)
            gens.append(g)
        by_length: dict[int, list[_Generation]] = defaultdict(list)
        for g in gens:
            by_length[len(g.prompt)].append(g)
        batches = [group[s : s + self.batch_size] for group in by_length.values()
                   for s in range(0, len(group), self.batch_size)]  # fmt: skip
        for batch in tqdm(batches, disable=disable_tqdm, desc="generate_until"):
            self._generate_batch(batch)
        out = []
        for g in gens:
            text = g.text
            for stop in g.until:
                text = text.split(stop)[0]
            out.append(text)
        return out

    def _generate_batch(self, batch: list[_Generation]) -> None:
        active = [g for g in batch if g.max_new > 0]
        if not active:
            return
        # With room for every new token in the context window, keys and values are cached and each step feeds
        # one token; otherwise the window slides and each step re-reads its last max_length tokens.
        cached = self.kv_cache and len(active[0].prompt) + max(g.max_new for g in active) <= self.max_length
        cache = KVCache.empty(self.model.cfg.n_layers) if cached else None
        while active:
            if cache is not None and cache.length:
                window = torch.tensor([[g.tokens[-1]] for g in active], device=self._device)  # [B, 1]
            else:
                window = torch.tensor([(g.prompt + g.tokens)[-self.max_length :] for g in active], device=self._device)
            self._before_forward()
            with self._autocast():
                last = self.model.head(self.model(window, cache)[:, -1])  # [B, V]: next-token logits only
            keep = []
            picked = [g.pick(row) for g, row in zip(active, last, strict=True)]  # greedy or sampled, row by row
            for i, (g, next_id) in enumerate(zip(active, picked, strict=True)):
                if next_id == self.eot_token_id:
                    g.done = True
                else:
                    g.tokens.append(next_id)
                    g.text = self.tok_decode(g.tokens)
                    g.done = len(g.tokens) >= g.max_new or any(stop in g.text for stop in g.until)
                if not g.done:
                    keep.append(i)
            if cache is not None and keep and len(keep) < len(active):  # finished rows leave the cache too
                rows = torch.tensor(keep, dtype=torch.long, device=self._device)
                for kv in cache.layers:
                    kv.k, kv.v = kv.k[rows], kv.v[rows]
            active = [active[i] for i in keep]
