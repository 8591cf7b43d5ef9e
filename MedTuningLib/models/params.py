"""Parameter accounting (docs/method.md: full = the model without inserted modules; tuned = parameters
with gradients; inserted = parameters of inserted modules; head = what head tuning trains)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from MedTuningLib.models.base import InsertedModule

if TYPE_CHECKING:
    from MedTuningLib.models.factory import MedTuningModel


def _group(name: str, inserted_kind: dict[str, str]) -> str:
    """Report group of a parameter: ``backbone.<part>``, ``inserted.<kind>`` or ``decoder.<part>``."""
    for prefix, kind in inserted_kind.items():
        if name.startswith(prefix + "."):
            return f"inserted.{kind}"
    parts = name.split(".")
    if parts[0] == "encoder" and len(parts) > 2 and parts[1] == "backbone":
        return f"backbone.{parts[2]}"
    if parts[0] == "decoder" and len(parts) > 1:
        return f"decoder.{parts[1]}"
    return ".".join(parts[:2])


def parameter_report(model: "MedTuningModel") -> dict:
    """``{"full", "tuned", "inserted", "head", "modules": {group: {"params", "tuned"}}}``."""
    inserted_kind = {prefix: m.kind for prefix, m in model.named_modules()
                     if isinstance(m, InsertedModule) and prefix}
    # Keep only the outermost inserted modules (an inserted module may contain others).
    outer = {p: k for p, k in inserted_kind.items()
             if not any(p != q and p.startswith(q + ".") for q in inserted_kind)}
    inserted_names = model.inserted_parameter_names()
    head_names = model.head_parameter_names()
    total = tuned = inserted = head = 0
    modules: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        tuned += n if p.requires_grad else 0
        inserted += n if name in inserted_names else 0
        head += n if name in head_names else 0
        group = modules.setdefault(_group(name, outer), {"params": 0, "tuned": 0})
        group["params"] += n
        group["tuned"] += n if p.requires_grad else 0
    return {"full": total - inserted, "tuned": tuned, "inserted": inserted, "head": head, "modules": modules}
