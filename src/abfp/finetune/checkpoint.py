"""Finetuning checkpoints in one safetensors file.

Tensors: ``model.<name>`` (the state dict), ``optim.<param index>.<key>`` (optimizer state:
AdamW's moments and step counts, bit for bit), ``rng.torch`` (torch's global CPU generator:
dropout, device noise, DNF seeds; on many processes rank 0's, unused on resume since every
step reseeds it), and whatever the method adds (``dnf.<site>.lo|width|probs``: the DNF
histograms). Everything else (step, optimizer hyper-parameters, what produced the run: method,
device config, settings, model and data fingerprints, thread count; metrics measured before
training, elapsed seconds) is JSON in the file's metadata under ``"abfp"``, together with
``digest``, the BLAKE2b-256 of every tensor's name, dtype, shape and bytes: a damaged file is
detected on loading, not trained on.

The file is written to a temporary name beside it, fsynced and renamed
(:func:`abfp.outputs.atomic_path`), so a run killed while saving keeps the previous checkpoint.
Any defect found on loading (not a safetensors file, truncated, metadata missing or of another
format, digest mismatch) raises :class:`CheckpointError`, a one-line ``ValueError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..outputs import atomic_path

__all__ = ["FORMAT", "CheckpointError", "digest", "load_checkpoint", "optimizer_tensors", "read_meta",
           "restore_optimizer", "save_checkpoint", "tensor_digest"]

FORMAT = "abfp-finetune/2"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (the message names the file and says why)."""


def tensor_digest(tensors: Mapping[str, Tensor], h: Any = None) -> str:
    """BLAKE2b-256 (hex) over ``name, dtype, shape, bytes`` of every tensor, in name order."""
    h = h or hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def digest(*parts: Any) -> str:
    """BLAKE2b-256 of JSON-able values and tensors (a fingerprint of a model or a data set)."""
    h = hashlib.blake2b(digest_size=32)
    for p in parts:
        if isinstance(p, Tensor):
            tensor_digest({"": p}, h)
        elif isinstance(p, Mapping) and p and all(isinstance(v, Tensor) for v in p.values()):
            tensor_digest(p, h)
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


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
    """Load the state written by :func:`optimizer_tensors` (tensors keep their dtype)."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = [{**g, "betas": tuple(g["betas"])} if isinstance(g.get("betas"), list) else g
              for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    extra_tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write the state after ``step`` finished steps atomically (see the module docstring)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors.update({k: v.detach().clone().contiguous() for k, v in extra_tensors.items()})
    info = {**meta, "format": FORMAT, "step": int(step), "optimizer": opt_meta, "digest": tensor_digest(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"abfp": json.dumps(info)})


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r} is damaged or not an abfp finetuning checkpoint ({why}); "
                           "delete it, or pass --force without --resume to start again")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (cheap: the tensors are not read or verified)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist" if not path.exists()
                              else f"checkpoint {str(path)!r} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("abfp")
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise _damaged(path, _short(e)) from None
    if raw is None:
        raise _damaged(path, "no abfp metadata")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise _damaged(path, f"metadata is not JSON: {_short(e)}") from None
    if not isinstance(meta, dict):
        raise _damaged(path, "metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {meta.get('format')!r}, this abfp reads {FORMAT}; "
                              "pass --force without --resume to start again")
    if not isinstance(meta.get("step"), int) or meta["step"] < 0 or not isinstance(meta.get("optimizer"), dict):
        raise _damaged(path, "no step or optimizer state in the metadata")
    return meta


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a checkpoint written by :func:`save_checkpoint`, verified
    against its digest; :class:`CheckpointError` when it is missing or damaged."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise _damaged(path, _short(e)) from None
    if tensor_digest(tensors) != meta.get("digest"):
        raise _damaged(path, "the tensors do not match the recorded digest")
    if "rng.torch" not in tensors:
        raise _damaged(path, "no generator state")
    return tensors, meta


def model_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."
