"""The model zoo: named evaluation tasks (a float32 model, its data and its metric).

>>> from abfp import zoo
>>> zoo.names()                                   # doctest: +SKIP
['dlrm', 'efficientnet-lite0', 'fashion-cnn', 'fashion-lstm', 'fashion-vit', 'minilm-l6', 'mnist-cnn', 'unet3d']
>>> task = zoo.get("fashion-cnn")                 # doctest: +SKIP
>>> model, data = task.build_model(), task.load_data().take(1000)  # doctest: +SKIP

A user's own model plugs in through :func:`load_callable` (``"package.module:function"`` or
``"path/to/file.py:function"``).

Every task is listed even when the optional package it needs is missing; :func:`get` of
such a task raises :class:`MissingDependencyError` (an ``ImportError``) naming what to
install. Heavy packages (transformers, scikit-image, ...) are imported only inside
``build_model`` / ``load_data``, so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import dlrm, efficientnet, fashion, lstm, minilm, mnist, unet3d
from .base import AGREEMENT, COSINE, KL, TOP1, Dataset, Metric, Task

__all__ = [
    "AGREEMENT", "COSINE", "KL", "TOP1", "Dataset", "Metric", "Task", "MissingDependencyError",
    "EXTRA_METRICS", "METRICS", "available", "extra_metrics", "get", "load_callable", "lookup", "missing",
    "names", "register",
]  # fmt: skip

#: The ready metrics by short name (for ``(model, data, "top1")`` triples and command lines).
METRICS: dict[str, Metric] = {"top1": TOP1, "agreement": AGREEMENT, "kl": KL, "cosine": COSINE}

_REGISTRY: dict[str, Task] = {}

#: Extra metrics an evaluator may report next to a task's main metric, by task name.
EXTRA_METRICS: dict[str, list[Metric]] = {}

#: Import names of pip distributions whose module name is not the distribution name.
_IMPORT_NAMES: dict[str, str] = {"scikit-image": "skimage", "scikit-learn": "sklearn"}

#: How to install a package when plain ``pip install NAME`` is the wrong advice.
_INSTALL_HINTS: dict[str, str] = {
    "ccexam": "pip install --no-deps ccexam==1.0.0  (its torchvision dependency would replace torch)",
}


class MissingDependencyError(ImportError):
    """A zoo task needs an optional package that is not installed."""

    def __init__(self, task: str, packages: list[str]) -> None:
        hints = [_INSTALL_HINTS.get(p, f"pip install {p}") for p in packages]
        msg = (
            f"zoo task {task!r} needs the optional package(s) {', '.join(packages)}; install with: "
            + "; ".join(hints)
            + "  (or install everything: pip install 'abfp[zoo]' followed by "
            "pip install --no-deps ccexam==1.0.0, which is what scripts/install.sh does)"
        )
        super().__init__(msg, name=packages[0])
        self.task = task
        self.packages = packages


def _installed(distribution: str) -> bool:
    """Whether the pip distribution ``distribution`` is installed (or at least importable)."""
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    module = _IMPORT_NAMES.get(distribution, distribution.replace("-", "_").lower())
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(name_or_task: str | Task) -> list[str]:
    """The pip packages a task requires that are not installed (empty when it is usable)."""
    task = name_or_task if isinstance(name_or_task, Task) else lookup(name_or_task)
    return [p for p in task.requires if not _installed(p)]


def available(name: str) -> bool:
    """Whether the task ``name`` is registered and all its optional packages are installed."""
    return name in _REGISTRY and not missing(name)


def register(task: Task, extra: list[Metric] | None = None, *, replace: bool = False) -> Task:
    """Add ``task`` to the registry (with optional extra metrics); returns it.

    Raises ``ValueError`` if a different task already has that name, unless ``replace``.
    """
    if not isinstance(task, Task):
        raise TypeError(f"register() needs a Task, got {type(task).__name__}")
    if not task.name or ":" in task.name:
        raise ValueError(f"invalid task name {task.name!r} (must be non-empty, without ':')")
    old = _REGISTRY.get(task.name)
    if old is not None and old is not task and not replace:
        raise ValueError(f"a zoo task named {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    if extra is not None:
        EXTRA_METRICS[task.name] = list(extra)
    return task


def names() -> list[str]:
    """All registered task names, sorted (including tasks whose optional packages are missing)."""
    return sorted(_REGISTRY)


def lookup(name: str) -> Task:
    """The registered task ``name`` without checking its optional packages (for listings).

    Case and ``_``/``-`` insensitive; ``ValueError`` (listing the known names) if unknown.
    """
    task = _REGISTRY.get(name) or _REGISTRY.get(name.strip().lower().replace("_", "-"))
    if task is None:
        raise ValueError(f"unknown zoo task {name!r}; known tasks: {', '.join(names())}")
    return task


def get(name: str) -> Task:
    """The task called ``name``.

    A name containing ``':'`` is treated as ``"package.module:function"`` and passed to
    :func:`load_callable`. Raises ``ValueError`` for an unknown name (listing the known
    ones) and :class:`MissingDependencyError` when the task's optional packages are missing.
    """
    if not isinstance(name, str):
        raise TypeError(f"task name must be a string, got {type(name).__name__}")
    if ":" in name:
        return load_callable(name)
    task = lookup(name)
    absent = missing(task)
    if absent:
        raise MissingDependencyError(task.name, absent)
    return task


def extra_metrics(name: str) -> list[Metric]:
    """Extra metrics worth reporting for task ``name`` besides its main one (may be empty)."""
    return list(EXTRA_METRICS.get(name, []))


def _as_dataset(data: Any) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (DataLoader, Iterator)):  # a loader or a generator of batches (not a list: refused below)
        return Dataset.from_batches(data)
    if isinstance(data, Tensor):
        return Dataset((data,))
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], (Tensor, type(None))):
        inputs = data[0] if isinstance(data[0], tuple) else (data[0],)
        if all(isinstance(t, Tensor) for t in inputs):
            return Dataset(tuple(inputs), data[1])
    raise ValueError(
        "data must be an abfp.zoo.Dataset, a Tensor of inputs, an (inputs, targets) pair, or a DataLoader (or "
        "generator) of such batches; "
        f"got {type(data).__name__}"
    )


def _as_metric(metric: Any) -> Metric:
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str) and metric.lower() in METRICS:
        return METRICS[metric.lower()]
    raise ValueError(f"metric must be an abfp.zoo.Metric or one of {sorted(METRICS)}; got {metric!r}")


def _from_triple(spec: str, result: tuple[Any, ...]) -> Task:
    model, data, metric = result
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec}: the first item of the returned triple must be an nn.Module")
    dataset, scored_by = _as_dataset(data), _as_metric(metric)
    if scored_by.kind == "accuracy" and dataset.targets is None:
        raise ValueError(f"{spec}: metric {scored_by.name!r} needs labelled data (targets)")
    model = model.float().eval()  # evaluated in float32, as every zoo model: floating inputs follow
    dataset = Dataset(tuple(t.float() if t.is_floating_point() else t for t in dataset.inputs), dataset.targets)
    return Task(
        name=spec,
        description=f"user task from {spec}",
        build_model=lambda: model,
        load_data=lambda: dataset,
        metric=scored_by,
    )


def _is_file_spec(module_name: str) -> bool:
    return module_name.endswith(".py") or "/" in module_name or os.sep in module_name


def _import_file(path_text: str, spec: str) -> Any:
    """Import the Python file ``path_text`` under a module name unique to its resolved path.

    Two task files with the same name in different folders (``a/tasks.py``, ``b/tasks.py``)
    get different modules: neither is served from the other's ``sys.modules`` entry. The file
    is executed afresh at every call (a file edited in place is read again); its folder is on
    ``sys.path`` while it runs, so it can import its neighbours.
    """
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ValueError(f"no such file: {path} (from {spec!r})")
    resolved = path.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c == "_" else "_" for c in resolved.stem)
    name = f"_abfp_user_task_{digest}_{stem}"
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot import {path} as a Python file (from {spec!r})")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses, pickling and relative lookups need the entry
    sys.path.insert(0, str(resolved.parent))
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        try:
            sys.path.remove(str(resolved.parent))
        except ValueError:
            pass
    return module


def _required_parameters(func: Any) -> list[str]:
    """Names of ``func``'s parameters that have no default (``[]`` when its signature cannot be read)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is p.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def load_callable(spec: str) -> Task:
    """Import ``"package.module:function"`` (or ``"path/to/file.py:function"``), call the
    function, and return a :class:`Task`.

    The function takes no arguments and returns either a ``Task`` or a ``(model, data,
    metric)`` triple, where ``data`` is a :class:`Dataset` (or a Tensor of inputs, or an
    ``(inputs, targets)`` pair) and ``metric`` a :class:`Metric` (or one of ``"top1"``,
    ``"agreement"``, ``"kl"``, ``"cosine"``); a triple's task is named ``spec``. A file path
    (ending in ``.py`` or holding a ``/``) is imported under a name unique to the file, so
    same-named files in two folders never collide. Raises ``ValueError`` for a malformed path,
    a module, file or function that cannot be found, or a return value of the wrong kind.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"expected 'package.module:function', got {spec!r}")
    module_name, func_name = (s.strip() for s in spec.split(":"))
    if not module_name or not func_name:
        raise ValueError(f"expected 'package.module:function', got {spec!r}")
    if _is_file_spec(module_name):
        module = _import_file(module_name, spec)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # Only the named module (or a parent package) missing is a bad path; a missing
            # dependency *inside* the user's module propagates as the ImportError it is.
            if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
                raise ValueError(f"cannot import module {module_name!r} (from {spec!r}): {e}") from e
            raise
    func: Any = module
    for part in func_name.split("."):
        if not hasattr(func, part):
            raise ValueError(f"module {module_name!r} has no attribute {func_name!r} (from {spec!r})")
        func = getattr(func, part)
    if not callable(func):
        raise ValueError(f"{spec!r} is not callable")
    required = _required_parameters(func)
    if required:
        raise ValueError(f"{spec} must take no arguments (abfp calls it as {func_name}()); it requires "
                         f"{', '.join(required)}: give them defaults, or wrap it in a function without arguments")
    result = func()
    if isinstance(result, Task):
        return result
    if isinstance(result, tuple) and len(result) == 3:
        return _from_triple(spec, result)
    raise ValueError(f"{spec} must return a Task or a (model, data, metric) triple, got {type(result).__name__}")


for _family in (fashion, mnist, efficientnet, minilm, lstm, unet3d, dlrm):
    for _task in _family.TASKS:
        register(_task, getattr(_family, "EXTRA_METRICS", {}).get(_task.name))
del _family, _task
