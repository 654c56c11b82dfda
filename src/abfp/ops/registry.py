"""Where product families register how the device answers a torch function.

A *product family* (linear and matmul, convolutions, recurrent layers, ...) is one module of
:mod:`abfp.ops`. It tells :class:`abfp.nn.mode.AnalogMode` which torch functions it answers by
decorating a handler::

    @register(torch.lstm)
    def _lstm(frame, func, args, kwargs):
        ...                       # compute with abfp.ops.site.run_product(...) per product
        return output

A handler receives the innermost running module's frame (:class:`abfp.ops.site.Frame`: its
name, its :class:`~abfp.nn.state.AnalogState`, and the site counter) and the intercepted
call, and returns what ``func(*args, **kwargs)`` would. Each analog product it computes goes
through :func:`abfp.ops.site.run_product`, which picks the site's config, does calibration,
interceptors (DNF, dynamic precision noise), recording for ``summary`` and energy, and the
device call: a family never re-implements those.

Adding a family is one new module in ``abfp/ops/`` and one import line in
``abfp/ops/__init__.py``.
"""

from __future__ import annotations

from typing import Any, Callable

Handler = Callable[[Any, Callable, tuple, dict], Any]

_HANDLERS: dict[Any, Handler] = {}


#: functions seen inside a converted module that are neither registered products nor product-like
#: calls without an analog model (:func:`abfp.ops.coverage.no_analog_model`): the function mode
#: answers them at once (filled by :class:`abfp.nn.mode.AnalogMode`, emptied by :func:`register`)
PLAIN: set[Any] = set()


def register(*funcs: Any) -> Callable[[Handler], Handler]:
    """Decorator: ``handler`` answers each of ``funcs`` inside converted modules."""

    def deco(handler: Handler) -> Handler:
        for f in funcs:
            if f in _HANDLERS and _HANDLERS[f] is not handler:
                raise RuntimeError(f"abfp: two product families register {getattr(f, '__name__', f)}")
            _HANDLERS[f] = handler
        PLAIN.clear()
        return handler

    return deco


def handler_for(func: Any) -> Handler | None:
    """The registered handler of ``func``, or None."""
    return _HANDLERS.get(func)


def registered() -> dict[Any, Handler]:
    """A copy of the registry (for tests and docs)."""
    return dict(_HANDLERS)


def size() -> int:
    """How many functions are registered (grows as families register; cheap to ask)."""
    return len(_HANDLERS)
