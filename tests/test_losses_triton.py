"""The Triton row kernels against the torch path and a float64 reference.

On a machine without a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py) on CPU
tensors; with a GPU, compiled, on CUDA.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is installed with the dev extras on Linux x86-64")

from losslab.losses import LossConfig, build_loss  # noqa: E402
from tests.test_losses import FUSED_CASES, make_inputs, make_token_inputs, naive_loss, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def rows_module():
    # conftest.py selects the interpreter (TRITON_INTERPRET=1) before triton is imported when there is no GPU
    import losslab.losses.triton_rows as mod

    return mod


@pytest.mark.parametrize("V", [37, 300, 5000])  # one partial block, several blocks
def test_row_kernels_match_torch(rows_module, V):
    g = torch.Generator().manual_seed(V)
    z = (torch.randn(9, V, generator=g) * 4).to(DEVICE)
    y = torch.randint(0, V, (9,), generator=g).to(DEVICE)
    y[2] = -100
    ce_out = torch.full((12,), 7.0, device=DEVICE)
    lse, ce, ent = rows_module.row_stats(z, y, ce=ce_out[3:])  # written into a slice of a larger buffer
    assert ce.data_ptr() == ce_out[3:].data_ptr() and (ce_out[:3] == 7).all()
    z64 = z.double()
    logp = torch.log_softmax(z64, -1)
    assert torch.allclose(lse.double(), torch.logsumexp(z64, -1), rtol=1e-6)
    assert torch.allclose(ent.double(), -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5)
    valid = y != -100
    assert torch.allclose(ce.double()[valid], -logp[valid, y[valid]], rtol=1e-5) and ce[2] == 0
    coef = torch.rand(9, generator=g).to(DEVICE)
    coef[2] = 0
    grad = rows_module.row_grad_(z.clone(), y, lse, coef)
    onehot = torch.zeros_like(z64)
    onehot[valid, y[valid]] = 1
    expected = coef.double()[:, None] * (logp.exp() - onehot)
    assert torch.allclose(grad.double(), expected, atol=1e-6)


@pytest.mark.parametrize("case", [c for c, _ in FUSED_CASES])
@pytest.mark.parametrize("ignore", [False, True])
def test_fused_triton_loss_matches_reference(rows_module, case, ignore):
    hidden, weight, labels, counts = make_inputs(torch.float32, ignore)
    hidden = hidden.detach().to(DEVICE).requires_grad_()
    weight = weight.detach().to(DEVICE).requires_grad_()
    labels = labels.to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in make_token_inputs().items()}
    cfg = LossConfig(**dict(FUSED_CASES)[case], fused="true", kernel="triton", chunk_size=40)
    out = build_loss(cfg, counts)(hidden, weight, labels, token_inputs=inputs)
    gh, gw = torch.autograd.grad(out.loss, (hidden, weight))
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = naive_loss(h64, w64, labels, cfg, counts.to(DEVICE), inputs)
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    assert abs(out.loss.item() - ref.item()) / abs(ref.item()) < 1e-5
    assert rel_err(gh, rh) < 1e-5 and rel_err(gw, rw) < 1e-5


def test_row_kernels_with_every_gradient_term(rows_module):
    """a * softmax - b * onehot - u, and the mean logit, against float64."""
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(7, 5000, generator=g) * 3).to(DEVICE)
    y = torch.randint(0, 5000, (7,), generator=g).to(DEVICE)
    y[4] = -100
    mz = torch.empty(7, device=DEVICE)
    lse, _, _ = rows_module.row_stats(z, y, mz=mz)
    assert torch.allclose(mz.double(), z.double().mean(-1), atol=1e-5)
    a, b, u = (torch.rand(7, generator=g).to(DEVICE) for _ in range(3))
    grad = rows_module.row_grad_(z.clone(), y, lse, a, b, u)
    p = torch.softmax(z.double(), -1)
    onehot = torch.zeros_like(p)
    valid = y != -100
    onehot[valid, y[valid]] = 1
    expected = a.double()[:, None] * p - b.double()[:, None] * onehot - u.double()[:, None]
    assert torch.allclose(grad.double(), expected, atol=1e-6)
