"""The patched model in ``transformers.Trainer`` and TRL's ``SFTTrainer`` (issue #28's acceptance): gradient
accumulation against a hand computation in float64 — for ``ce`` the accumulated step is the large batch's; for
``mile`` each micro-batch is normalised by its own weights and the micro-steps averaged, as losslab's own loop
and the official MiLe code do, and with ``loss.normalise=tokens`` the accumulated step is the large batch's — and
a completion-only SFT loss that falls on the completions alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from losslab import hf  # noqa: E402
from losslab.losses import IGNORE_INDEX  # noqa: E402
from tests.test_hf_patch import V, tiny  # noqa: E402
from tests.test_losses import rel_err  # noqa: E402

T = 10


class Recorder(transformers.TrainerCallback):
    """The gradients the optimizer is about to apply (clipping off)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def records(n: int = 4) -> list[dict[str, torch.Tensor]]:
    """Rows of different lengths (right-padded) with prompts masked: micro-batches hold different numbers of
    targets, where a mean of micro-batch means would not be the token mean."""
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(n):
        ids = torch.randint(1, V, (T,), generator=g)
        length, prompt = T - 2 * i, i  # every row keeps at least one target
        mask = (torch.arange(T) < length).long()
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        labels[:prompt] = IGNORE_INDEX
        rows.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return rows


def train_one_step(model, rows, micro: int, accum: int, tmp_path, trainer_cls=None, **args):
    """One optimizer step (learning rate 0) -> (the step's loss as Trainer accumulates it, the gradients)."""
    recorder = Recorder()
    losses: list[float] = []
    base = trainer_cls or transformers.Trainer

    class Recording(base):  # what Trainer.training_step returns for each micro-batch
        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            losses.append(loss.item())
            return loss

    config_cls = args.pop("config_cls", transformers.TrainingArguments)
    targs = config_cls(output_dir=str(tmp_path / "out"), per_device_train_batch_size=micro,
                       gradient_accumulation_steps=accum, max_steps=1, learning_rate=0.0, max_grad_norm=0.0,
                       report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
                       dataloader_num_workers=0, **args)  # fmt: skip
    trainer = Recording(model=model, args=targs, train_dataset=rows, callbacks=[recorder])
    trainer.train()
    assert len(losses) == accum
    return sum(losses), recorder.grads


def hand(model, rows, loss: str, per_micro: bool, tokens: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss written from its formula on the unpatched model's float64 logits, and its gradients. ``tokens``:
    the weighted sum over the step's target tokens (``loss.normalise=tokens``)."""
    model.zero_grad()
    terms = []
    for row in rows:
        logits = model(input_ids=row["input_ids"][None], attention_mask=row["attention_mask"][None]).logits[0]
        y = row["labels"][1:]
        valid = y != IGNORE_INDEX
        ce = F.cross_entropy(logits[:-1], y.clamp_min(0), reduction="none")[valid]
        logp = torch.log_softmax(logits[:-1].detach(), -1)[valid]
        entropy = -(logp.exp() * logp).sum(-1)
        w = torch.ones_like(ce) if loss == "ce" else 1.0 + entropy  # mile, gamma 1
        terms.append((w * ce, w))
    if tokens:
        value = sum(wl.sum() for wl, _ in terms) / sum(len(w) for _, w in terms)
    elif per_micro:  # each micro-batch normalised by its own weights, then the micro-steps averaged
        value = sum(wl.sum() / w.sum() for wl, w in terms) / len(terms)
    else:
        value = sum(wl.sum() for wl, _ in terms) / sum(w.sum() for _, w in terms)
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return value.detach(), grads


def assert_same(loss, grads, expected_loss, expected_grads, tol=1e-10):
    assert loss == pytest.approx(expected_loss.item(), rel=tol)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert rel_err(grads[name], expected_grads[name]) < tol, name


def test_trainer_accumulation_equals_the_large_batch_for_ce(tmp_path):
    rows = records()
    model = tiny("llama")
    expected = hand(model, rows, "ce", per_micro=False)
    hf.patch(model, "ce")
    accumulated = train_one_step(model, rows, micro=1, accum=4, tmp_path=tmp_path / "a")
    large = train_one_step(model, rows, micro=4, accum=1, tmp_path=tmp_path / "b")
    assert_same(*accumulated, *expected)  # num_items_in_batch: the step's token mean, not a mean of means
    assert_same(*large, *expected)
    hf.unpatch(model)  # transformers' own loss (in float32) agrees
    own = train_one_step(model, rows, micro=1, accum=4, tmp_path=tmp_path / "c")
    assert own[0] == pytest.approx(expected[0].item(), rel=1e-6)


def test_trainer_accumulation_of_mile_averages_micro_batch_normalisers(tmp_path):
    """MiLe's normaliser is the sum of the weights of one call (one micro-batch on one rank; the official code
    and losslab's own loop): accumulation averages the micro-steps' weight-normalised losses. It is not the
    large batch's loss, and the test shows by how much."""
    rows = records()
    model = tiny("llama")
    per_micro = hand(model, rows, "mile", per_micro=True)
    whole = hand(model, rows, "mile", per_micro=False)
    hf.patch(model, "mile", gamma=1.0)
    assert_same(*train_one_step(model, rows, micro=1, accum=4, tmp_path=tmp_path / "a"), *per_micro)
    assert_same(*train_one_step(model, rows, micro=4, accum=1, tmp_path=tmp_path / "b"), *whole)
    assert abs(per_micro[0] - whole[0]) > 1e-4  # the two definitions differ on these rows


def test_trl_sft_completion_only_loss_falls_on_completions(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(V)}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "t1")),
                                                     pad_token="t0", eos_token="t2")  # fmt: skip
    g = torch.Generator().manual_seed(7)
    data = []
    for prompt_len, completion_len in ((4, 3), (2, 6), (5, 2), (3, 4)):
        ids = torch.randint(3, V, (prompt_len + completion_len,), generator=g).tolist()
        data.append({"input_ids": ids, "completion_mask": [0] * prompt_len + [1] * completion_len})
    rows = []  # what the collator builds: the prompt's labels masked, right padding
    width = max(len(d["input_ids"]) for d in data)
    for d in data:
        n = len(d["input_ids"])
        ids = torch.tensor(d["input_ids"] + [0] * (width - n))
        mask = (torch.arange(width) < n).long()
        keep = torch.tensor(d["completion_mask"] + [0] * (width - n)).bool()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(~keep, IGNORE_INDEX)})
    model = tiny("llama")
    expected = hand(model, rows, "ce", per_micro=False)  # over the completion tokens of the step
    everything = hand(model, [{**r, "labels": r["input_ids"].masked_fill(r["attention_mask"] == 0, IGNORE_INDEX)}
                              for r in rows], "ce", per_micro=False)[0]  # fmt: skip
    assert abs(everything - expected[0]) > 1e-3  # prompts would change it

    hf.patch(model, "ce")

    class SFT(hf.ModelLoss, trl.SFTTrainer):
        pass

    args = dict(config_cls=trl.SFTConfig, completion_only_loss=True, bf16=False, max_length=None)

    def sft_step(micro: int, accum: int, out: str):
        class Trainer(SFT):
            def __init__(self, **kw):
                super().__init__(processing_class=tokenizer, **kw)

        return train_one_step(model, Dataset.from_list(data), micro, accum, tmp_path / out, trainer_cls=Trainer,
                              **dict(args))  # fmt: skip

    assert_same(*sft_step(4, 1, "a"), *expected)
    assert_same(*sft_step(1, 4, "b"), *expected)
    # another loss: MiLe over the completions; TRL's own compute_loss would have trained CE instead
    hf.unpatch(model)
    mile = hand(model, rows, "mile", per_micro=False)
    hf.patch(model, "mile", gamma=1.0)
    assert_same(*sft_step(4, 1, "c"), *mile)
    plain = train_one_step(model, Dataset.from_list(data), 4, 1, tmp_path / "d", trainer_cls=type(
        "Plain", (trl.SFTTrainer,), {"__init__": lambda self, **kw: trl.SFTTrainer.__init__(
            self, processing_class=tokenizer, **kw)}), **dict(args))  # fmt: skip
    assert plain[0] == pytest.approx(expected[0].item(), rel=1e-6)  # CE, not MiLe: hence losslab.hf.ModelLoss
    # patched after TRL added its head, the patch sees TRL's call and says what to do instead of training CE
    hf.unpatch(model)
    targs = trl.SFTConfig(output_dir=str(tmp_path / "e"), max_steps=1, report_to=[], use_cpu=True, **{
        k: v for k, v in args.items() if k != "config_cls"})  # fmt: skip
    late = trl.SFTTrainer(model=model, args=targs, train_dataset=Dataset.from_list(data), processing_class=tokenizer)
    hf.patch(late.model, "mile")
    with pytest.raises(ValueError, match=r"mix in losslab.hf.ModelLoss"):
        late.train()


class Recording(torch.optim.SGD):
    """SGD at learning rate 0 that keeps the gradients of each step."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model.parameters(), lr=0.0)
        self.names = {p: n for n, p in model.named_parameters()}
        self.steps: list[dict[str, torch.Tensor]] = []

    def step(self, closure=None):
        self.steps.append({self.names[p]: p.grad.clone() for g in self.param_groups for p in g["params"]
                           if p.grad is not None})  # fmt: skip
        return super().step(closure)


def grouped(model, groups, loss: str) -> dict[str, torch.Tensor]:
    """Gradients of the formula: ce, the token mean over every group's targets; mile (gamma 1), each group of rows
    normalised by its own weights, the groups averaged."""
    model.zero_grad()
    total = 0.0
    n = sum(int((r["labels"][1:] != IGNORE_INDEX).sum()) for g in groups for r in g)
    for group in groups:
        wl, ws = 0.0, 0.0
        for row in group:
            logits = model(input_ids=row["input_ids"][None], attention_mask=row["attention_mask"][None]).logits[0]
            y = row["labels"][1:]
            valid = y != IGNORE_INDEX
            ce = F.cross_entropy(logits[:-1], y.clamp_min(0), reduction="none")[valid]
            logp = torch.log_softmax(logits[:-1].detach(), -1)[valid]
            w = torch.ones_like(ce) if loss == "ce" else 1.0 - (logp.exp() * logp).sum(-1)
            wl, ws = wl + (w * ce).sum(), ws + w.sum()
        total = total + (wl / n if loss == "ce" else wl / ws / len(groups))
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("loss", ["ce", "mile"])
def test_the_plain_loop_recipe_of_the_docs(loss):
    """docs/hf.md's plain PyTorch loop, run as written there on one step of three micro-batches (rows 0, 1, then
    2 and 3 together): ce accumulates to the large batch, mile to the mean of the micro-batch losses."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "hf.md").read_text()
    recipe = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "for micro_batches in loader" in b)
    rows = records()
    groups = [rows[:1], rows[1:2], rows[2:]]
    model = tiny("llama")
    expected = grouped(model, groups, loss)
    loader = [[{k: torch.stack([r[k] for r in g]) for k in rows[0]} for g in groups]]
    opt = Recording(model)
    exec(recipe.replace('"mile", gamma=1.0', f'"{loss}"'), {"model": model, "loader": loader, "opt": opt})
    (grads,) = opt.steps
    assert grads.keys() == expected.keys()
    for name in grads:
        assert rel_err(grads[name], expected[name]) < 1e-10, name


def test_trainer_accumulation_of_token_normalised_mile_equals_the_large_batch(tmp_path):
    """loss.normalise=tokens: MiLe's weighted sum over the step's target tokens takes num_items_in_batch as CE
    does, so micro-batch 1 x accumulation 4 gives the loss and gradients of micro-batch 4 x accumulation 1."""
    rows = records()
    model = tiny("llama")
    expected = hand(model, rows, "mile", per_micro=False, tokens=True)
    hf.patch(model, "mile", gamma=1.0, normalise="tokens")
    assert model.accepts_loss_kwargs  # Trainer passes num_items_in_batch and does not average the micro-steps
    assert_same(*train_one_step(model, rows, micro=1, accum=4, tmp_path=tmp_path / "a"), *expected)
    assert_same(*train_one_step(model, rows, micro=4, accum=1, tmp_path=tmp_path / "b"), *expected)
