"""The fused path's structure: every row kernel satisfies the ``RowKernel`` protocol (the built-in ones and a
plug-in written against the protocol alone), an object that does not is refused by name, and the modules of
``losslab/losses`` import one another one way only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import losslab.losses
from losslab.losses import LossConfig, build_loss
from losslab.losses.blocks import FusedOptions
from losslab.losses.kernels import resolve, verdicts
from losslab.losses.rows import GradKernel, RowKernel, TorchRows, TritonRows, missing
from tests.test_losses import LOSS_PARAMS, make_inputs, naive_loss, rel_err

HERE = __name__  # "tests.test_losses_rows"


class LogSoftmaxRows:
    """A plug-in kernel with no base class: its state is the softmax (no ``grad``), and it always writes the
    entropy (``optional_entropy`` False), from log_softmax rather than the torch kernel's p_y."""

    softmax_state = True
    optional_entropy = False
    calls = 0

    @staticmethod
    def stats(z, y, valid, ce_out, ent_out, mz_out=None, entropy_clamp=0.0):
        LogSoftmaxRows.calls += 1
        zf = z.to(ce_out.dtype)  # [c, V]
        logp = torch.log_softmax(zf, dim=-1)  # [c, V]
        p = logp.exp()  # [c, V]
        ce_out.copy_(-logp.gather(1, y.clamp_min(0)[:, None]).squeeze(1)).masked_fill_(~valid, 0.0)
        pc = p.clamp_min(entropy_clamp) if entropy_clamp else p  # [c, V]
        ent_out.copy_(-(pc * pc.log()).sum(-1))
        if mz_out is not None:
            mz_out.copy_(zf.mean(-1))
        return torch.logsumexp(zf, dim=-1), p


class NoFlags:
    """stats and grad, but neither flag declared."""

    @staticmethod
    def stats(z, y, valid, ce_out, ent_out, mz_out=None, entropy_clamp=0.0): ...

    @staticmethod
    def grad(z, y, valid, lse, coefs, state): ...


class NoGrad(NoFlags):
    """Flags declared, but its state is not the softmax and it has no grad."""

    softmax_state = False
    optional_entropy = True
    grad = None


def test_every_kernel_satisfies_the_protocol():
    """The built-in kernels, as the fused path is handed them (the classes), and a plug-in without a base."""
    for kernel in (TorchRows, TritonRows, LogSoftmaxRows, resolve(f"{HERE}:LogSoftmaxRows")):
        assert isinstance(kernel, RowKernel) and missing(kernel) == [], kernel
    assert TorchRows.softmax_state and not isinstance(TorchRows, GradKernel)  # the gradients come from p
    assert isinstance(TritonRows, GradKernel) and not TritonRows.softmax_state  # it forms dl/dz itself
    assert not isinstance(NoFlags, RowKernel) and missing(NoFlags) == ["softmax_state", "optional_entropy"]
    assert isinstance(NoGrad, RowKernel) and not isinstance(NoGrad, GradKernel)


@pytest.mark.parametrize(
    "cls,lacks", [("NoFlags", "softmax_state, optional_entropy"), ("NoGrad", "grad (or softmax_state = True)")]
)
def test_a_kernel_that_lacks_a_member_is_refused_by_name(cls, lacks):
    with pytest.raises(ValueError, match=r"loss\.kernel") as info:
        build_loss({"name": "ce", "kernel": f"{HERE}:{cls}"})
    assert f"is not a row kernel: it lacks {lacks} " in str(info.value)


@pytest.mark.parametrize("name,modifiers", [("mile", {}), ("mile", {"label_smoothing": 0.1, "z_loss": 0.02}),
                                            ("rho1", {}), ("mile", {"entropy_clamp": 1e-3})])  # fmt: skip
def test_a_plugin_softmax_kernel_runs_and_matches_float64(capsys, name, modifiers):
    """It passes its self-check and runs (one pass, two passes, clamped entropy): the fused path asks it for
    the entropy, since it cannot skip it, rather than taking the entropy from the gradient's matmul."""
    hidden, weight, labels, counts = make_inputs(torch.float32, ignore=True)
    inputs = {"ref_ce": torch.rand(len(labels), generator=torch.Generator().manual_seed(3)) * 5}
    cfg = LossConfig(name=name, fused="true", kernel=f"{HERE}:LogSoftmaxRows", chunk_size=17, **LOSS_PARAMS[name],
                     **modifiers)  # fmt: skip
    calls = LogSoftmaxRows.calls
    out = build_loss(cfg, counts)(hidden, weight, labels, token_inputs=inputs)
    gh, gw = torch.autograd.grad(out.loss, (hidden, weight))
    assert LogSoftmaxRows.calls > calls and verdicts()[f"{HERE}:LogSoftmaxRows on cpu float32"].ok
    assert "warning" not in capsys.readouterr().err
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = naive_loss(h64, w64, labels, cfg, counts, inputs)
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    errs = (abs(out.loss.item() - ref.item()) / abs(ref.item()), rel_err(gh, rh), rel_err(gw, rw))
    assert max(errs) < 1e-5, errs


def test_a_callable_z_loss_weight_needs_the_two_pass_mode():
    with pytest.raises(ValueError, match="two_pass"):
        FusedOptions(z_lambda=lambda w: w.sum())
    FusedOptions(z_lambda=lambda w: w.sum(), two_pass=True)


def _imports(path: Path, package: str) -> set[str]:
    """The sibling modules ``path`` imports anywhere in it (a function-level import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == package:
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith(package + ".")}
    return found


def test_the_loss_modules_import_one_another_one_way():
    """No cycle among the modules of losslab/losses (the package's ``__init__``, which imports its public
    names, aside), lazy imports included: a cycle broken by a lazy import is still a cycle."""
    pkg = Path(losslab.losses.__file__).parent
    graph = {p.stem: _imports(p, "losslab.losses") for p in pkg.glob("*.py") if p.stem != "__init__"}
    assert {"rows", "grads", "blocks", "kernels", "paths"} <= set(graph)
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "open":
            raise AssertionError(f"import cycle: {' -> '.join([*trail, module])}")
        if module not in state:
            state[module] = "open"
            for dep in sorted(graph.get(module, ())):
                visit(dep, [*trail, module])
            state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
    assert "paths" not in graph["kernels"] and "kernels" in graph["paths"]
