"""Fingerprints of what decides an evaluation result: the model, the data and the metric.

The result cache (:mod:`abfp.evaluate.cache`) keys every run on these, so a different model
under the same task name, a model retrained in place, other data or another metric is
recomputed, never served from the cache. Each fingerprint is a sha256 hex digest:

* :func:`model_fingerprint`: every parameter and buffer (name, dtype, shape, bytes) and,
  per submodule, its name, class (module and qualified name), ``extra_repr()``, plain
  attributes (numbers, strings, ...) and the bytecode of its class's methods, so a changed
  ``forward`` counts too; a tensor (or list of tensors) kept as a plain attribute counts as a
  buffer does, and a settings object kept as one (a config dataclass, a namespace) by its type
  and plain attributes.
* In the user's own code (not the standard library, not an installed package): what a method's
  or metric's global names refer to, the value of a module constant (numbers, strings, tuples,
  tensors) and the code of a helper function or class it calls, followed in turn; so editing a
  helper that ``forward`` calls, or a constant it reads, is a new print. A mutable global (a
  counter dict) is not read, or every call would make a new print.
* :func:`data_fingerprint`: every input tensor and the targets (dtype, shape, bytes).
* :func:`callable_fingerprint` (of a metric's function): qualified name, bytecode, default
  arguments, closure values and ``functools.partial`` arguments.

Device configs are keyed by :func:`abfp.config.config_key` (re-exported here): the device
fields and the execution options (kernel, seed), flat, as before the two were split.

A fingerprint is conservative: two objects that compute the same thing differently (say
an edited comment that moved a line) may get different prints, costing a recomputation,
never a wrong number.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import site
import sys
import sysconfig
import types
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..config import config_key

__all__ = ["callable_fingerprint", "config_key", "data_fingerprint", "is_user_code", "metric_fingerprint", "model_fingerprint"]

_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def _update_tensor(h: Any, name: str, t: Tensor) -> None:
    t = t.detach()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.is_sparse or t.is_quantized or t.layout != torch.strided:
        t = t.to_dense() if t.is_sparse else t.dequantize() if t.is_quantized else t.contiguous()
    t = t.cpu().contiguous()
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    h.update(b";")


def _plain(value: Any, depth: int = 0) -> str | None:
    """A stable text of a plain value (numbers, strings, their tuples/lists/dicts); None otherwise."""
    if isinstance(value, _PLAIN):
        return repr(value)
    if depth < 3 and isinstance(value, (tuple, list)):
        items = [_plain(v, depth + 1) for v in value]
        return None if None in items else f"{type(value).__name__}({', '.join(items)})"  # type: ignore[arg-type]
    if depth < 3 and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = [(k, _plain(v, depth + 1)) for k, v in sorted(value.items())]
        return None if any(v is None for _, v in items) else "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if isinstance(value, torch.dtype):
        return str(value)
    return None


def _const_text(c: Any) -> str:
    """A constant's text, the same in every process: a ``frozenset`` (``x in {"a", "b"}``
    compiles to one) is written sorted, since its ``repr`` order follows the per-process
    string hash seed. Other constants keep their ``repr`` (so their prints do not change)."""
    if isinstance(c, frozenset):
        return "frozenset({" + ", ".join(sorted(_const_text(v) for v in c)) + "})"
    if isinstance(c, tuple) and any(isinstance(v, (frozenset, tuple)) for v in c):
        return "(" + ", ".join(_const_text(v) for v in c) + ("," if len(c) == 1 else "") + ")"
    return repr(c)


#: Top-level packages whose functions are not followed into wherever they are installed (torch's
#: version is in every cache key, abfp's numerics by ``NUMERICS_VERSION``).
_LIBRARIES = frozenset({"abfp", "torch", "numpy", "numba", "functorch", "sympy", "triton", "builtins"})


@functools.lru_cache(maxsize=None)
def _installed_roots() -> tuple[str, ...]:
    """Folders of installed code: the standard library and every site-packages folder."""
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
    return tuple(sorted(os.path.realpath(r) + os.sep for r in roots if r))


def is_user_code(module: Any) -> bool:
    """Whether the code of the module named ``module`` is the user's (followed into): not the
    standard library, not an installed package (their globals may be per-process, e.g. a session
    id) and not one of :data:`_LIBRARIES`; a module with no file (built in memory) is the user's."""
    if not isinstance(module, str) or not module:
        return False
    top = module.split(".", 1)[0]
    if top in _LIBRARIES or top in sys.stdlib_module_names:
        return False
    path = getattr(sys.modules.get(module), "__file__", None)
    return not isinstance(path, str) or not os.path.realpath(path).startswith(_installed_roots())


def _immutable_plain(value: Any, depth: int = 0) -> str | None:
    """:func:`_plain` of a value that cannot change in place (numbers, strings, their tuples):
    a module-level counter dict is left out, or every call would change the print."""
    if isinstance(value, _PLAIN):
        return repr(value)
    if depth < 3 and isinstance(value, tuple):
        items = [_immutable_plain(v, depth + 1) for v in value]
        return None if None in items else f"tuple({', '.join(items)})"  # type: ignore[arg-type]
    if depth < 3 and isinstance(value, frozenset):
        return _const_text(value)
    return None


def _update_globals(h: Any, code: types.CodeType, globals_: dict[str, Any], depth: int, seen: set[int]) -> None:
    """What user code's global names (``co_names``) of ``code`` and its nested code refer to: the
    value of an immutable constant or tensor, and the code of a user function or class it calls
    (followed in turn), so a changed helper ``forward`` calls, or a module constant it reads,
    changes the print. Library functions and mutable globals (counters) are not followed."""
    for name in code.co_names:
        if name not in globals_:
            continue
        value = globals_[name]
        plain = _immutable_plain(value)
        if plain is not None:
            h.update(f"global|{name}={plain};".encode())
        elif isinstance(value, Tensor):
            _update_tensor(h, f"global|{name}", value)
        elif isinstance(value, types.FunctionType) and is_user_code(value.__module__) and depth < 8:
            if id(value.__code__) not in seen:
                seen.add(id(value.__code__))
                h.update(f"global|{name}|{value.__module__}.{value.__qualname__}|".encode())
                _update_code(h, value.__code__, 0, value.__globals__, depth + 1, seen)
                for d in (value.__defaults__ or ()):
                    _update_value(h, d, 1)
        elif isinstance(value, type) and is_user_code(value.__module__) and id(value) not in seen:
            seen.add(id(value))
            h.update(f"global|{name}|{_class_code(value, depth + 1, seen)}|".encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _update_globals(h, c, globals_, depth, seen)


def _update_code(h: Any, code: types.CodeType, depth: int = 0, globals_: dict[str, Any] | None = None,
                 follow: int = 0, seen: set[int] | None = None) -> None:
    """The bytecode, names and constants of ``code`` (and its nested code); with ``globals_``
    (the function's ``__globals__``, user code only) also what its global names refer to
    (:func:`_update_globals`; ``follow`` counts the functions followed so far)."""
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            if depth < 8:
                _update_code(h, c, depth + 1)
        else:
            h.update(_const_text(c).encode())
    if globals_ is not None and depth == 0:
        _update_globals(h, code, globals_, follow, seen if seen is not None else {id(code)})


def _user_globals(fn: types.FunctionType) -> dict[str, Any] | None:
    """``fn.__globals__`` when ``fn`` is user code (its globals are followed), else None."""
    return fn.__globals__ if is_user_code(fn.__module__) else None


def _update_callable(h: Any, fn: Any, depth: int = 0) -> None:
    if depth > 4:
        h.update(b"<deep>")
        return
    if isinstance(fn, functools.partial):
        h.update(b"partial|")
        _update_callable(h, fn.func, depth + 1)
        for a in (*fn.args, *sorted(fn.keywords.items())):
            _update_value(h, a, depth + 1)
        return
    if isinstance(fn, types.MethodType):
        _update_callable(h, fn.__func__, depth + 1)
        _update_value(h, fn.__self__, depth + 1)
        return
    h.update(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}|".encode())
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        _update_code(h, code, globals_=_user_globals(fn) if isinstance(fn, types.FunctionType) else None)
        for d in (getattr(fn, "__defaults__", None) or ()):
            _update_value(h, d, depth + 1)
        for cell in (getattr(fn, "__closure__", None) or ()):
            try:
                _update_value(h, cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                h.update(b"<empty>")
    elif not isinstance(fn, (types.BuiltinFunctionType, type)) and callable(fn):
        # a callable object: its class's __call__ and its plain attributes
        _update_callable(h, type(fn).__call__, depth + 1)
        _update_value(h, fn, depth + 1)


def _update_value(h: Any, value: Any, depth: int = 0) -> None:
    plain = _plain(value)
    if plain is not None:
        h.update(plain.encode() + b";")
    elif isinstance(value, Tensor):
        _update_tensor(h, "", value)
    elif isinstance(value, nn.Module):
        h.update(model_fingerprint(value).encode())
    elif callable(value) and not isinstance(value, type):
        _update_callable(h, value, depth + 1)
    else:
        _update_object(h, value, depth)


def _update_object(h: Any, value: Any, depth: int = 0) -> None:
    """Another object (a config, a namespace): its type and plain attributes, a dataclass's
    fields too (a dict that changes between calls, like a counter, changes the print:
    conservative)."""
    h.update(f"<{type(value).__module__}.{type(value).__qualname__}>".encode())
    attrs = getattr(value, "__dict__", None)
    items = dict(attrs) if isinstance(attrs, dict) else {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items.update({f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)})
    if depth < 4:
        for k, v in sorted(items.items()):
            p = _plain(v)
            if p is not None:
                h.update(f"{k}={p};".encode())


def _class_code(cls: type, follow: int = 0, seen: set[int] | None = None) -> str:
    """sha256 of the bytecode of every function defined on ``cls`` and its bases below nn.Module
    (of user code, with what its global names refer to: :func:`_update_globals`)."""
    h = hashlib.sha256()
    seen = seen if seen is not None else set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        h.update(f"{klass.__module__}.{klass.__qualname__}|".encode())
        for name, attr in sorted(vars(klass).items()):
            fn = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            if isinstance(fn, property):
                fn = fn.fget
            if isinstance(fn, types.FunctionType):
                h.update(name.encode())
                seen.add(id(fn.__code__))
                _update_code(h, fn.__code__, 0, _user_globals(fn), follow, seen)
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of ``model``'s weights, buffers and structure (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_fingerprint needs an nn.Module, got {type(model).__name__}")
    h = hashlib.sha256()
    classes: dict[type, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        cls = type(m)
        if cls not in classes:
            classes[cls] = _class_code(cls)
        h.update(f"module|{name}|{cls.__module__}.{cls.__qualname__}|{classes[cls]}|{m.extra_repr()}|".encode())
        for k, v in sorted(vars(m).items()):
            if k.startswith("_") or k == "training":
                continue
            p = _plain(v)
            if p is not None:
                h.update(f"{k}={p};".encode())
            elif isinstance(v, Tensor):  # a tensor kept as a plain attribute, not a buffer
                _update_tensor(h, f"attr|{name}.{k}", v)
            elif isinstance(v, (list, tuple)) and v and all(isinstance(t, Tensor) for t in v):
                for i, t in enumerate(v):
                    _update_tensor(h, f"attr|{name}.{k}[{i}]", t)
            elif not (callable(v) or isinstance(v, (nn.Module, types.ModuleType))):
                h.update(f"attr|{k}|".encode())  # a settings object the forward reads (a config dataclass)
                _update_object(h, v)
    for name, p in model.named_parameters(remove_duplicate=False):
        _update_tensor(h, f"param|{name}", p)
    for name, b in model.named_buffers(remove_duplicate=False):
        _update_tensor(h, f"buffer|{name}", b)
    return h.hexdigest()


def data_fingerprint(inputs: Iterable[Tensor], targets: Tensor | None) -> str:
    """sha256 of the input tensors and the targets (dtype, shape and bytes of each)."""
    h = hashlib.sha256()
    for i, t in enumerate(inputs):
        _update_tensor(h, f"input{i}", t)
    if targets is None:
        h.update(b"no targets")
    else:
        _update_tensor(h, "targets", targets)
    return h.hexdigest()


def callable_fingerprint(fn: Any) -> str:
    """sha256 of a function (or partial, method or callable object): its name, bytecode,
    defaults and closure values."""
    h = hashlib.sha256()
    _update_callable(h, fn)
    return h.hexdigest()


def metric_fingerprint(metric: Any) -> str:
    """sha256 of a :class:`abfp.zoo.Metric`: its name, kind, direction, unit, function and
    per-sample function (it gives the standard errors a cached run holds)."""
    h = hashlib.sha256()
    for field in ("name", "kind", "higher_is_better", "unit"):
        h.update(f"{field}={getattr(metric, field, None)!r};".encode())
    h.update(callable_fingerprint(getattr(metric, "fn", metric)).encode())
    per_sample = getattr(metric, "per_sample", None)
    h.update(b"per_sample|" + (b"none" if per_sample is None else callable_fingerprint(per_sample).encode()))
    return h.hexdigest()
