"""What only a GPU can check: the compiled Triton loss kernels at a real vocabulary in bf16, and training through
DeepSpeed on CUDA (NCCL, bf16, the fused loss, ZeRO-3 with the optimizer partly on the CPU — the 6.7B route).

Skipped without CUDA; ``scripts/gpu/session.sh tests`` runs them on the GPU machine."""

from __future__ import annotations

import json

import pytest
import torch

from losslab.losses import LossConfig, build_loss
from tests.test_distributed import common, launch, losses
from tests.test_losses import FUSED_CASES, naive_loss, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("case", [c for c, _ in FUSED_CASES])
def test_fused_bf16_loss_at_a_real_vocabulary(case):
    n, d, v = 2048, 256, 50304
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::7] = -100
    counts = torch.randint(0, 1000, (v,), generator=torch.Generator().manual_seed(0))
    # rho1: reference losses far apart, so that bf16 and float64 keep the same tokens (another kept set would be
    # another loss, not a rounding error)
    ref_ce = -100.0 * torch.randperm(n, device="cuda", generator=g).float()
    inputs = {"weight": torch.rand(n, device="cuda", generator=g) * 2, "ref_ce": ref_ce}
    cfg = LossConfig(**dict(FUSED_CASES)[case], fused="true")  # kernel auto: Triton on CUDA
    out = build_loss(cfg, counts)(hidden, weight, labels, token_inputs=inputs)
    gh, gw = torch.autograd.grad(out.loss, (hidden, weight))
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = naive_loss(h64, w64, labels, cfg, counts.cuda(), inputs)
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    assert abs(out.loss.item() - ref.item()) / abs(ref.item()) < 2e-3
    assert rel_err(gh, rh) < 2e-2 and rel_err(gw, rw) < 2e-2  # bf16 gradients


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_triton_kernels_pass_their_self_check_on_the_gpu(dtype):
    """Else the fused loss silently runs the torch kernel (with one warning) and the test above measures that."""
    from losslab.losses.kernels import check
    from losslab.losses.rows import TritonRows

    verdict = check(TritonRows, torch.device("cuda"), dtype)
    assert verdict.ok, verdict.reason


def test_training_on_the_gpu_through_deepspeed(corpus, tmp_path):
    run_dir = tmp_path / "gpu"
    extra = {"train.max_steps": 30, "train.log_every": 10, "train.precision": "bf16", "distributed.zero_stage": 2}
    proc = launch(1, common(corpus, run_dir, **extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, rows
    assert rows[-1]["perf/gpu_peak_gib"] > 0


def test_zero3_with_the_optimizer_partly_offloaded_matches_zero0_on_the_gpu(corpus, tmp_path):
    runs = {}
    for name, extra in {
        "zero0": {},
        "offload": {"distributed.preset": "zero3_offload", "distributed.offload_ratio": 0.5},
    }.items():
        proc = launch(1, common(corpus, tmp_path / name, **{"train.precision": "bf16", **extra}), timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = losses(tmp_path / name)
    for step, loss in runs["zero0"].items():  # bf16 weights, fp32 masters: the same trajectory to bf16 accuracy
        assert abs(runs["offload"][step] - loss) < 2e-2 * abs(loss), (step, runs["offload"][step], loss)
