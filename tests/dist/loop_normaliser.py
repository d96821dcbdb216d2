"""Run by tests/test_truth_distributed.py under torchrun with 2 gloo ranks.

One logged optimizer step of the real training loop (``trainer.loop.train``: the run from ``build_run``, DeepSpeed
engine, ZeRO-0, fp32, gradient accumulation 2), fed hand-made fine-tuning batches (``{"tokens", "loss_mask"}``:
each row's prompt carries no loss, so its labels are ignored, -100) with a different number of ignored labels on
each rank and micro-step. The step's logged loss and gradient norm and the gradients handed to the optimizer are
compared with one float64 computation over the whole global batch in this process:

- ce: the mean CE over every valid label of the global batch;
- mile: the official rank-averaged normaliser per micro-step, ``L_{r,m} = a_m * sum(w ce)_{r,m} / n_{r,m}``,
  ``a_m = mean_r(n_{r,m} / sum(w)_{r,m})``, averaged over micro-steps and ranks as DeepSpeed does.

Writes a JSON report (rank 0) to argv[1]; argv[2:] are the tokenizer, the training-shard glob and a directory for
the runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run this checkout's code, never an installed copy

from models import GPT
from trainer import loop
from trainer.config import load_config
from losslab.losses import IGNORE_INDEX
from trainer.run import build_run

GA, B, T = 2, 3, 8
# (rank, micro) -> prompt length of each row: its first tokens carry no loss. Rank 0 ignores 9 labels, rank 1
# one; micro-step 0 ignores 7, micro-step 1 three: every wrong normaliser gives a visibly different value.
PROMPTS = {(0, 0): [5, 0, 3], (0, 1): [0, 4, 0], (1, 0): [2, 0, 0], (1, 1): [0, 0, 0]}


def global_batch(vocab: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [GA, world, B, T+1] and loss_mask [GA, world, B, T+1] (False on prompts), the same on every rank."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab, (GA, world, B, T + 1), generator=g)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    for (r, m), prompts in PROMPTS.items():
        for row, p in enumerate(prompts):
            mask[m, r, row, :p] = False
    return tokens, mask


def truth(model: GPT, tokens: torch.Tensor, mask: torch.Tensor, loss: str, gamma: float) -> dict[str, torch.Tensor]:
    """Per (micro, rank): sum of CE, sum of w * CE, sum of w, valid count — float64, with autograd."""
    GA_, world = tokens.shape[:2]
    terms = {}
    for m in range(GA_):
        for r in range(world):
            inputs, labels = tokens[m, r, :, :-1], tokens[m, r, :, 1:]
            labels = torch.where(mask[m, r, :, 1:], labels, IGNORE_INDEX)  # a prompt token is no target
            logits = model.logits(inputs)  # [B, T, V] float64
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            valid = labels != IGNORE_INDEX
            ce = -logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * valid  # [B, T]
            entropy = -(logp.detach().exp() * logp.detach()).sum(-1)
            w = (1.0 + entropy) ** gamma * valid
            terms[m, r] = {"ce": ce.sum(), "wce": (w * ce).sum(), "w": w.sum(), "n": valid.sum().double()}
    n_all = sum(t["n"] for t in terms.values())
    if loss == "ce":
        value = sum(t["ce"] for t in terms.values()) / n_all
        alternatives = {
            # each rank's own token mean, then averaged over ranks (a local normaliser)
            "mean_of_rank_means": sum(
                sum(terms[m, r]["ce"] for m in range(GA_)) / sum(terms[m, r]["n"] for m in range(GA_))
                for r in range(world)
            )
            / world,
            "mean_of_micro_means": sum(t["ce"] / t["n"] for t in terms.values()) / len(terms),
        }
    else:
        value = 0.0
        for m in range(GA_):
            a = sum(terms[m, r]["n"] / terms[m, r]["w"] for r in range(world)) / world
            value = value + sum(a * terms[m, r]["wce"] / terms[m, r]["n"] for r in range(world))
        value = value / (GA_ * world)
        alternatives = {
            "local_normaliser": sum(t["wce"] / t["w"] for t in terms.values()) / len(terms),
            "single_batch": sum(t["wce"] for t in terms.values()) / sum(t["w"] for t in terms.values()),
        }
    return {"value": value, **{k: v.detach() for k, v in alternatives.items()}}


def one_step(loss: str, argv: list[str], rank: int, world: int) -> dict:
    tokenizer, train_glob, root = argv
    overrides = {
        "run.dir": f"{root}/{loss}",
        "model.preset": "debug",
        "model.n_layers": 1,
        "model.d_model": 32,
        "model.n_heads": 2,
        "model.d_mlp": 64,
        "model.init_std": 0.6,  # far from uniform: ranks' and micro-steps' mean losses differ clearly
        "data.train_files": f"[{train_glob}]",
        "data.tokenizer": tokenizer,
        "data.seq_len": T,
        "train.micro_batch_size": B,
        "train.grad_accum": GA,
        "train.precision": "fp32",
        "train.grad_clip": 1e9,  # never bites: the optimizer sees the raw gradients, and their norm is logged
        "loss.name": loss,
        **({"loss.gamma": 1.5} if loss == "mile" else {}),  # a parameter of mile only (ce has none)
        "wandb.mode": "disabled",
        "eval.tasks": "[]",
        "eval.buckets": False,
        "train.max_steps": 1,
        "train.log_every": 1,
        "checkpoint.at_end": False,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    captured: dict = {}

    def build_run_with_these_batches(cfg):
        """The real run, fed this rank's micro-batches of the hand-made global batch; records the gradients the
        optimizer is handed and the weights it starts from."""
        run = build_run(cfg)
        assert run.shape.grad_accum == GA and run.shape.world_size == world
        tokens, mask = global_batch(run.model.cfg.vocab_size, world)
        mine = iter([{"tokens": tokens[m, rank], "loss_mask": mask[m, rank]} for m in range(GA)])
        run.batches = mine
        captured.update(tokens=tokens, mask=mask, model_cfg=run.model.cfg, grads=[],
                        names=[n for n, _ in run.model.named_parameters()],
                        start={k: v.detach().double().clone() for k, v in run.model.state_dict().items()})  # fmt: skip
        params = list(run.model.parameters())
        real_step = run.optimizer.step

        def step_and_record(*args, **kwargs):
            captured["grads"].append(
                [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
            )
            return real_step(*args, **kwargs)

        run.optimizer.step = step_and_record
        return run

    loop.build_run = build_run_with_these_batches
    loop.train(cfg)  # one step, logged
    dist.barrier()  # rank 0 has written metrics.jsonl
    assert len(captured["grads"]) == 1, "the optimizer stepped once"
    rows = [json.loads(x) for x in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["step"] == 1 and "loss" in r)  # what the user reads

    tokens, mask = captured["tokens"], captured["mask"]
    reference = GPT(captured["model_cfg"]).double()
    reference.load_state_dict(captured["start"])
    names, seen = captured["names"], captured["grads"]
    ref = truth(reference, tokens, mask, loss, gamma=1.5)
    grads = torch.autograd.grad(ref["value"], list(reference.parameters()), allow_unused=True)
    grad_err, grad_scale = 0.0, 0.0
    for name, got, want, p in zip(names, seen[0], grads, reference.parameters(), strict=True):
        want = torch.zeros_like(p) if want is None else want
        grad_err = max(grad_err, (got.double() - want).abs().max().item())
        grad_scale = max(grad_scale, want.abs().max().item())
        assert got.shape == want.shape, name
    return {
        "loss": row["loss"],
        "grad_norm": row.get("grad_norm"),
        "ref_grad_norm": sum(g.square().sum() for g in grads if g is not None).sqrt().item(),
        "ref": ref["value"].item(),
        "alternatives": {k: v.item() for k, v in ref.items() if k != "value"},
        "grad_err": grad_err,
        "grad_scale": grad_scale,
        "valid_tokens": mask[..., 1:].sum().item(),
    }


def main() -> None:
    from trainer.engine import init_distributed

    rank, world = init_distributed()
    report = {loss: one_step(loss, sys.argv[2:], rank, world) for loss in ("ce", "mile")}
    gathered = [None] * world
    dist.all_gather_object(gathered, report)
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(gathered))
    dist.barrier()


if __name__ == "__main__":
    from trainer.engine import exit_process

    main()
    exit_process(0)  # as scripts/train.py ends: no C++ teardown, where a gloo rank can abort after finishing
