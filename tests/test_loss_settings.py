"""Each loss owns its settings (issue #29): one declaration per parameter, from which the config section, its
checks, run names, W&B columns, ``--list`` and docs/losses.md's tables are derived; a setting of a loss that is
not selected is one line and exit 2 before training (issue #33)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from losslab.losses import LOSSES, MODIFIERS, LossConfig, Param, build_loss, loss_columns, loss_tag
from tests.test_train import REPO, clean_env
from trainer.callbacks import run_names, wandb_config
from trainer.config import ConfigError, load_config, to_yaml

DEMO = REPO / "configs" / "experiments" / "demo.yaml"


def other_value(p: Param) -> object:
    """A valid value of ``p`` other than its default."""
    if p.kind is bool:
        return not p.default
    if p.choices:
        return next(c for c in p.choices if c != p.default)
    for candidate in (p.default * 0.5, p.default + 0.25, 0.5, 2.0, 1e-3, 3):
        try:
            value = p.check(candidate)
        except ValueError:
            continue
        if value != p.default:
            return value
    raise AssertionError(f"no other valid value for {p.name}")


def test_docs_tables_are_generated_from_the_declarations():
    from scripts.loss_table import main

    assert main(["--check"]) == 0, "docs/losses.md is out of date: run python scripts/loss_table.py"


def test_every_parameter_of_every_loss_changes_the_run_name_and_the_wandb_job_type():
    """Two runs that differ in any one loss parameter (or modifier that changes the math) never share a name —
    the Rho-1 runs at keep_ratio 0.6 and 0.8 did."""
    cases = [(name, p) for name, cls in sorted(LOSSES.items()) for p in cls.params]
    cases += [("mile", p) for p in MODIFIERS if p.in_name and p.name != "count_ignored"]
    cases += [(name, p) for name in ("mile", "focal") for p in MODIFIERS if p.name == "count_ignored"]
    assert {p.name for _, p in cases} >= {"keep_ratio", "gamma", "alpha", "eps", "smoothing", "max_weight", "z_loss"}
    for name, p in cases:
        base = load_config(DEMO, [f"loss.name={name}"])
        changed = load_config(DEMO, [f"loss.name={name}", f"loss.{p.name}={other_value(p)}"])
        assert run_names(base)[0] != run_names(changed)[0], (name, p.name)
        tags = [wandb_config(c, {}, "g")["loss/tag"] for c in (base, changed)]  # the W&B job type
        assert tags[0] != tags[1], (name, p.name)
    rho1 = [run_names(load_config(DEMO, ["loss.name=rho1", f"loss.keep_ratio={k}"]))[0] for k in (0.6, 0.8)]
    assert rho1 == ["tiny-neox-rho1-keep0.6-s0", "tiny-neox-rho1-keep0.8-s0"]


def test_wandb_columns_are_the_declared_parameters():
    cols = loss_columns(load_config(DEMO, ["loss.name=pdl", "loss.alpha=0.5"]).loss)
    assert cols["loss/name"] == "pdl" and cols["loss/tag"] == "pdl-a0.5"
    assert {k for k in cols if k not in ("loss/name", "loss/tag")} == {
        f"loss/{p.name}" for p in (*LOSSES["pdl"].params, *MODIFIERS) if p.in_name
    }
    assert cols["loss/alpha"] == 0.5 and cols["loss/smoothing"] == 1.0  # defaults filled in


def test_a_parameter_of_a_loss_that_is_not_selected_stops_train_py_before_training(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", str(DEMO), "loss.name=ce", "loss.gamma=3", f"run.dir={run_dir}"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "config error: override 'loss.gamma=3': loss.gamma=3 is a parameter of focal, focal_lin, mile, not of "
        "loss.name=ce (it has no parameters): remove it or choose one of those losses"
    ]
    assert not run_dir.exists()  # nothing was set up


def test_the_error_names_the_file_that_set_the_parameter(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("includes: [loss/mile.yaml]\nloss:\n  alpha: 0.5\n")
    with pytest.raises(ConfigError, match=rf"^{exp}: loss.alpha=0.5 is a parameter of pdl, not of loss.name=mile"):
        load_config(exp)
    for overrides, key in ((["loss.name=ce", "loss.count_ignored=true"], "count_ignored"),
                           (["loss.name=ce", "loss.entropy_clamp=1e-8"], "entropy_clamp"),
                           (["loss.reference=/x"], "reference"), (["loss.keep_ratio=0"], "keep_ratio"),
                           (["loss.gamma=abc"], "gamma"), (["loss.fused=maybe"], "fused")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"override '{overrides[-1]}': loss.{key}"):
            load_config(DEMO, overrides)


def test_choosing_another_loss_in_a_later_layer_starts_it_from_its_defaults(tmp_path):
    assert load_config(DEMO).loss.params == {"gamma": 1.0}  # from configs/loss/mile.yaml
    pdl = load_config(DEMO, ["loss.name=pdl"]).loss  # demo's gamma belonged to mile: dropped
    assert pdl.params == {"alpha": 1.0, "eps": 1e-7, "smoothing": 1.0, "max_weight": 0.0}
    assert load_config(DEMO, ["loss.alpha=0.5", "loss.name=pdl"]).loss.alpha == 0.5  # the command line is one layer
    focal = load_config(DEMO, ["loss.name=focal", "loss.gamma=2", "loss.z_loss=1e-4"]).loss
    assert (focal.gamma, focal.z_loss) == (2.0, 1e-4)
    # the same loss named again keeps what was set below
    exp = tmp_path / "exp.yaml"
    exp.write_text("includes: [loss/pdl.yaml]\nloss:\n  alpha: 0.5\n")
    assert load_config(exp, ["loss.name=pdl"]).loss.alpha == 0.5
    # the resolved config, written flat, loads back to itself
    cfg = load_config(DEMO, ["loss.name=rho1", "loss.keep_ratio=0.8"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    assert "  keep_ratio: 0.8\n" in saved.read_text() and "  params:" not in saved.read_text()
    assert load_config(saved).loss == cfg.loss


def test_a_config_saved_before_losses_declared_their_parameters_still_loads(tmp_path):
    """Old run directories hold every loss's keys under loss (and a plug-in's under options): read as that
    version ran them, keeping only what the selected loss read."""
    old = {"name": "pdl", "gamma": 1.0, "focal_alpha": 1.0, "alpha": 0.5, "eps": 1e-7, "smoothing": 0.0,
           "max_weight": 0.0, "keep_ratio": 0.6, "reference": "", "label_smoothing": 0.0, "z_loss": 0.0,
           "options": {}, "entropy_clamp": 0.0, "log_entropy": False, "count_ignored": False, "fused": "auto",
           "kernel": "auto", "chunk_size": 0}  # fmt: skip
    assert loss_tag(old) == "pdl-a0.5-k0"
    saved = tmp_path / "config.yaml"
    saved.write_text("loss:\n" + "".join(f"  {k}: {v!r}\n" for k, v in old.items()))
    loss = load_config(saved).loss
    assert loss.params == {"alpha": 0.5, "eps": 1e-7, "smoothing": 0.0, "max_weight": 0.0}


def test_build_loss_takes_a_name_and_keywords_a_mapping_or_a_config():
    a = build_loss("mile", gamma=2.0, z_loss=1e-4).cfg
    b = build_loss({"name": "mile", "gamma": 2.0, "z_loss": 1e-4}).cfg
    c = build_loss(LossConfig("mile", params={"gamma": 2.0}, z_loss=1e-4)).cfg
    d = build_loss(LossConfig("mile"), gamma=2.0, z_loss=1e-4).cfg  # keywords add to a config
    assert a == b == c == d and a.params == {"gamma": 2.0}
    with pytest.raises(ValueError, match=r"loss.gamma=3 is a parameter of focal, focal_lin, mile, not of loss.name=ce"):
        build_loss("ce", gamma=3)


def test_list_shows_each_loss_with_its_parameters():
    from scripts.train import choices_listing

    text = choices_listing()
    assert "  rho1       keep_ratio=0.6 ((0, 1])" in text
    assert "  pdl        alpha=1.0 ([0, inf)), eps=1e-07" in text and "  ce         no parameters" in text
