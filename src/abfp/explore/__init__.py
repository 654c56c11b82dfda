"""``abfp explore``: design the device, the cheapest converters and tiles that keep a model on target.

``abfp.explore(task, ...)`` (this package is callable: it is :func:`abfp.explore.api.explore`)
searches fixed point and ABFP at several tile widths, bisects the ADC bits then the DAC bits of
each family, picks the gain (the best of a ladder, or one per layer), prices every design with
:mod:`abfp.energy` and returns every evaluated design, the Pareto frontier of metric against
energy and the cheapest design of each family that meets the target. Modules: ``bisect``
(the bit search), ``designs``, ``costs`` (energy), ``target``, ``pareto``, ``search``, ``api``,
``report`` (table and Pareto plot), ``cli``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .api import explore, resolve_task
from .bisect import smallest_passing
from .costs import CostModel
from .designs import Design, family_name
from .pareto import pareto_front
from .search import SearchSpace, explore_model
from .target import Target

__all__ = ["CostModel", "Design", "SearchSpace", "Target", "explore", "explore_model", "family_name",
           "pareto_front", "resolve_task", "smallest_passing"]


class _CallableModule(types.ModuleType):
    """``abfp.explore(...)`` calls :func:`explore`, while ``abfp.explore.search`` stays a module."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return explore(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
