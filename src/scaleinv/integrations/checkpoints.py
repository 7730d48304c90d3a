"""Checkpoints of other optimizers, loaded into :class:`~scaleinv.AdamP` / :class:`~scaleinv.SGDP`.

``load_state_dict`` passes every state_dict through :func:`migrate` first. A checkpoint of one
of these continues with the same state:

* ``adamp`` 0.3.0, ``torch-optimizer`` and timm (also ``caution=True``, which our
  ``caution`` option reproduces): the same keys as ours;
* ``torch.optim.SGD`` into SGDP: ``momentum_buffer`` is SGDP's ``momentum`` buffer (same
  recurrence);
* ``torch.optim.Adam`` (no weight decay, or ``decoupled_weight_decay=True``) and ``AdamW`` into
  AdamP: same moments, same bias corrections, same decoupled decay;
* ``pytorch_optimizer`` (``weight_decouple=True, fixed_decay=False``): its per-group ``step``
  becomes AdamP's per-tensor ``step``.

Anything else is refused here, with what to do, instead of failing in the first ``step``.
Implementation flags of another library (``foreach``, ``fused``, ``capturable``,
``differentiable``) are not carried over: the optimizer keeps those it was built with.
"""

from __future__ import annotations

from typing import Any

__all__ = ["migrate"]

_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")
_STATE_KEYS = {"AdamP": {"step", "exp_avg", "exp_avg_sq"}, "SGDP": {"momentum"}}


def _source(group: dict[str, Any]) -> str:
    if "weight_decouple" in group or "fixed_decay" in group:
        return "pytorch_optimizer"
    if "caution" in group:
        return "timm"
    if "delta" in group:
        return "adamp"  # ours, adamp 0.3.0, torch-optimizer: the same keys
    if "amsgrad" in group:
        return "torch.optim.Adam"
    if "momentum" in group and "dampening" in group and "betas" not in group:
        return "torch.optim.SGD"
    return "unrecognised"


def migrate(state_dict: dict[str, Any], optimizer: str) -> dict[str, Any]:
    """``state_dict`` in the form ``optimizer`` (``"AdamP"`` or ``"SGDP"``) steps from.

    Returns a new dict (the argument is not modified); raises ``ValueError`` saying what to do
    for a checkpoint that cannot continue as the same algorithm.
    """
    if optimizer not in _STATE_KEYS:
        raise ValueError(f"Invalid optimizer: {optimizer!r}; expected 'AdamP' or 'SGDP'")
    groups = [dict(group) for group in state_dict["param_groups"]]
    state = {index: dict(entry) for index, entry in state_dict["state"].items()}
    for group in groups:
        source = _source(group)

        def refuse(reason: str, todo: str, source: str = source) -> None:
            raise ValueError(
                f"Cannot load this {source} checkpoint into scaleinv.{optimizer}: {reason}. "
                f"{todo}"
            )

        if source == "unrecognised":
            refuse(
                f"its param groups (keys {sorted(k for k in group if k != 'params')}) are "
                "neither AdamP/SGDP's nor torch.optim SGD/Adam/AdamW's",
                "Load checkpoints of AdamP, SGDP (scaleinv, adamp, timm, torch-optimizer, "
                "pytorch_optimizer) or torch.optim SGD/Adam/AdamW.",
            )
        wanted = "betas" if optimizer == "AdamP" else "momentum"
        if wanted not in group:
            other = "SGDP" if optimizer == "AdamP" else "AdamP"
            refuse(f"its groups have no {wanted!r}", f"Load it into scaleinv.{other}.")
        entries = [state[i] for i in group["params"] if i in state]
        if source == "torch.optim.SGD":
            for entry in entries:
                buffer = entry.pop("momentum_buffer", None)
                if buffer is not None:  # None (momentum 0): SGDP starts from a zero buffer
                    entry["momentum"] = buffer
        if source == "torch.optim.Adam":
            if group.pop("amsgrad"):
                refuse(
                    "AdamP has no AMSGrad (amsgrad=True)",
                    "Continue with torch.optim.Adam, or set every group's 'amsgrad' to False "
                    "and delete 'max_exp_avg_sq' from the state to continue without it.",
                )
            decoupled = group.pop("decoupled_weight_decay", False)
            if group["weight_decay"] != 0 and not decoupled:
                refuse(
                    "torch.optim.Adam's weight_decay is an L2 term added to the gradient, "
                    "AdamP's is decoupled (as in AdamW)",
                    "Set each state_dict['param_groups'][i]['weight_decay'] to the decoupled "
                    "decay you want AdamP to use (0 for none), then load it.",
                )
        if source == "pytorch_optimizer":
            if group["weight_decay"] != 0 and (
                not group.pop("weight_decouple", True) or group.pop("fixed_decay", False)
            ):
                refuse(
                    "its weight decay is coupled (weight_decouple=False) or not scaled by lr "
                    "(fixed_decay=True)",
                    "Set the groups' 'weight_decay' to the decoupled decay you want (0 for none), "
                    "then load it.",
                )
            group.pop("weight_decouple", None)
            group.pop("fixed_decay", None)
            for option in ("adam_debias", "adanorm", "use_gc", "cautious", "r", "ams_bound"):
                if group.get(option):
                    refuse(f"{option}=True is not part of AdamP/SGDP",
                           f"Continue with pytorch_optimizer, or set '{option}' to False.")
                group.pop(option, None)
            step = group.pop("step", 0)
            if optimizer == "AdamP":
                for entry in entries:
                    if entry:
                        entry.setdefault("step", step)
        if source != "adamp":
            for key in _IMPLEMENTATION_KEYS:
                group.pop(key, None)
        for entry in entries:
            if entry and set(entry) != _STATE_KEYS[optimizer]:
                refuse(
                    f"its per-parameter state holds {sorted(entry)}, {optimizer} keeps "
                    f"{sorted(_STATE_KEYS[optimizer])}",
                    "Load a checkpoint of the same kind of optimizer.",
                )
    return {**state_dict, "state": state, "param_groups": groups}
