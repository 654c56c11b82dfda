r"""What a converted model carries: per-module configs, noise generators, calibration, records.

One :class:`AnalogState` hangs off the root module of a converted model as ``abfp_state``.
Products are identified by *site*: ``"<module name>:<op><index>"``, the index counting the
products of that kind inside one call of the module (``"fc1:linear0"``,
``"encoder.layer.0.attention.self:matmul1"``).

Which config a product runs with (:meth:`AnalogState.config_for_site`), most specific first:

1. a *site override*: an override whose pattern names product sites (``"attn:matmul1"``, or a
   regex over site names such as ``r".*attention\.self:matmul1"``): the last one that matches;
2. else its module's config (:meth:`AnalogState.resolve`): the last *module override* that
   matches the module name, else ``None`` (digital) if the module is excluded, else the
   parent module's config, else the base config.

An override pattern is a site pattern when it contains ``":"`` and matches no module name.
A site override wins over ``exclude`` as a module override does: the product it names runs on
the device with its config while the other products of the excluded module stay digital
(:attr:`AnalogState.reincluded` lists the excluded modules a site override reaches). Which
products a module makes is decided by the module's config: ``recurrent_concat`` of a recurrent
layer is read from it, not from a site override.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..config import ABFPConfig
from ..noise_keys import NoiseStreams, product_generator
from ..ops.coverage import Coverage
from ..ops.site import SiteRecord  # noqa: F401  (re-exported: it lived here)


class OverrideWarning(UserWarning):
    """An override of :func:`abfp.convert` that sets nothing: a product site pattern that none of
    its module's products matched."""


def _matches(name: str, pattern: str) -> bool:
    if name == pattern:
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


@dataclass
class AnalogState:
    """Conversion state of one model."""

    config: ABFPConfig
    exclude: tuple[str, ...] = ()
    overrides: dict[str, ABFPConfig] = field(default_factory=dict)
    module_configs: dict[str, ABFPConfig | None] = field(default_factory=dict)
    include_matmul: bool = True
    # fixed-point calibration: site -> (input scale, second operand scale or None)
    input_scales: dict[str, list[float]] = field(default_factory=dict)
    calibrating: bool = False
    calibration_percentile: float = 100.0
    # recording for summary(): site -> SiteRecord
    recording: bool = False
    # while recording: also run each product's float32 reference for its relative error
    record_errors: bool = True
    records: dict[str, SiteRecord] = field(default_factory=dict)
    # site (or "*") -> fn(call: abfp.ops.site.ProductCall) -> Tensor: replaces how the product is
    # computed (DNF sampling, dynamic-precision noise, recording); runs only in analog modules. A site
    # that no product of the model is (nor an interceptor's per_site key) is an error (check_interceptor_site)
    interceptors: dict[str, Any] = field(default_factory=dict)
    # MACs computed on the device and in float32 (see abfp.ops.coverage)
    coverage: Coverage = field(default_factory=Coverage)
    # the device-noise streams of this model (see abfp.noise_keys)
    streams: NoiseStreams = field(default_factory=NoiseStreams)
    # the overrides that name product sites (see the module docstring), split off by resolve()
    site_overrides: dict[str, ABFPConfig] = field(default_factory=dict)
    # excluded modules (config None) whose products a site override may name: their products go
    # through the product families, each site then digital unless an override names it
    reincluded: frozenset[str] = frozenset()
    # products answered without interception where they need none (abfp.nn.mode.DirectSites; DNF
    # training sets it): set by whoever set the interceptor, not copied
    direct: Any = None
    # site -> its site override (None: none matches), filled as products run
    _site_cache: dict[str, ABFPConfig | None] = field(default_factory=dict, repr=False)
    # site overrides not yet seen to match a site nor reported as matching none (check_site_overrides)
    _unsettled: set[str] = field(default_factory=set, repr=False)
    # the interceptors as last checked (check_interceptor_site), the sites they name not yet seen made,
    # and the sites each module made in this forward while some are pending
    _interceptors_checked: tuple = field(default=(), repr=False)
    _pending_sites: set[str] = field(default_factory=set, repr=False)
    _made: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def resolve(self, names: list[str]) -> None:
        """Config of every module: overrides win, then exclusion, else the parent's config;
        overrides that name product sites (not modules) are kept apart for
        :meth:`config_for_site`."""
        self.module_configs.clear()
        self._site_cache.clear()
        self.site_overrides = {p: c for p, c in self.overrides.items() if is_site_pattern(p, names)}
        self._unsettled = set(self.site_overrides)
        module_overrides = [(p, c) for p, c in self.overrides.items() if p not in self.site_overrides]
        for name in names:
            parent = name.rpartition(".")[0] if "." in name else ("" if name else None)
            cfg: ABFPConfig | None = self.config if parent is None else self.module_configs.get(parent, self.config)
            if any(_matches(name, p) for p in self.exclude):
                cfg = None
            for pattern, ocfg in module_overrides:
                if _matches(name, pattern):
                    cfg = ocfg
            self.module_configs[name] = cfg
        self.reincluded = frozenset(n for n, c in self.module_configs.items() if c is None and any(
            site_pattern_names_a_module(p, [n]) for p in self.site_overrides))

    def config_for(self, module_name: str) -> ABFPConfig | None:
        """The config of a module's products (``None``: digital), site overrides aside."""
        return self.module_configs.get(module_name, self.config)

    def config_for_site(self, module_name: str, site: str) -> ABFPConfig | None:
        """The config of the product at ``site`` of module ``module_name``: the last site
        override matching ``site``, else the module's config (see the module docstring)."""
        if not self.site_overrides:
            return self.config_for(module_name)
        if site not in self._site_cache:
            found = None
            for pattern, ocfg in self.site_overrides.items():
                if _matches(site, pattern):
                    found = ocfg
                    self._unsettled.discard(pattern)
            self._site_cache[site] = found
        found = self._site_cache[site]
        return self.config_for(module_name) if found is None else found

    def check_site_overrides(self) -> None:
        """After a whole forward: warn (:class:`OverrideWarning`, once per override) about each site
        override that matched none of the products its module made (``"fc:linear1"`` where ``fc``
        made only ``fc:linear0``), naming the sites the module did make; an override whose module
        has not run yet is checked after a later forward."""
        ran: dict[str, list[str]] = {}
        for site in self._site_cache:
            ran.setdefault(site.rpartition(":")[0], []).append(site)
        for pattern in sorted(self._unsettled):
            hit = [m for m in ran if site_pattern_names_a_module(pattern, [m])]
            if hit:
                self._unsettled.discard(pattern)
                made = [s for m in hit for s in ran[m]]
                warnings.warn(f"abfp: override {pattern!r} matched no product site: module(s) {hit[:3]} ran and made "
                              f"{made[:6]}{' ...' if len(made) > 6 else ''} (abfp.summary lists every site); "
                              "this override sets nothing", OverrideWarning, stacklevel=3)

    def check_interceptor_site(self, site: str, cfg: ABFPConfig | None) -> None:
        """Before the product ``site`` runs (``interceptors`` not empty): every site the interceptors
        name (a key other than ``"*"``, a key of an interceptor's ``per_site``) must belong to a module
        of the model and to an analog one, and an interceptor installed for one site may name no other
        in ``per_site``; a clear error where not (it would never run). Whether the named sites exist
        is settled by :meth:`check_interceptor_sites` after the forward."""
        now = tuple((k, id(v), tuple(getattr(v, "per_site", None) or ())) for k, v in self.interceptors.items())
        if now != self._interceptors_checked:
            self._interceptors_checked = ()
            self._pending_sites = set()
            for key, _, per_site in now:
                named = ([] if key == "*" else [key]) + list(per_site)
                for s in named:
                    if not isinstance(s, str) or ":" not in s or s.rpartition(":")[0] not in self.module_configs:
                        raise ValueError(f"abfp: interceptor site {s!r} names no module of this model: sites are "
                                         "'<module>:<op><index>', as abfp.summary lists them (or '*' for every product)")
                    module = s.rpartition(":")[0]
                    if self.module_configs[module] is None and module not in self.reincluded:
                        raise ValueError(self._excluded_site(s))
                    if key != "*" and s != key:
                        raise ValueError(f"abfp: the interceptor for site {key!r} names site {s!r} in its per_site, "
                                         f"which it never sees (install it under '*' to reach both)")
                self._pending_sites.update(named)
            self._interceptors_checked = now
        if site in self._pending_sites and cfg is None:
            raise ValueError(self._excluded_site(site))
        if self._pending_sites:
            self._made.setdefault(site.rpartition(":")[0], []).append(site)

    @staticmethod
    def _excluded_site(site: str) -> str:
        return (f"abfp: interceptor site {site!r} is a product of an excluded (digital) module, which no interceptor "
                "sees; a site override in abfp.convert brings it back to the device")

    def check_interceptor_sites(self) -> None:
        """After a whole forward: a site an interceptor names whose module ran without making it is a
        clear error naming the sites the module made; one whose module has not run yet is checked
        after a later forward."""
        made, self._made = self._made, {}
        seen = {s for sites in made.values() for s in sites}
        self._pending_sites -= seen
        for site in sorted(self._pending_sites):
            sites = made.get(site.rpartition(":")[0])
            if sites:
                raise ValueError(f"abfp: interceptor site {site!r} matched no product: module "
                                 f"{site.rpartition(':')[0]!r} ran and made {sites[:6]}{' ...' if len(sites) > 6 else ''} "
                                 "(abfp.summary lists every site)")

    def generator(self, cfg: ABFPConfig, device: torch.device) -> torch.Generator | None:
        """The noise stream of a product with ``cfg`` (:func:`abfp.noise_keys.product_generator`):
        one per device and seed, started at ``(seed * 1_000_003 + offset) mod 2^63`` and continued
        by every product of the model; ``None`` (torch's global generator) without seed or noise."""
        return product_generator(cfg, self.streams, device)

    def reseed(self, offset: int = 0) -> None:
        """Restart every noise stream (at ``seed * 1_000_003 + offset``): the next run repeats exactly."""
        self.streams.restart(offset)

    def _not_copied(self) -> dict[str, Any]:
        """What a copy (deep copy, pickle, ``torch.save``) starts afresh: no recordings, no
        interceptors or direct sites, zero coverage counts, an empty site cache, noise streams not yet drawn."""
        return dict(records={}, interceptors={}, direct=None, coverage=Coverage(), _site_cache={},
                    _interceptors_checked=(), _pending_sites=set(), _made={},
                    _unsettled=set(self.site_overrides), streams=self.streams.fresh())

    def __deepcopy__(self, memo: dict) -> "AnalogState":
        new = copy.copy(self)
        new.exclude = tuple(self.exclude)
        new.overrides = dict(self.overrides)
        new.module_configs = dict(self.module_configs)
        new.site_overrides = dict(self.site_overrides)
        new.input_scales = {k: list(v) for k, v in self.input_scales.items()}
        new.__dict__.update(self._not_copied())
        return new

    def __getstate__(self) -> dict[str, Any]:
        """Pickled as a deep copy is made (:meth:`_not_copied`): a saved converted model loads with its
        configs, overrides and calibration, and fresh noise streams."""
        return {**self.__dict__, **self._not_copied()}


def is_site_pattern(pattern: str, names: list[str]) -> bool:
    """Whether an override ``pattern`` names product sites rather than modules: it contains
    ``":"`` (sites are ``"<module>:<op><index>"``) and matches none of the module ``names``."""
    return ":" in pattern and not any(_matches(n, pattern) for n in names)


def site_pattern_names_a_module(pattern: str, names: list[str]) -> bool:
    r"""Whether the part of a site ``pattern`` before one of its ``":"`` matches a module name
    (``"attn:matmul1"``: module ``attn``; ``r".*\.self:matmul\d"``: any module ending in ``.self``)."""
    cuts = [i for i, ch in enumerate(pattern) if ch == ":"]
    return any(_matches(n, pattern[:i]) for i in cuts for n in names)


def normalise_overrides(overrides: Mapping[str, ABFPConfig] | None) -> dict[str, ABFPConfig]:
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a mapping of module name or pattern -> ABFPConfig, got "
                        f"{type(overrides).__name__}")
    out: dict[str, ABFPConfig] = {}
    for k, v in (overrides or {}).items():
        if not isinstance(v, ABFPConfig):
            raise TypeError(f"override for {k!r} must be an ABFPConfig, got {type(v).__name__}")
        out[str(k)] = v
    return out
