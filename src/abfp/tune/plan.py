"""``DevicePlan``: one base device plus a config per module, as JSON, and the model it converts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .. import jsonio
from ..config import ABFPConfig, ExecutionOptions

__all__ = ["DevicePlan", "PLAN_FORMAT"]

#: The ``format`` tag of a plan's JSON (refused if another).
PLAN_FORMAT = "abfp-device-plan/1"


@dataclass
class DevicePlan:
    """A device per module: ``base`` for every product, ``modules[name]`` for the named
    modules (exact module names, as ``model.named_modules()`` gives them; a module's config is
    inherited by its submodules that have none of their own). ``exclude``: module names kept
    digital. ``info``: free JSON-able notes (stages, metrics, energies)."""

    base: ABFPConfig
    modules: dict[str, ABFPConfig] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.base, ABFPConfig):
            raise TypeError(f"DevicePlan.base must be an ABFPConfig, got {type(self.base).__name__}")
        if not isinstance(self.modules, Mapping):
            raise TypeError(f"DevicePlan.modules must be a mapping, got {type(self.modules).__name__}")
        for name, cfg in self.modules.items():
            if not isinstance(name, str):
                raise TypeError(f"DevicePlan.modules: module names must be strings, got {name!r}")
            if not isinstance(cfg, ABFPConfig):
                raise TypeError(f"DevicePlan.modules[{name!r}] must be an ABFPConfig, got {type(cfg).__name__}")
        self.modules = dict(self.modules)
        self.exclude = tuple(self.exclude)

    # ------------------------------------------------------------------ use
    def overrides(self) -> dict[str, ABFPConfig]:
        """``{regex: config}`` for :func:`abfp.convert` (module names escaped: exact matches)."""
        return {re.escape(name): cfg for name, cfg in self.modules.items()}

    def config_for(self, name: str) -> ABFPConfig:
        """The config of module ``name`` (its own, else the nearest parent's, else ``base``)."""
        while True:
            if name in self.modules:
                return self.modules[name]
            if not name:
                return self.base
            name = name.rpartition(".")[0]

    def check(self, model: nn.Module) -> None:
        """Raise ValueError when this plan does not apply to ``model``: a module it names is
        missing, or names only modules that make no product (as :func:`abfp.convert` refuses)."""
        from ..nn.convert import check_patterns

        names = {n for n, _ in model.named_modules()}
        missing = sorted(set(self.modules) - names)
        if missing:
            raise ValueError(f"DevicePlan names module(s) the model does not have: {missing[:3]}")
        check_patterns(model, exclude=[re.escape(e) for e in self.exclude], overrides=self.overrides())

    def convert(self, model: nn.Module, *, inplace: bool = False, execution: ExecutionOptions | None = None) -> nn.Module:
        """``model`` converted to run on this plan's devices (a copy unless ``inplace``);
        ``execution``: how every product runs (kernel, noise seed; ``None``: each config's own)."""
        from ..nn import convert

        self.check(model)
        return convert(model, self.base, exclude=[re.escape(e) for e in self.exclude],
                       overrides=self.overrides(), inplace=inplace, execution=execution)

    def with_seed(self, seed: int | None) -> "DevicePlan":
        """The same plan with every config's noise seed set to ``seed``."""
        return DevicePlan(self.base.replace(seed=seed), {k: v.replace(seed=seed) for k, v in self.modules.items()},
                          self.exclude, dict(self.info))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        base = self.base.to_dict(execution=True)
        # per module only the fields that differ from the base: a short, readable plan
        mods = {name: {k: v for k, v in cfg.to_dict(execution=True).items() if base.get(k) != v}
                for name, cfg in self.modules.items()}
        return {"format": PLAN_FORMAT, "base": base, "modules": mods, "exclude": list(self.exclude),
                "info": self.info}

    @classmethod
    def from_dict(cls, d: Any) -> "DevicePlan":
        if not isinstance(d, dict):
            raise ValueError(f"a DevicePlan needs a JSON object, got {type(d).__name__}")
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a device plan: format is {d.get('format')!r}, expected {PLAN_FORMAT!r}")
        unknown = sorted(set(d) - {"format", "base", "modules", "exclude", "info"})
        if unknown:
            raise ValueError(f"unknown DevicePlan field(s) {unknown}")
        base = ABFPConfig.from_dict(d.get("base", {}))
        mods = d.get("modules", {})
        if not isinstance(mods, dict):
            raise ValueError("DevicePlan 'modules' must be a JSON object of module name -> config fields")
        modules = {}
        for name, changes in mods.items():
            if not isinstance(changes, dict):
                raise ValueError(f"DevicePlan module {name!r}: needs a JSON object of config fields")
            try:
                modules[name] = ABFPConfig.from_dict({**base.to_dict(execution=True), **changes})
            except ValueError as e:
                raise ValueError(f"DevicePlan module {name!r}: {e}") from None
        exclude = d.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
            raise ValueError("DevicePlan 'exclude' must be a list of module names")
        info = d.get("info", {})
        if not isinstance(info, dict):
            raise ValueError(f"DevicePlan 'info' must be a JSON object, got {type(info).__name__}")
        weights = info.get("weights")
        if weights is not None and not (isinstance(weights, dict) and isinstance(weights.get("architecture"), str)):
            # the record the architecture check reads: damaged, it must not let any model pass
            raise ValueError("DevicePlan info 'weights' must be a JSON object with the 'architecture' fingerprint "
                             "abfp tune wrote (or be left out of a plan written by hand)")
        return cls(base, modules, tuple(exclude), info)

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 1) -> str:
        return jsonio.dump(self.to_dict(), path, indent=indent)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "DevicePlan":
        """Parse a JSON string, or read a ``.json`` file when given a path that exists."""
        return cls.from_dict(jsonio.load(text_or_path, "a DevicePlan"))

    def summary(self) -> str:
        """One line per module: its gain and repeats."""
        lines = [f"base: {self.base.label()}"]
        for name, cfg in self.modules.items():
            lines.append(f"  {name:<48} G={cfg.gain:g} k={cfg.repeats}")
        return "\n".join(lines)
