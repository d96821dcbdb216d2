"""Everything derived from the declared settings (``TokenWeighting.params``, ``config.MODIFIERS``): a loss's
complete, checked config; its run-name tag and W&B columns; the listing of ``scripts/train.py --list``; the
tables of ``docs/losses.md`` (``scripts/loss_table.py`` writes them, a test checks they are in sync)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from losslab.losses.config import MODIFIER_NAMES, MODIFIERS, LossConfig, Param, SettingError
from losslab.losses.weighting import LOSSES, TokenWeighting, check_params, declared, owners, resolve_loss


def resolve(cfg: LossConfig | Mapping[str, Any]) -> LossConfig:
    """The complete, checked config: the loss's parameters with their defaults, every modifier within its
    bound, and no setting that would be silently ignored (a parameter of another loss, ``count_ignored`` for a
    loss that counts by tokens, an entropy clamp where no entropy is computed, a reference model for a loss
    that reads no reference CE). ValueError naming the key otherwise."""
    if not isinstance(cfg, LossConfig):
        cfg = LossConfig.from_mapping(cfg)
    cls = resolve_loss(cfg.name)
    params = check_params(cls, cfg.params, cfg.name, MODIFIER_NAMES)
    mods = {p.name: p.check(getattr(cfg, p.name)) for p in MODIFIERS}
    from losslab.losses import kernels

    kernels.resolve(mods["kernel"])  # a clear error now for a kernel that cannot run
    if mods["count_ignored"] and not cls.official_counting:
        applies = ", ".join(n for n, c in sorted(LOSSES.items()) if c.official_counting)
        why = f"loss.count_ignored=true (the official MiLe code's counting) applies to {applies}, not to {cfg.name}"
        raise SettingError("count_ignored", why)
    if mods["normalise"] != "weights" and not cls.normalised:
        applies = ", ".join(n for n, c in sorted(LOSSES.items()) if c.normalised)
        why = (f"loss.normalise={mods['normalise']} chooses how a weight-normalised loss ({applies}) is divided; "
               f"loss.name={cfg.name} is a token mean already")  # fmt: skip
        raise SettingError("normalise", why)
    if mods["entropy_clamp"] and not (cls.needs_entropy or mods["log_entropy"]):
        why = (f"loss.entropy_clamp={mods['entropy_clamp']} changes an entropy that loss.name={cfg.name} does not "
               "compute: set it for mile (or with loss.log_entropy=true)")  # fmt: skip
        raise SettingError("entropy_clamp", why)
    if mods["reference"] and "ref_ce" not in cls.token_inputs:
        why = f"loss.reference scores a reference CE, which loss.name={cfg.name} does not read (rho1 does)"
        raise SettingError("reference", why)
    return LossConfig(cfg.name, params, **mods)


def _values(cfg: LossConfig) -> tuple[list[tuple[Param, Any]], dict[str, Any]]:
    """(declared parameters with their values, parameters of a plug-in that cannot be imported here)."""
    params = declared(cfg.name, missing_ok=True)
    out = []
    for p in params:
        value = cfg.params.get(p.name, p.default)
        with contextlib.suppress(ValueError):  # a saved value as it is, if it no longer passes today's check
            value = p.check(value)
        out.append((p, value))
    unknown = {k: v for k, v in cfg.params.items() if k not in {p.name for p in params}}
    return out, unknown


def _as_config(loss: LossConfig | Mapping[str, Any]) -> LossConfig:
    return loss if isinstance(loss, LossConfig) else LossConfig.from_mapping(loss)  # a saved config's mapping


def loss_tag(loss: LossConfig | Mapping[str, Any]) -> str:
    """``mile-g1``, ``focal_lin-g2-a0.25``, ``pdl-a0.5-k0``, ``rho1-keep0.8``, ``ce-ls0.1``: the loss, its
    parameters (the primary one always, the others when changed) and the modifiers that change its math.
    ``loss``: a ``LossConfig`` or the ``loss`` mapping of a saved config.yaml."""
    cfg = _as_config(loss)
    values, unknown = _values(cfg)
    parts = [cfg.name] + [p.label(v) for p, v in values]
    parts += [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(unknown.items())]
    parts += [p.label(getattr(cfg, p.name)) for p in MODIFIERS]
    return "-".join(x for x in parts if x)


def loss_columns(loss: LossConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Flat columns for a runs table: ``loss/name``, ``loss/tag`` and ``loss/<key>`` for each of the loss's
    parameters and each modifier that changes its math."""
    cfg = _as_config(loss)
    values, unknown = _values(cfg)
    cols: dict[str, Any] = {"loss/name": cfg.name, "loss/tag": loss_tag(cfg)}
    cols.update({f"loss/{p.name}": v for p, v in values})
    cols.update({f"loss/{k}": v for k, v in unknown.items()})
    cols.update({f"loss/{p.name}": getattr(cfg, p.name) for p in MODIFIERS if p.in_name})
    return cols


def summary(cls: type[TokenWeighting]) -> str:
    """The first paragraph of the class docstring, on one line: what the loss computes."""
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in doc.splitlines()).replace("``", "`")


def _range(p: Param) -> str:
    if p.choices:
        return " \\| ".join(p.choices)
    if p.bound is None:
        return ""
    b = p.bound
    hi = ")" if b.hi_open or (b.hi == float("inf") and not b.inf_ok) else "]"
    return f"{'(' if b.lo_open else '['}{b.lo:g}, {b.hi:g}{hi}"


def _default(p: Param) -> str:
    if isinstance(p.default, bool):
        return str(p.default).lower()
    return repr(p.default) if p.default == "" else str(p.default)


def _name_part(p: Param) -> str:
    if not p.in_name:
        return ""
    tag = p.tag or p.name
    if p.kind is bool:
        return f"`{tag}` when true"
    return f"`{tag}<value>`" + ("" if p.always else f" when not {_default(p)}")


def markdown_tables() -> str:
    """The losses, their parameters and the modifiers as markdown, from the declarations (docs/losses.md)."""
    lines = ["| `loss.name` | loss | parameters |", "|---|---|---|"]
    for name, cls in sorted(LOSSES.items()):
        lines.append(f"| `{name}` | {summary(cls)} | {', '.join(f'`{p.name}`' for p in cls.params)} |")
    lines += ["", "Each loss's parameters (`loss.<key>`; a parameter of a loss that is not selected is an error):", "",
              "| loss | key | default | range | in the run name | meaning |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, cls in sorted(LOSSES.items()):
        for p in cls.params:
            lines.append(f"| `{name}` | `{p.name}` | {_default(p)} | {_range(p)} | {_name_part(p)} | {p.doc} |")
    lines += ["", "Modifiers (`loss.<key>`, any loss where they apply):", "",
              "| key | default | range | in the run name | meaning |", "|---|---|---|---|---|"]  # fmt: skip
    for p in MODIFIERS:
        lines.append(f"| `{p.name}` | {_default(p)} | {_range(p)} | {_name_part(p)} | {p.doc} |")
    return "\n".join(lines) + "\n"


def listing() -> list[str]:
    """Lines for ``scripts/train.py --list``: each loss with its parameters, then the modifiers."""
    lines = ["loss.name (its parameters: default, range):"]
    width = max(map(len, LOSSES))
    for name, cls in sorted(LOSSES.items()):
        params = ", ".join(f"{p.name}={_default(p)} ({_range(p)})" for p in cls.params) or "no parameters"
        lines.append(f"  {name:<{width}}  {params}")
    lines.append("  or package.module:Class, a plug-in TokenWeighting with its own declared params")
    lines.append("loss modifiers (any loss): " + ", ".join(f"{p.name}={_default(p)}" for p in MODIFIERS))
    return lines


__all__ = ["check_params", "declared", "listing", "loss_columns", "loss_tag", "markdown_tables", "owners", "resolve"]
