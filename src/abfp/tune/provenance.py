"""Where a tuned plan's weights came from: architecture fingerprints and checked loading.

``abfp tune`` writes the float32 weights (safetensors) beside the plan. Both record the
*architecture fingerprint* of the model, ``sha256`` of its module tree (``repr(model)``) and of
every state-dict entry's name, shape and dtype (not the values: finetuning keeps it), and the
weights file records the digest of its own tensor values, which the plan also names. ``abfp eval
--plan P --weights W`` loads ``W`` only when both fingerprints match the model it builds, so a
plan or weights tuned for another architecture are refused with a message instead of failing
deep inside ``load_state_dict`` (or, worse, loading into a model whose names happen to match).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

__all__ = ["WEIGHTS_FORMAT", "architecture_fingerprint", "check_plan_architecture", "load_weights",
           "save_weights", "tuned_weights_differ", "weights_digest"]

#: The ``format`` entry of the safetensors metadata ``abfp tune`` writes.
WEIGHTS_FORMAT = "abfp-tuned-weights/1"


def architecture_fingerprint(model: nn.Module) -> str:
    """``sha256`` (hex) of ``repr(model)`` and of each state-dict entry's name, shape and dtype."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(f"\n{name}:{tuple(t.shape)}:{t.dtype}".encode())
    return h.hexdigest()


def weights_digest(state: Mapping[str, Tensor]) -> str:
    """``sha256`` (hex) of the state dict's names, shapes, dtypes and values, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: BN's step count
    return h.hexdigest()


def save_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Write ``model``'s float32 state dict to ``path`` (safetensors, atomically) with its
    architecture fingerprint and weights digest in the metadata; returns them (for the plan)."""
    from safetensors.torch import save_file

    from ..outputs import atomic_path

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    info = {"format": WEIGHTS_FORMAT, "architecture": architecture_fingerprint(model),
            "weights_sha256": weights_digest(state)}
    with atomic_path(path, suffix=".tmp.safetensors") as tmp:
        save_file(state, str(tmp), metadata=info)
    return {**info, "file": Path(path).name}


def check_plan_architecture(plan_info: Mapping[str, Any], model: nn.Module, what: str = "the plan") -> None:
    """``ValueError`` when ``plan_info['weights']['architecture']`` (written by ``abfp tune``)
    is not ``model``'s fingerprint; plans without one (written by hand) pass."""
    rec = plan_info.get("weights")
    want = rec.get("architecture") if isinstance(rec, dict) else None
    if want is None:
        return
    have = architecture_fingerprint(model)
    if want != have:
        task = plan_info.get("task")
        tuned = f"tuned on task {task!r}, " if isinstance(task, str) else ""
        raise ValueError(f"{what} was tuned for another architecture ({tuned}fingerprint {want[:12]}, this model "
                         f"{have[:12]}): tune it for this model")


def load_weights(model: nn.Module, path: str | Path, plan_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load the safetensors ``path`` into ``model`` (in place, every key must match).

    ``ValueError`` (one line) when the file is not readable, when its metadata names another
    architecture than ``model``'s, or when it does not fit the model. ``plan_info`` (the plan's
    ``info``): a differing weights digest is reported in the returned ``note``, not refused
    (the same plan may be evaluated with other weights of the same architecture)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"not a readable safetensors file ({' '.join(str(e).split())})") from None
    arch = meta.get("architecture")
    have = architecture_fingerprint(model)
    if arch is not None and arch != have:
        raise ValueError(f"weights of another architecture (fingerprint {arch[:12]}, this model {have[:12]}): "
                         "they were tuned for another model")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"does not fit the model: {' '.join(str(e).split())[:300]}") from None
    note = ""
    if tuned_weights_differ(state, plan_info):
        note = "these weights are not the ones the plan was tuned with (digest differs)"
    return {"architecture": have, "note": note}


def tuned_weights_differ(state: Mapping[str, Tensor], plan_info: Mapping[str, Any] | None) -> bool:
    """Whether ``plan_info['weights']['weights_sha256']`` (written by ``abfp tune``) names other
    weights than ``state``'s (False when the plan records none)."""
    rec = (plan_info or {}).get("weights")
    return isinstance(rec, dict) and bool(rec.get("weights_sha256")) and rec["weights_sha256"] != weights_digest(state)
