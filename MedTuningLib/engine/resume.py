"""The resume state of a training run, in ``OUT.partial/``: written at the end of every epoch, never pickled.

``state.json`` holds where the run stands (epoch, planned epochs, time spent, best epoch, the settings'
fingerprint, the optimiser's scalar state) and names ``state-eNNNN.safetensors``, which holds the tuned
weights (``model/...``) and the optimiser's tensors (``optimizer/INDEX/KEY``). The JSON is replaced
atomically after the tensors are written, so a kill at any moment leaves one complete state.
"""

from __future__ import annotations

from pathlib import Path

import torch

from MedTuningLib.engine.modelfolder import load_safetensors, save_safetensors
from MedTuningLib.errors import MedTuningError
from MedTuningLib.fileio import read_json, write_json_atomic

STATE_JSON = "state.json"
BEST_WEIGHTS = "best.safetensors"


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser ``state_dict`` as safetensors-ready tensors plus JSON-ready metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer/"):
            continue
        _, index, key = name.split("/", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def check_resumable(work: Path, resume: bool) -> None:
    """Refuse to start over an interrupted run, or to resume where there is nothing to resume."""
    if work.exists() and not resume and (work / STATE_JSON).exists():
        raise MedTuningError("OUTPUT_EXISTS", f"an interrupted run of this model is in {work}",
                             "add --resume to continue it, or remove that folder to start again")
    if resume and not (work / STATE_JSON).exists():
        raise MedTuningError("RESUME_STATE_MISSING", f"--resume: no resumable run in {work}", "start without --resume")


def save_state(work: Path, model_tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               state: dict) -> None:
    """Write the state after ``state["epoch"]``; the previous epoch's tensors go once the JSON names the new ones."""
    tensors = {f"model/{k}": v for k, v in model_tensors.items()}
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    name = f"state-e{state['epoch']:04d}.safetensors"
    save_safetensors(work / name, tensors)
    previous = None
    if (work / STATE_JSON).exists():
        previous = read_json(work / STATE_JSON, "RESUME_MISMATCH", "resume state").get("tensors")
    write_json_atomic(work / STATE_JSON, {**state, "tensors": name, "optimizer": opt_meta}, "model folder")
    if previous and previous != name:
        (work / previous).unlink(missing_ok=True)


def load_state(work: Path, fingerprint: dict) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """The saved state, the tuned weights (names without ``model/``) and the optimiser ``state_dict``.

    RESUME_MISMATCH when the interrupted run was started with other settings than ``fingerprint``."""
    state = read_json(work / STATE_JSON, "RESUME_MISMATCH", "resume state")
    if state.get("fingerprint") != fingerprint:
        changed = sorted(k for k, v in fingerprint.items() if state.get("fingerprint", {}).get(k) != v)
        raise MedTuningError("RESUME_MISMATCH", f"the interrupted run used other settings ({', '.join(changed)})",
                             "resume with the same options, or remove the .partial folder to start again")
    tensors = load_safetensors(work / state["tensors"], "resume state")
    weights = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    return state, weights, unflatten_optimizer(tensors, state["optimizer"])
