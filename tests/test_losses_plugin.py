"""The plug-in loss of docs/losses.md, taken from the document as a user would copy it, named by
``loss.name = "my_losses:Poly1"``, against a float64 reference."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from losslab.losses import IGNORE_INDEX, LossConfig, build_loss, loss_tag
from tests.test_losses import make_inputs, rel_err

DOC = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    example = next(b for b in blocks if "class Poly1(TokenWeighting)" in b)
    (tmp_path / "my_losses.py").write_text(example)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_losses"
    sys.modules.pop("my_losses", None)


def poly1_reference(hidden, weight, labels, epsilon, smoothing=0.0):
    z = hidden.double() @ weight.double().T
    logp = torch.log_softmax(z, -1)
    valid = labels != IGNORE_INDEX
    ce = -logp[torch.arange(len(labels)), labels.clamp(min=0)]
    ce_loss = (1 - smoothing) * ce - smoothing * logp.mean(-1)
    return ((ce_loss + epsilon * (1 - torch.exp(-ce))) * valid).sum() / valid.sum()


@pytest.mark.parametrize("fused", ["true", "false"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_documented_plugin_loss(plugin_module, fused, smoothing):
    hidden, weight, labels, _ = make_inputs(torch.float64, ignore=True)
    cfg = {"name": f"{plugin_module}:Poly1", "epsilon": 2.0, "fused": fused, "chunk_size": 17,
           "label_smoothing": smoothing}  # fmt: skip
    out = build_loss(cfg)(hidden, weight, labels)
    gh, gw = torch.autograd.grad(out.loss, (hidden, weight))
    ref = poly1_reference(hidden, weight, labels, 2.0, smoothing)
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    assert abs(out.loss.item() - ref.item()) / ref.item() < 1e-6
    assert rel_err(gh, rh) < 1e-6 and rel_err(gw, rw) < 1e-6


def test_a_plugin_name_that_cannot_be_used_fails_clearly(plugin_module):
    with pytest.raises(ValueError, match="cannot be imported: ModuleNotFoundError"):
        build_loss({"name": "no_such_module:Poly1"})
    with pytest.raises(ValueError, match="cannot be imported: AttributeError"):
        build_loss({"name": f"{plugin_module}:Poly2"})
    with pytest.raises(ValueError, match="is not a TokenWeighting subclass"):
        build_loss({"name": f"{plugin_module}:Rows"})
    with pytest.raises(ValueError, match="unknown loss 'poly1'"):
        build_loss({"name": "poly1"})
    # its declared parameter is checked like a built-in loss's, and named in runs
    with pytest.raises(ValueError, match=r"loss.epsilon='x' is not a number"):
        build_loss(f"{plugin_module}:Poly1", epsilon="x")
    with pytest.raises(ValueError, match=rf"loss.gamma=2 is a parameter of .*not of loss.name={plugin_module}:Poly1"):
        build_loss(f"{plugin_module}:Poly1", gamma=2)
    assert loss_tag(LossConfig(f"{plugin_module}:Poly1", epsilon=0.5)) == f"{plugin_module}:Poly1-eps0.5"
