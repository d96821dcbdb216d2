"""lm-eval's model interface around a losslab GPT: log-likelihoods, rolling log-likelihoods, greedy generation."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from data.tokenizer import Tokenizer
from models import GPT, KVCache


@dataclass
class _Generation:
    """One generation in progress: greedy, or sampled at ``temperature`` from its own seeded generator.

    ``text`` is the decoded output, extended as tokens arrive (``extend_text``) so that a stop sequence is looked
    for only where it could have appeared: in the new characters and the ``len(stop) - 1`` before them."""

    prompt: list[int]
    until: list[str]
    max_new: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    temperature: float = 0.0
    rng: torch.Generator | None = None
    _prefix: int = 0  # tokens[_prefix:_read] decode to the last piece of text appended (its context)
    _read: int = 0

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from [V] logits."""
        if self.rng is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.rng))

    def extend_text(self, decode) -> str:
        """Append what the newest token adds to ``text``; -> the characters added. The tail from the previous
        piece on is decoded, not the whole output (a token's text depends on its neighbours: a leading space
        dropped at the start, bytes of one character split over tokens); a tail that ends inside a character
        (U+FFFD) waits for the next token."""
        before = decode(self.tokens[self._prefix : self._read])
        after = decode(self.tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        if not after.startswith(before):  # a tokenizer whose pieces do not concatenate: decode all
            whole = decode(self.tokens)
            added, self.text = whole, whole
        else:
            added = after[len(before) :]
            self.text += added
        self._prefix, self._read = self._read, len(self.tokens)
        return added

    def stopped(self, added: str) -> bool:
        """Whether a stop sequence ends in the characters just ``added`` to ``text`` (earlier ones were tested)."""
        if not added:
            return False
        return any(stop in self.text[max(0, len(self.text) - len(added) - len(stop) + 1) :] for stop in self.until)


def uses_bf16(precision: str, device: str | torch.device) -> bool:
    """``auto``: bf16 on CUDA (the precision the model trained in), fp32 elsewhere; ``fp32`` / ``bf16`` force one."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: choose auto, fp32 or bf16")
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


class LosslabLM(TemplateLM):
    """``precision``: see ``uses_bf16``; with bf16 the forward runs under autocast and log-probabilities are still
    computed in fp32. ``kv_cache``: generation caches keys and values (one token per step) where the context
    window allows; False re-reads the window every step (the reference the cached path is tested against).

    ``move`` (default): the model is this object's from then on: it is moved to ``device``, put in eval mode and,
    on a CPU, its matrices are stored column-major (``GPT.column_major_``: same values, faster products of few
    rows). ``move=False``: a model in training's hands (ZeRO-3 placeholders, offloaded weights, parameters an
    optimizer holds) is only put in eval mode, left where and as it is."""

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
        self._device = torch.device(device)
        self.model = (model.to(device) if move else model).eval()
        if move and self._device.type == "cpu":
            self.model.column_major_()
        self.tok = tokenizer
        self.batch_size = batch_size
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
    def _score(
        self, roots: list[tuple[int, ...]], wanted: list[list[tuple[int, list[int]]]]
    ) -> list[tuple[float, bool]]:
        """One right-padded batch of inputs ``roots``; ``wanted[b]``: the (input length, continuation) pairs read
        from root b (its own and its prefixes': causal attention makes a prefix's positions the same in both).
        Only the continuation positions go through the output head (never the whole [B, T, V] logits), and of
        their logits only the log-sum-exp, the target's logit and the argmax are taken."""
        T = max(len(x) for x in roots)
        ids = torch.full((len(roots), T), self.tok.eos_id, dtype=torch.long)
        for i, x in enumerate(roots):
            ids[i, : len(x)] = torch.tensor(x)
        # the continuation's predictions: positions len(input) - n .. len(input) - 1 of the root's row
        flat = [b * T + p for b, pairs in enumerate(wanted) for length, c in pairs
                for p in range(length - len(c), length)]  # fmt: skip
        target = torch.tensor([t for pairs in wanted for _, c in pairs for t in c], device=self._device)  # [n]
        self._before_forward()
        with self._autocast():
            hidden = self.model(ids.to(self._device))  # [B, T, d]
            logits = self.model.head(hidden.flatten(0, 1)[torch.tensor(flat, device=self._device)])  # [n, V]
        logits = logits.float()  # a no-op in fp32; bf16 logits are read in fp32
        token_logp = (logits.gather(1, target[:, None])[:, 0] - logits.logsumexp(dim=-1)).tolist()  # [n]
        token_greedy = (logits.argmax(dim=-1) == target).tolist()
        out, s = [], 0
        for pairs in wanted:
            for _, c in pairs:
                out.append((sum(token_logp[s : s + len(c)]), all(token_greedy[s : s + len(c)])))
                s += len(c)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # request: ((context, continuation), context_enc, continuation_enc)
        items: list[tuple[tuple[int, ...], list[int]]] = []  # (model input, continuation tokens scored)
        for _, ctx, cont in requests:
            if not cont:
                raise ValueError("empty continuation in a loglikelihood request")
            whole = (ctx + cont)[-(self.max_length + 1) :]  # keep the continuation, truncate the context
            n = min(len(cont), len(whole) - 1)  # a continuation longer than the window is scored in part
            items.append((tuple(whole[:-1]), cont[len(cont) - n :]))
        # An input that is a prefix of another is read from that one's forward, so each longest input runs once
        # (the one-token answers of a multiple-choice question share their context's forward). Sorted, every
        # input that starts with x follows x directly: x's root is the root of the next input if that starts
        # with x.
        inputs = sorted({inp for inp, _ in items})
        root: dict[tuple[int, ...], tuple[int, ...]] = {}
        for i in range(len(inputs) - 1, -1, -1):
            x = inputs[i]
            after = inputs[i + 1] if i + 1 < len(inputs) else ()
            root[x] = root[after] if after[: len(x)] == x and len(after) > len(x) else x
        served: dict[tuple[int, ...], list[int]] = {}
        for idx, (inp, _) in enumerate(items):
            served.setdefault(root[inp], []).append(idx)
        order = sorted(served, key=lambda r: -len(r))  # longest first: less padding, early OOM
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood") as bar:
            for s in range(0, len(order), self.batch_size):
                chunk = order[s : s + self.batch_size]
                wanted = [[(len(items[idx][0]), items[idx][1]) for idx in served[r]] for r in chunk]
                scores = iter(self._score(chunk, wanted))
                for r in chunk:
                    for idx in served[r]:
                        results[idx] = next(scores)
                    bar.update(len(served[r]))
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
        batched or shared out. Prompts are sorted by length (longest first) and decode
        ``batch_size`` at a time, left-padded (``KVCache.empty(pad=...)``: the padding is masked and each row's
        positions start at its first token, so a row computes what it would alone); a batch's prompts are read in
        groups of similar lengths (``_prefill``). A row stops at end-of-text, at a stop sequence or at its
        ``max_gen_toks``, and leaves the batch."""
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
        self._generate_all(gens, disable_tqdm)
        out = []
        for g in gens:
            text = self.tok_decode(g.tokens)
            for stop in g.until:
                text = text.split(stop)[0]
            out.append(text)
        return out

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of token prompts (up to end-of-text, which is not included, or
        ``max_new_tokens``), batched as ``generate_until`` batches them."""
        gens = [_Generation(list(p), [], max_new_tokens) for p in prompts]
        self._generate_all(gens, disable_tqdm=True)
        return [g.tokens for g in gens]

    def _generate_all(self, gens: list[_Generation], disable_tqdm: bool) -> None:
        order = sorted(gens, key=lambda g: -len(g.prompt))  # little padding; the longest (slowest) first
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, disable=disable_tqdm, desc="generate_until"):
            self._generate_batch(batch)

    def _generate_batch(self, batch: list[_Generation]) -> None:
        active = [g for g in batch if g.max_new > 0]
        if not active:
            return
        # With room for every new token in the context window, keys and values are cached (preallocated for the
        # longest row) and each step feeds one token; otherwise the window slides and each step re-reads each
        # row's last max_length tokens.
        longest = max(len(g.prompt) for g in active) + max(g.max_new for g in active)
        cached = self.kv_cache and longest <= self.max_length
        cache = None
        while active:
            with self._autocast():
                if cached and cache is None:
                    cache, last = self._prefill([g.prompt for g in active], capacity=longest)
                elif cache is not None:
                    ids = torch.tensor([[g.tokens[-1]] for g in active], device=self._device)  # [B, 1]
                    self._before_forward()
                    last = self.model.head(self.model(ids, cache)[:, -1])  # [B, V]: next-token logits only
                else:  # re-read every row's window, left-padded
                    last = self._last_logits([(g.prompt + g.tokens)[-self.max_length :] for g in active])[1]
            greedy = last.argmax(dim=-1).tolist()  # [B]
            keep = []
            for i, g in enumerate(active):
                next_id = greedy[i] if g.rng is None else g.pick(last[i])  # a sampled row draws on its own
                if next_id == self.eot_token_id:
                    g.done = True
                else:
                    g.tokens.append(next_id)
                    g.done = len(g.tokens) >= g.max_new or g.stopped(g.extend_text(self.tok_decode))
                if not g.done:
                    keep.append(i)
            if cache is not None and keep and len(keep) < len(active):  # finished rows leave the cache too
                cache.keep(torch.tensor(keep, dtype=torch.long, device=self._device))
            active = [active[i] for i in keep]

    def _last_logits(self, rows: list[list[int]]) -> tuple[KVCache, torch.Tensor]:
        """Token rows of mixed lengths, left-padded into one batch -> (their cache, the next-token logits [B, V])."""
        width = max(map(len, rows))
        pad = [width - len(r) for r in rows]
        ids = torch.tensor([[self.tok.eos_id] * p + r for p, r in zip(pad, rows, strict=True)], device=self._device)
        cache = KVCache.empty(self.model.cfg.n_layers, pad=torch.tensor(pad, device=self._device) if any(pad) else None)
        self._before_forward()
        return cache, self.model.head(self.model(ids, cache)[:, -1])  # [B, V]: the last position's only

    def _prefill(self, prompts: list[list[int]], capacity: int) -> tuple[KVCache, torch.Tensor]:
        """The prompts of a batch in groups of similar lengths (each left-padded to its longest with at most a
        quarter of its positions padding, instead of all to the batch's longest: real prompts have a long tail)
        -> (one cache left-padded to the longest prompt, with room for ``capacity`` positions; each row's
        next-token logits [B, V])."""
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        groups: list[list[int]] = []  # row indices, longest first
        for i in sorted(range(len(prompts)), key=lambda i: -lengths[i]):
            if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= 1.25 * (
                sum(lengths[j] for j in groups[-1]) + lengths[i]
            ):
                groups[-1].append(i)
            else:
                groups.append([i])
        pad = torch.tensor([width - n for n in lengths], device=self._device)
        cache = KVCache.empty(self.model.cfg.n_layers, pad=pad, capacity=capacity)
        last = None
        for group in groups:
            part, logits = self._last_logits([prompts[i] for i in group])
            if last is None:
                last = logits.new_empty(len(prompts), logits.shape[-1])  # [B, V]
            rows = torch.tensor(group, device=self._device)
            last[rows] = logits
            cache.place(rows, part, end=width)
        return cache, last
