"""The fused loss checks a row kernel against the torch kernel before trusting it, and falls back to torch with
one warning line when the kernel raises or disagrees.

The broken kernels below are real Triton kernels, run in Triton's interpreter on CPU tensors (conftest.py sets
``TRITON_INTERPRET=1`` without a GPU), chosen through the public API as plug-ins: ``loss.kernel =
"tests.test_losses_selfcheck:Class"``. Each class is used by one test only, because verdicts are cached per
process (that caching is what the tests check: one warning, however many losses are built).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is installed with the dev extras on Linux x86-64")
import triton.language as tl  # noqa: E402

from losslab.losses import IGNORE_INDEX, LossConfig, build_loss  # noqa: E402
from losslab.losses.kernels import check, resolve, verdicts  # noqa: E402
from losslab.losses.paths import slow_low_precision_cpu  # noqa: E402
from losslab.losses.rows import TritonRows  # noqa: E402
from losslab.losses.triton_rows import row_grad_, row_stats  # noqa: E402
from tests.test_losses import LOSS_PARAMS, make_inputs, naive_loss, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEV = (
    torch.device("cuda", torch.cuda.current_device()) if DEVICE == "cuda" else torch.device("cpu")
)  # as verdicts name it
HERE = __name__  # "tests.test_losses_selfcheck"


@triton.jit
def _bad_tile_kernel(z_ptr, V, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)  # BLOCK_V = 3: Triton refuses a range that is not a power of 2
    tl.store(z_ptr + cols, tl.load(z_ptr + cols, mask=cols < V), mask=cols < V)


class RaisingKernel(TritonRows):
    """A kernel that does not compile: the row statistics launch a malformed Triton kernel."""

    @staticmethod
    def stats(z, y, valid, ce_out, ent_out, mz_out=None, entropy_clamp=0.0):
        _bad_tile_kernel[(1,)](z, z.shape[1], BLOCK_V=3)
        return TritonRows.stats(z, y, valid, ce_out, ent_out, mz_out, entropy_clamp)


class NoOneHotKernel(TritonRows):
    """Runs, with the right loss, but wrong gradients: the one-hot term is lost (every label read as ignored)."""

    @staticmethod
    def grad(z, y, valid, lse, coefs, _state):
        return row_grad_(z, torch.full_like(y, IGNORE_INDEX), lse, coefs.a, coefs.b, coefs.u)


class HalfEntropyKernel(TritonRows):
    """Runs, but the entropy it reports is off by a factor (so MiLe's weights, loss and gradients are wrong)."""

    @staticmethod
    def stats(z, y, valid, ce_out, ent_out, mz_out=None, entropy_clamp=0.0):
        lse, _, ent = row_stats(z, y, ce=ce_out, ent=ent_out, mz=mz_out, entropy_clamp=entropy_clamp)
        ent.mul_(0.5)
        return lse, None


class IgnoresClampKernel(TritonRows):
    """Right unless asked for the official clamped entropy, which it silently does not compute."""

    @staticmethod
    def stats(z, y, valid, ce_out, ent_out, mz_out=None, entropy_clamp=0.0):
        lse, _, _ = row_stats(z, y, ce=ce_out, ent=ent_out, mz=mz_out)
        return lse, None


class TritonUnderInferenceMode(TritonRows):
    """The real kernels under another name (a verdict of its own), first used under torch.inference_mode."""


def fused_vs_float64(kernel: str, dtype=torch.float32, name="mile", autocast=False):
    hidden, weight, labels, counts = make_inputs(dtype, ignore=True)
    hidden = hidden.detach().to(DEVICE).requires_grad_()
    weight = weight.detach().to(DEVICE).requires_grad_()
    labels = labels.to(DEVICE)
    cfg = LossConfig(name=name, fused="true", kernel=kernel, chunk_size=40, **LOSS_PARAMS[name])
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = build_loss(cfg, counts)(hidden, weight, labels)
    gh, gw = torch.autograd.grad(out.loss, (hidden, weight))
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = naive_loss(h64, w64, labels, cfg, counts.to(DEVICE))
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    return abs(out.loss.item() - ref.item()) / abs(ref.item()), rel_err(gh, rh), rel_err(gw, rw)


def warning_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "cls,reason",
    [
        (RaisingKernel, "Error"),  # the exception's type and first line
        (NoOneHotKernel, "mismatch against torch: grad_h rel err"),
        (HalfEntropyKernel, "mismatch against torch: loss rel err"),
        (IgnoresClampKernel, "mismatch against torch: loss (clamped entropy) rel err"),
    ],
)
def test_a_failing_kernel_falls_back_to_torch_with_one_warning(capsys, cls, reason):
    kernel = f"{HERE}:{cls.__name__}"
    errs = fused_vs_float64(kernel)
    assert max(errs) < 1e-5, errs  # the torch kernel ran: the fp32 result is right
    lines = warning_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: loss kernel {kernel} failed its self-check on {DEV} in float32 (")
    assert reason in lines[0] and lines[0].endswith("the fused loss uses the torch kernel instead")
    # the verdict is cached per (kernel, device, dtype): more losses, more steps, no second check or warning
    for name in ("ce", "focal_lin"):
        assert max(fused_vs_float64(kernel, name=name)) < 1e-5
    assert warning_lines(capsys) == []
    verdict = verdicts()[f"{kernel} on {DEV} float32"]
    assert not verdict.ok and reason in verdict.reason
    # a new dtype is a new check (and warns once more); asked for directly, as the fused path on a CPU without
    # native bf16 runs bf16 inputs in fp32 (paths.slow_low_precision_cpu) and would not ask
    assert not check(resolve(kernel), torch.device(DEVICE), torch.bfloat16).ok
    assert len(warning_lines(capsys)) == 1


def test_the_triton_kernels_pass_their_self_check(capsys):
    """The real kernels pass in fp32 and in bf16 (under autocast: the check is keyed on the logits' dtype)."""
    errs = fused_vs_float64("triton")
    assert max(errs) < 1e-5, errs
    errs = fused_vs_float64("triton", autocast=True)
    assert max(errs) < 3e-2, errs
    if slow_low_precision_cpu(torch.bfloat16) and DEVICE == "cpu":  # autocast ran the head in fp32: ask directly
        assert check(TritonRows, torch.device(DEVICE), torch.bfloat16).ok
    assert warning_lines(capsys) == []
    found = {k: v for k, v in verdicts().items() if k.startswith("losslab.losses.rows:TritonRows on ")}
    assert {f"losslab.losses.rows:TritonRows on {DEV} {dt}" for dt in ("float32", "bfloat16")} <= set(found)
    assert all(v.ok for v in found.values()), found


def test_a_first_use_under_inference_mode_checks_and_trusts_a_good_kernel(capsys):
    """Evaluation can be the first use (scripts/evaluate.py, in-loop eval after a resume): a check that failed
    because of the caller's mode, not the kernel, would disable the kernel for the whole process."""
    hidden, weight, labels, _ = make_inputs(torch.float32, ignore=True)
    cfg = LossConfig(name="mile", fused="true", kernel=f"{HERE}:TritonUnderInferenceMode", chunk_size=40)
    with torch.inference_mode():
        out = build_loss(cfg)(hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE))
    ref = build_loss(LossConfig(name="mile", kernel="torch"))(hidden, weight, labels)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5 * abs(ref.loss.item())
    assert warning_lines(capsys) == []
    assert verdicts()[f"{HERE}:TritonUnderInferenceMode on {DEV} float32"].ok


@pytest.mark.parametrize(
    "kernel,message",
    [
        ("cuda", "loss.kernel must be auto, torch, triton or 'package.module:Class'"),
        ("tests.no_such_module:Rows", "cannot be imported: ModuleNotFoundError"),
        (f"{HERE}:NoSuchClass", "cannot be imported: AttributeError"),
        (f"{HERE}:fused_vs_float64", "is not a row kernel: it lacks softmax_state, optional_entropy, stats"),
    ],
)
def test_a_kernel_that_cannot_run_is_refused_when_the_loss_is_built(kernel, message):
    with pytest.raises(ValueError, match=r"loss\.kernel") as info:
        build_loss({"name": "ce", "kernel": kernel})
    assert message in str(info.value)
