"""Every ```python block of README.md and docs/*.md runs against the current code.

A documented example that no longer runs (a renamed function, a keyword the function no longer
takes, a site name that does not exist) is a wrong answer the user finds first. Each block is
executed as written, in a fresh namespace holding ``abfp``, ``torch``, ``nn`` and the stand-ins
the block's prose assumes (``model``, ``x``, ...: small, declared in :data:`STAND_INS` per block).
Long-running calls (finetuning, sweeps, the design search) are wrapped: the wrapper binds the
call's arguments to the real signature (so a stale keyword fails here exactly as it would for a
user) and then either runs the real function with its sizes capped (steps, samples, runs) or,
for :func:`abfp.explore`, returns a stand-in result. A new python block in the docs fails
:func:`test_every_block_has_stand_ins` until it is given its stand-ins here.
"""
from __future__ import annotations

import inspect
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest
import torch
from torch import nn

import abfp

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def doc_blocks() -> dict[str, str]:
    """``{"docs/x.md#k": source}``: the k-th (from 1) python block of each document."""
    blocks: dict[str, str] = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for k, match in enumerate(FENCE.finditer(path.read_text(encoding="utf-8")), start=1):
            blocks[f"{path.relative_to(ROOT).as_posix()}#{k}"] = match.group(1)
    return blocks


def small_model() -> nn.Module:
    """A stand-in with the module names the examples use (``features.0``, ``classifier``)."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten()),
        classifier=nn.Linear(4 * 6 * 6, 10)))


def image_batch(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def capped(fn: Callable[..., Any], **caps: int) -> Callable[..., Any]:
    """``fn`` with its documented call checked against its signature, then run with each named
    size argument at most its cap (a documented 200 steps run as 2)."""
    signature = inspect.signature(fn)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        # Sizes named in the signature, or passed through its ``**kwargs`` (the real function
        # checks those keywords itself when it runs).
        places = [bound.arguments] + [bound.arguments[p.name] for p in signature.parameters.values()
                                      if p.kind is p.VAR_KEYWORD and p.name in bound.arguments]
        for arguments in places:
            for name, cap in caps.items():
                if isinstance(arguments.get(name), int):
                    arguments[name] = min(arguments[name], cap)
        return fn(*bound.args, **bound.kwargs)

    return wrapper


def bound_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``'s documented call checked against its signature; returns a stand-in result."""
    signature = inspect.signature(fn)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signature.bind(*args, **kwargs)
        return mock.MagicMock(name=f"{fn.__name__}(...)")

    return wrapper


def _readme() -> dict[str, Any]:
    return {"model": small_model(), "example_batch": image_batch(),
            "x": torch.randn(3, 40), "w": torch.randn(5, 40), "b": torch.randn(5)}


def _finetune_api() -> dict[str, Any]:
    from abfp.zoo import KL
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    return {"model": model, "inputs": torch.randn(32, 12), "cfg": abfp.ABFPConfig(tile_width=8, gain=2),
            "held_out": abfp.zoo.Dataset((torch.randn(16, 12),), torch.zeros(16, dtype=torch.long)), "KL": KL}


def _custom_task() -> dict[str, Any]:
    # docs/zoo.md's user task loads model.pt and data.pt from the working directory (a temporary one).
    model = small_model()
    torch.save(model, "model.pt")
    torch.save((image_batch(4), torch.tensor([0, 1, 2, 3])), "data.pt")
    return {}


#: Per block: the names its prose assumes, and the long calls to wrap (dotted path -> wrapper maker).
STAND_INS: dict[str, tuple[Callable[[], dict[str, Any]], dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]]]] = {
    "README.md#1": (_readme, {}),
    "docs/energy.md#1": (lambda: {"model": small_model(), "example_batch": image_batch()}, {}),
    "docs/evaluation.md#1": (lambda: {}, {"abfp.evaluate.evaluate": lambda f: capped(f, samples=32, runs=2)}),
    "docs/explore.md#1": (lambda: {"model": small_model(), "data": None, "metric": None},
                          {"abfp.explore": bound_only}),
    "docs/families.md#1": (lambda: {"x": torch.randn(2, 5, 64)}, {}),
    "docs/finetune.md#1": (lambda: {}, {"abfp.finetune.dnf": lambda f: capped(f, steps=2),
                                        "abfp.finetune.qat": lambda f: capped(f, steps=2)}),
    "docs/finetune.md#2": (_finetune_api, {"abfp.finetune.distil": lambda f: capped(f, steps=2),
                                           "abfp.finetune.qat": lambda f: capped(f, steps=2)}),
    "docs/precision.md#1": (lambda: {"model": small_model(), "x_calibration": image_batch(4), "x": image_batch()}, {}),
    "docs/zoo.md#1": (lambda: {}, {}),
    "docs/zoo.md#2": (_custom_task, {}),
    "docs/zoo.md#3": (lambda: {}, {}),
}

#: After the block ran: a check of what it defined (a block that only defines a function is run here).
AFTER: dict[str, Callable[[dict[str, Any]], None]] = {
    "docs/zoo.md#2": lambda ns: _check_custom_task(ns["my_task"]()),
}


def _check_custom_task(triple: tuple[Any, ...]) -> None:
    model, data, metric = triple
    assert isinstance(model, nn.Module) and len(data) == 4 and metric is abfp.zoo.TOP1


def _resolve(dotted: str) -> tuple[Any, str]:
    module_path, _, attr = dotted.rpartition(".")
    owner: Any = abfp
    for part in module_path.split(".")[1:]:
        owner = getattr(owner, part)
    return owner, attr


def test_every_block_has_stand_ins() -> None:
    found = set(doc_blocks())
    assert found == set(STAND_INS), (
        f"python blocks without stand-ins: {sorted(found - set(STAND_INS))}; "
        f"stand-ins for blocks that are gone: {sorted(set(STAND_INS) - found)}")


@pytest.mark.parametrize("block", sorted(STAND_INS))
def test_doc_block_runs(block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = doc_blocks()[block]
    monkeypatch.chdir(tmp_path)
    # docs/zoo.md#3 reads a path relative to the repository root.
    if "src/abfp/zoo/weights" in source:
        monkeypatch.chdir(ROOT)
    make_names, wrappers = STAND_INS[block]
    for dotted, wrap in wrappers.items():
        owner, attr = _resolve(dotted)
        monkeypatch.setattr(owner, attr, wrap(getattr(owner, attr)))
    namespace: dict[str, Any] = {"abfp": abfp, "torch": torch, "nn": nn, "__name__": "doc_example"}
    namespace.update(make_names())
    torch.set_num_threads(1)
    exec(compile(source, block, "exec"), namespace)  # noqa: S102 - the documented example itself
    if block in AFTER:
        AFTER[block](namespace)


def test_capped_refuses_a_stale_keyword() -> None:
    """The wrapper fails a documented call the real signature would refuse (the check can fail)."""
    def steps_fn(model: Any, *, steps: int = 10) -> int:
        return steps

    def sized_fn(model: Any, **kwargs: Any) -> int:
        return kwargs["samples"]

    assert capped(steps_fn, steps=2)(None, steps=200) == 2
    assert capped(sized_fn, samples=16)(None, samples=2000) == 16
    with pytest.raises(TypeError):
        capped(steps_fn, steps=2)(None, step=200)
    with pytest.raises(TypeError):
        bound_only(steps_fn)(None, lr=1.0)
