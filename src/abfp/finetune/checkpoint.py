"""Finetuning checkpoints in one safetensors file.

Tensors: ``model.<name>`` (the state dict), ``optim.<param index>.<key>`` (optimizer state),
``rng.torch`` (torch's global CPU generator: dropout, device noise, DNF seeds; on many
processes rank 0's, unused on resume since every step reseeds it), and
whatever the method adds (``dnf.<site>.lo|width|probs``: the DNF histograms). Everything
else (step, optimizer hyper-parameters, settings, metrics measured before training, elapsed
seconds) is JSON in the file's metadata under ``"abfp"``. The file is written to a temporary
name and renamed, so a run killed while saving keeps the previous checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "optimizer_tensors", "restore_optimizer"]

FORMAT = "abfp-finetune/1"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors of the optimizer state and a JSON description of the rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().clone().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    extra_tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write the state after ``step`` finished steps (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors.update({k: v.detach().clone().contiguous() for k, v in extra_tensors.items()})
    info = {**meta, "format": FORMAT, "step": int(step), "optimizer": opt_meta}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"abfp": json.dumps(info)})
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a checkpoint written by :func:`save_checkpoint`."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("abfp")
    if raw is None:
        raise ValueError(f"{path} is not an abfp finetuning checkpoint")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    return load_file(str(path)), meta


def model_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
