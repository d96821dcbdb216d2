"""Run by tests/test_losses_distributed.py under torchrun with 2 gloo ranks.

Each rank holds half of a batch with a different number of ignored labels, computes the MiLe / focal / PDL
loss, and checks it against the official formula with the rank-averaged normaliser
``a = mean_r(n_r / sum_r w)``, ``L_r = a * sum_r(w * ce) / n_r`` — values and gradients, in float64.
Writes a JSON report to the path given as argv[1] (rank 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run this checkout's code, never an installed copy

from losslab.losses import IGNORE_INDEX, build_loss


def weights(name: str, entropy, ce, y, counts):
    if name == "mile":
        return (1 + entropy) ** 1.5
    if name == "focal":
        return (1 - torch.exp(-ce.detach())) ** 1.5
    return (counts.double() + 1.0 + 1e-7) ** -0.8 * 1.0  # pdl before its (loss-invariant) rescale


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    N, D, V = 40, 12, 30
    hidden_all = torch.randn(world * N, D, generator=g, dtype=torch.float64)
    weight0 = torch.randn(V, D, generator=g, dtype=torch.float64)
    labels_all = torch.randint(0, V, (world * N,), generator=g)
    labels_all[: N // 2] = IGNORE_INDEX  # rank 0 has 20 ignored positions, rank 1 none
    counts = torch.randint(0, 100, (V,), generator=g)
    sl = slice(rank * N, (rank + 1) * N)
    report = {}
    for name in ("mile", "focal", "pdl"):
        for fused in ("true", "false"):
            h = hidden_all[sl].clone().requires_grad_()
            w = weight0.clone().requires_grad_()
            params = {"alpha": 0.8} if name == "pdl" else {"gamma": 1.5}  # each loss gets its own parameter
            cfg = {"name": name, "fused": fused, "chunk_size": 7, **params}
            out = build_loss(cfg, token_counts=counts)(h, w, labels_all[sl])
            gh, gw = torch.autograd.grad(out.loss, (h, w))

            # independent reference: every rank's terms computed here from the full batch
            h_ref = hidden_all.clone().requires_grad_()
            w_ref = weight0.clone().requires_grad_()
            logp = torch.log_softmax(h_ref @ w_ref.T, dim=-1)
            valid = labels_all != IGNORE_INDEX
            y = labels_all.clamp(min=0)
            ce = -logp[torch.arange(len(y)), y] * valid
            entropy = -(logp.detach().exp() * logp.detach()).sum(-1)
            wt = weights(name, entropy, ce, y, counts)
            wt = (wt[y] if name == "pdl" else wt) * valid
            per_rank = [slice(r * N, (r + 1) * N) for r in range(world)]
            a = sum(valid[s].sum() / wt[s].sum() for s in per_rank) / world
            mine = per_rank[rank]
            ref = a * (wt[mine] * ce[mine]).sum() / valid[mine].sum()
            rh, rw = torch.autograd.grad(ref, (h_ref, w_ref))
            report[f"{name}/{fused}"] = {
                "loss": out.loss.item(),
                "ref": ref.item(),
                "grad_h_err": (gh - rh[mine]).abs().max().item(),
                "grad_w_err": (gw - rw).abs().max().item(),
                "local_only": (wt[mine] * ce[mine]).sum().item() / wt[mine].sum().item(),
            }
    gathered = [None] * world
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(gathered, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
