"""lm-eval's model interface around a losslab GPT: log-likelihoods, rolling log-likelihoods, greedy generation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from data.tokenizer import Tokenizer
from models import GPT


class LosslabLM(TemplateLM):
    def __init__(self, model: GPT, tokenizer: Tokenizer, *, batch_size: int = 16, device: str = "cpu") -> None:
        super().__init__()
        self.model = model.to(device).eval()
        self.tok = tokenizer
        self.batch_size = batch_size
        self._device = torch.device(device)
        self.max_length = model.cfg.max_seq_len

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
        """One padded batch: inputs[i] ends just before the last continuation token."""
        T = max(len(x) for x in inputs)
        ids = torch.full((len(inputs), T), self.tok.eos_id, dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, : len(x)] = torch.tensor(x)
        logp = F.log_softmax(self.model.logits(ids.to(self._device)).float(), dim=-1)  # [B, T, V]
        out = []
        for i, (x, cont) in enumerate(zip(inputs, conts, strict=True)):
            n = len(cont)
            rows = logp[i, len(x) - n : len(x)]  # [n, V]: predictions of the continuation tokens
            target = torch.tensor(cont, device=rows.device)
            out.append((rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())))
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

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context) or [self.prefix_token_id]
            generated: list[int] = []
            text = ""
            for _ in range(max_new):
                window = torch.tensor([(ids + generated)[-self.max_length :]], device=self._device)
                next_id = int(self.model.logits(window)[0, -1].argmax())
                if next_id == self.eot_token_id:
                    break
                generated.append(next_id)
                text = self.tok_decode(generated)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out
