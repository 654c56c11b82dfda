"""Energy-aware gains (and repeats): the least energy per inference that reaches a target.

The error rule (:mod:`.gains`) gives every layer the gain of its least output error; a gain
``G`` costs ``G`` times the analog energy, so that is rarely the cheapest way to a target. This
rule spends energy where it buys the most metric per picojoule (a greedy knapsack over the
layers' candidate settings):

1. **Errors** (one calibration pass with the device noise, upstream layers on the device at
   their least-error gain, as in the error rule): at every product, for every candidate gain
   ``G``, the relative error of the noise-free device product ``q_i(G)`` and of its noise
   ``v_i(G)`` (noisy minus noise-free), both against float32 on the same inputs. With ``k``
   repeats the noise std falls by ``sqrt(k)``: ``e_i(G, k)**2 = q_i(G)**2 + v_i(G)**2 / k``.
   A module with several products sums their squared errors.
2. **Sensitivity** (one float32 forward per module): the metric's loss when only module ``i``
   gets Gaussian noise of relative size ``delta_i`` (its least error over the gains), ``s_i =
   loss / delta_i**2``; the model predicts ``loss = sum_i s_i e_i**2`` (independent small errors).
   A coarse metric (top-1 on a few calibration inputs) may not move at all under so small a
   perturbation: such a module's ``s_i`` is its relative squared output error ``r_i / delta_i**2``
   (``r_i = |y - y_fp32|**2 / |y_fp32|**2`` over the model's outputs) times the median ratio
   ``s_j / (r_j / delta_j**2)`` of the modules where both are positive (1 if none is), so a
   module that does change the outputs is never treated as free.
3. **Energy** per module and setting, ``E_i(G, k)`` (:func:`abfp.energy.row_cost`).
4. **Path**: every module starts at its cheapest setting; then, again and again, the module
   whose next setting on the lower convex hull of its ``(E_i, s_i e_i**2)`` points buys the most
   predicted loss per unit energy is moved to it (the Lagrangian solutions ``min s_i e_i**2 +
   lam E_i`` for decreasing ``lam``, one change at a time), up to the least-error settings.
5. **Search**: a bisection along that path for the cheapest plan that reaches the target on the
   calibration inputs (same noise seed every trial). The predicted loss only orders the path;
   the target is checked on the real model. With an energy ``budget`` (times the single-gain
   energy) instead: the last plan on the path within it (the least predicted loss it buys).
   Where the chosen plan misses the target and the base config (every module at its gain,
   ``k = 1``) scores better on the calibration inputs, the base config is returned instead.
6. **Refine** (optional, ``refine``): the predicted loss can misjudge a module, so the few
   modules of largest predicted loss are checked on the model itself (:mod:`.refine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..config import ABFPConfig
from ..energy import EnergyParams, row_cost
from ..nn import convert, summary, to_digital
from .gains import _as_tuple, _check_candidates, intercepted_forward, scored_output
from .refine import refine_settings

__all__ = ["Setting", "LayerProfile", "profile_layers", "sensitivities", "layer_energies", "allocation_path",
           "search_path", "Allocation", "repeat_options", "fill_budget"]

#: ``(gain, repeats)`` of one module.
Setting = tuple[float, int]


def repeat_options(max_repeats: int) -> list[int]:
    """``1, 2, 4, ...`` up to ``max_repeats``."""
    if isinstance(max_repeats, bool) or not isinstance(max_repeats, int) or max_repeats < 1:
        raise ValueError(f"max_repeats must be an integer >= 1, got {max_repeats!r}")
    out, k = [], 1
    while k <= max_repeats:
        out.append(k)
        k *= 2
    return out


@dataclass
class LayerProfile:
    """Per module and candidate gain: squared relative errors of the noise-free product
    (``quant[m][G]``) and of the noise (``noise[m][G]``); the least-error gain ``best[m]``."""

    quant: dict[str, dict[float, float]] = field(default_factory=dict)
    noise: dict[str, dict[float, float]] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)

    def error_sq(self, module: str, setting: Setting) -> float:
        g, k = setting
        return self.quant[module][g] + self.noise[module][g] / k


def _sq(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    r = ref.detach().double()
    return float(((y.detach().double() - r) ** 2).sum()), float((r * r).sum())


class _Profiler:
    """Interceptor: every candidate gain at every product, noise-free and noisy; the model
    continues with the module's least-error (noisy) product."""

    def __init__(self, candidates: Sequence[float]) -> None:
        self.candidates = list(candidates)
        self.num: dict[str, dict[float, list[float]]] = {}  # module -> G -> [quant num, noise num, total num]
        self.den: dict[str, float] = {}
        self.best: dict[str, float] = {}

    def __call__(self, call: Any) -> torch.Tensor:
        module = call.site.rsplit(":", 1)[0]
        ref = call.digital()
        acc = self.num.setdefault(module, {c: [0.0, 0.0, 0.0] for c in self.candidates})
        outs = {}
        den = 0.0
        for c in self.candidates:
            cfg = call.config.replace(gain=c)
            clean = call.analog(cfg.replace(noise_std=0.0))
            noisy = call.analog(cfg)
            q, den = _sq(clean, ref)
            acc[c][0] += q
            acc[c][1] += _sq(noisy, clean)[0]
            acc[c][2] += _sq(noisy, ref)[0]
            outs[c] = noisy
        self.den[module] = self.den.get(module, 0.0) + den
        if module not in self.best:
            self.best[module] = min(self.candidates, key=lambda c: acc[c][2])
        return outs[self.best[module]]


@torch.no_grad()
def profile_layers(model: nn.Module, inputs: tuple[torch.Tensor, ...], config: ABFPConfig,
                   candidates: Sequence[float], *, exclude: Sequence[str] = (), seed: int = 0) -> LayerProfile:
    """:class:`LayerProfile` of the float32 ``model`` (not modified) on one calibration batch."""
    cands = _check_candidates(candidates)
    inputs = _as_tuple(inputs)
    m = convert(model, config if config.seed is not None else config.replace(seed=seed), exclude=exclude).eval()
    prof = _Profiler(cands)
    intercepted_forward(m, inputs, prof)
    out = LayerProfile(best=dict(prof.best))
    for mod, acc in prof.num.items():
        den = prof.den[mod]
        out.quant[mod] = {c: (v[0] / den if den > 0 else 0.0) for c, v in acc.items()}
        out.noise[mod] = {c: (v[1] / den if den > 0 else 0.0) for c, v in acc.items()}
    return out


class _Perturb:
    """Interceptor: float32 products; those of ``module`` get Gaussian noise of relative size
    ``delta`` (per product, of its RMS)."""

    def __init__(self, module: str, delta: float, generator: torch.Generator) -> None:
        self.module, self.delta, self.generator = module, delta, generator

    def __call__(self, call: Any) -> torch.Tensor:
        y = call.digital()
        if call.site.rsplit(":", 1)[0] != self.module:
            return y
        rms = float(y.detach().double().pow(2).mean().sqrt())
        noise = torch.randn(y.shape, generator=self.generator, dtype=torch.float64).to(y.dtype)
        return y + noise * (self.delta * rms)


def _output_error_sq(y: Any, ref: Any) -> float:
    """``|y - ref|**2 / |ref|**2`` over every floating-point tensor of a model's outputs."""
    num = den = 0.0
    for a, b in zip(tree_leaves(y), tree_leaves(ref)):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and b.is_floating_point():
            n, d = _sq(a, b)
            num, den = num + n, den + d
    return num / den if den > 0 else 0.0


@torch.no_grad()
def sensitivities(model: nn.Module, inputs: tuple[torch.Tensor, ...], config: ABFPConfig,
                  deltas: Mapping[str, float], loss: Callable[[torch.Tensor], float], *,
                  exclude: Sequence[str] = (), seed: int = 0) -> dict[str, float]:
    """``s_i = loss(outputs with module i perturbed by relative noise delta_i) / delta_i**2``
    (every other product in float32); ``loss(outputs)`` is the metric's loss against float32.
    Where that loss is not positive, the scaled output-error sensitivity of the module docstring."""
    inputs = _as_tuple(inputs)
    ref = scored_output(model(*inputs))
    m = convert(model, config, exclude=exclude).eval()
    metric_s: dict[str, float] = {}
    output_s: dict[str, float] = {}
    try:
        for module, delta in deltas.items():
            if delta <= 0:
                metric_s[module] = output_s[module] = 0.0
                continue
            y = intercepted_forward(m, inputs, _Perturb(module, delta, torch.Generator().manual_seed(seed)))
            metric_s[module] = max(0.0, float(loss(y))) / (delta * delta)
            output_s[module] = _output_error_sq(y, ref) / (delta * delta)
    finally:
        to_digital(m)
    both = sorted(metric_s[k] / output_s[k] for k in metric_s if metric_s[k] > 0 and output_s[k] > 0)
    scale = both[len(both) // 2] if both else 1.0
    return {k: v if v > 0 else scale * output_s[k] for k, v in metric_s.items()}


def layer_energies(converted: nn.Module, inputs: tuple[torch.Tensor, ...], settings: Sequence[Setting],
                   params: EnergyParams | None = None) -> dict[str, dict[Setting, float]]:
    """Energy (pJ per batch of ``inputs``) of every module of a converted model at every setting."""
    params = params or EnergyParams()
    out: dict[str, dict[Setting, float]] = {}
    for row in summary(converted, inputs, errors=False).rows:
        if row.kind == "digital" or row.config is None:
            continue
        module = row.site.rsplit(":", 1)[0]
        acc = out.setdefault(module, {s: 0.0 for s in settings})
        for s in settings:
            cfg = row.config.replace(gain=s[0], repeats=s[1])
            acc[s] += row_cost(row, cfg, params).total_energy
    return out


def _hull(points: list[tuple[float, float, Setting]]) -> list[tuple[float, float, Setting]]:
    """Lower convex hull of ``(energy, loss, setting)`` from the cheapest point to the least loss."""
    pts = sorted(points, key=lambda p: (p[0], p[1]))
    front: list[tuple[float, float, Setting]] = []
    for p in pts:  # Pareto front: each next point strictly lower loss
        if not front or p[1] < front[-1][1]:
            front.append(p)
    hull: list[tuple[float, float, Setting]] = []
    for p in front:
        while len(hull) >= 2:
            (e1, l1, _), (e2, l2, _) = hull[-2], hull[-1]
            # drop hull[-1] if it lies on or above the segment hull[-2] -> p
            if (l2 - l1) * (p[0] - e1) >= (p[1] - l1) * (e2 - e1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocation_path(losses: Mapping[str, Mapping[Setting, float]],
                    energies: Mapping[str, Mapping[Setting, float]]) -> list[dict[str, Setting]]:
    """Plans of increasing energy: each module on its cheapest setting, then one module at a
    time moved to its next hull setting, the one with the most predicted loss saved per unit
    energy first, until every module is on its least-loss setting."""
    hulls = _hulls(losses, energies)
    pos = {m: 0 for m in hulls}
    current = {m: h[0][2] for m, h in hulls.items()}
    path = [dict(current)]
    while True:
        best = _best_move(hulls, pos)
        if best is None:
            return path
        pos[best] += 1
        current[best] = hulls[best][pos[best]][2]
        path.append(dict(current))


def _hulls(losses: Mapping[str, Mapping[Setting, float]],
           energies: Mapping[str, Mapping[Setting, float]]) -> dict[str, list[tuple[float, float, Setting]]]:
    return {m: _hull([(energies[m][s], losses[m][s], s) for s in losses[m]]) for m in losses}


def _best_move(hulls: Mapping[str, list[tuple[float, float, Setting]]], pos: Mapping[str, int],
               skip: set[str] | frozenset[str] = frozenset()) -> str | None:
    """The module (not in ``skip``) whose next hull setting saves the most predicted loss per unit energy."""
    best, best_rate = None, -math.inf
    for m, h in hulls.items():
        i = pos[m]
        if m in skip or i + 1 >= len(h):
            continue
        de, dl = h[i + 1][0] - h[i][0], h[i][1] - h[i + 1][1]
        rate = math.inf if de <= 0 else dl / de
        if rate > best_rate:
            best, best_rate = m, rate
    return best


def fill_budget(plan: Mapping[str, Setting], losses: Mapping[str, Mapping[Setting, float]],
                energies: Mapping[str, Mapping[Setting, float]], limit: float) -> dict[str, Setting]:
    """``plan`` (a plan of :func:`allocation_path` within ``limit``, the summed energy of the
    modules of ``losses``) with the energy left spent: the path's next move no longer fits, so
    the other modules' next hull moves, best rate first, are taken while they fit (a module
    whose next move does not fit stops there). A module whose setting is not on its hull (moved
    there by :mod:`.refine`) keeps it: its energy counts, it is not moved."""
    hulls = _hulls(losses, energies)
    at = {m: next((i for i, p in enumerate(h) if p[2] == plan[m]), None) for m, h in hulls.items()}
    pos = {m: i or 0 for m, i in at.items()}
    current = {m: plan[m] for m in hulls}
    total = sum(energies[m][s] for m, s in current.items())
    stopped: set[str] = {m for m, i in at.items() if i is None}
    while (m := _best_move(hulls, pos, stopped)) is not None:
        de = hulls[m][pos[m] + 1][0] - hulls[m][pos[m]][0]
        if total + de > limit:
            stopped.add(m)
            continue
        pos[m] += 1
        total += de
        current[m] = hulls[m][pos[m]][2]
    return {**plan, **current}


@dataclass
class Allocation:
    """The chosen plan (module -> ``(gain, repeats)``), its calibration metric, whether it
    meets the target, its index on the path, the path's length and every trial
    ``(index, metric)``."""

    settings: dict[str, Setting]
    metric: float
    reached: bool
    index: int
    path_length: int
    trials: list[tuple[int, float]] = field(default_factory=list)


def search_path(path: Sequence[Mapping[str, Setting]], score: Callable[[dict[str, Setting]], float],
                meets: Callable[[float], bool]) -> Allocation:
    """Bisection for the first plan on ``path`` (ordered by energy) whose ``score`` meets the
    target; when even the last misses, the last (least predicted loss) plan."""
    if not path:
        raise ValueError("empty allocation path")
    trials: list[tuple[int, float]] = []

    def run(i: int) -> float:
        v = score(dict(path[i]))
        trials.append((i, v))
        return v

    hi = len(path) - 1
    v_hi = run(hi)
    if not meets(v_hi):
        return Allocation(dict(path[hi]), v_hi, False, hi, len(path), trials)
    lo = -1  # index known (or assumed: the cheapest) to miss
    while hi - lo > 1:
        mid = (lo + hi) // 2
        v = run(mid)
        if meets(v):
            hi, v_hi = mid, v
        else:
            lo = mid
    return Allocation(dict(path[hi]), v_hi, True, hi, len(path), trials)


def energy_allocation(model: nn.Module, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor | None,
                      config: ABFPConfig, metric: Any, gains: Sequence[float], repeats: Sequence[int],
                      modules: Sequence[str], energy_inputs: tuple[torch.Tensor, ...],
                      score: Callable[[dict[str, Setting]], float], meets: Callable[[float], bool], *,
                      budget: float | None = None, params: EnergyParams | None = None,
                      exclude: Sequence[str] = (), seed: int = 0, refine: int = 0, refine_passes: int | None = 1,
                      refine_fill: bool = False, refine_margin: float = 0.0,
                      progress: Callable[[str], None] | None = None) -> tuple[dict[str, Setting], dict[str, Any]]:
    """Steps 1-5 of this module: ``(module -> (gain, repeats), details)``. ``inputs`` (with
    ``targets`` for a label metric) measure the errors and sensitivities, ``energy_inputs`` the
    energies; ``score(settings)`` is the metric of a plan on the calibration inputs. ``budget``:
    instead of the cheapest plan that meets the target, the plan of least predicted loss whose
    energy is at most ``budget`` times that of the base config (every module at its gain, k = 1).
    ``refine``: then step 6 (:mod:`.refine`) on that many modules, those of largest predicted
    loss at the chosen settings, within the budget (or, without one, the chosen plan's energy),
    in up to ``refine_passes`` passes (``None``: until one moves nothing). ``refine_fill``: then
    the energy the refinement left unspent goes to :func:`fill_budget`'s moves of the modules it
    left on their hulls, kept only when the filled plan scores better on calibration.
    ``refine_margin``: a refined module moves only when that beats the plan by more than this
    fraction of its calibration metric."""
    say = progress or (lambda s: None)
    gains = _check_candidates(gains)
    reps = sorted({int(k) for k in repeats})
    if not reps or reps[0] < 1:
        raise ValueError(f"repeats options must be integers >= 1, got {list(repeats)}")
    prof = profile_layers(model, inputs, config, gains, exclude=exclude, seed=seed)
    ref = scored_output(model(*inputs))
    fp = metric(ref, targets, ref)
    sign = 1.0 if metric.higher_is_better else -1.0
    deltas = {m: math.sqrt(min(prof.error_sq(m, (g, 1)) for g in gains)) for m in prof.quant}
    sens = sensitivities(model, inputs, config, deltas, lambda y: sign * (fp - metric(y, targets, ref)),
                         exclude=exclude, seed=seed)
    settings = [(g, k) for g in gains for k in reps]
    base = (float(config.gain), 1)
    conv = convert(model, config, exclude=exclude).eval()
    try:
        energies = layer_energies(conv, energy_inputs, sorted({*settings, base}), params)
    finally:
        to_digital(conv)
    fixed = {m: base for m in modules}
    known = [m for m in prof.quant if m in energies]
    losses = {m: {s: sens[m] * prof.error_sq(m, s) for s in settings} for m in known}
    path = [{**fixed, **p} for p in allocation_path(losses, {m: {s: energies[m][s] for s in settings} for m in known})]
    say(f"  energy rule: {len(known)} modules, {len(settings)} settings each, a path of {len(path)} plans")

    def energy(st: Mapping[str, Setting]) -> float:
        return sum(e[st.get(m, base)] for m, e in energies.items())

    e_base = energy(fixed)

    def trial(st: dict[str, Setting]) -> float:
        v = score(st)
        say(f"  energy rule: {energy(st) / e_base:.3f} x the single-gain energy: {metric.name} {v:.4g} on calibration")
        return v

    if budget is None:
        found = search_path(path, trial, meets)
    else:  # the least predicted loss within the budget: the last path plan that fits, the rest spent
        limit = budget * e_base * (1 + 1e-9)
        fits = [i for i, p in enumerate(path) if energy(p) <= limit]
        i = fits[-1] if fits else 0
        st = dict(path[i])
        if fits:
            rest = energy(st) - sum(energies[m][st[m]] for m in known)  # the modules the rule does not move
            st = fill_budget(st, losses, {m: {s: energies[m][s] for s in settings} for m in known}, limit - rest)
        v = trial(st)
        found = Allocation(st, v, meets(v), i, len(path), [(i, v)])
    base_plan = False
    if not found.reached and found.settings != fixed:  # never worse than the device it starts from
        v = trial(dict(fixed))
        if sign * (v - found.metric) > 0:
            found = Allocation(dict(fixed), v, meets(v), found.index, found.path_length, found.trials)
            base_plan = True
    refined: dict[str, Any] | None = None
    if refine and not base_plan:
        order = sorted(known, key=lambda m: -losses[m][found.settings[m]])[:refine]
        cap = budget * e_base * (1 + 1e-9) if budget is not None else energy(found.settings) * (1 + 1e-9)
        r = refine_settings(found.settings, order, gains, reps, energy, cap, trial, found.metric,
                            metric.higher_is_better, passes=refine_passes,
                            margin=refine_margin)
        refined = {"modules": order, "trials": [list(t) for t in r.trials], "passes": r.passes, "margin": refine_margin,
                   "moved": {m: [list(a), list(b)] for m, (a, b) in r.moved(found.settings).items()}}
        found = Allocation(r.settings, r.metric, meets(r.metric), found.index, found.path_length, found.trials)
        if refine_fill:
            known_e = {m: {s: energies[m][s] for s in settings} for m in known}
            rest = energy(found.settings) - sum(known_e[m][found.settings[m]] for m in known)
            filled = fill_budget(found.settings, losses, known_e, cap - rest)
            fill: dict[str, Any] = {"moved": {m: [list(found.settings[m]), list(s)] for m, s in filled.items()
                                              if found.settings[m] != s}, "metric": None, "kept": False}
            if fill["moved"]:
                v = trial(filled)
                fill["metric"] = v
                if sign * (v - found.metric) > 0:
                    fill["kept"] = True
                    found = Allocation(filled, v, meets(v), found.index, found.path_length, found.trials)
            refined["fill"] = fill
    details = {"allocation": {"index": found.index, "path_length": found.path_length, "metric": found.metric,
                              "reached": found.reached, "trials": found.trials, "budget": budget,
                              "energy_ratio": energy(found.settings) / e_base, "base_plan": base_plan},
               "sensitivity": sens, "error_sq": {m: {f"{g:g}x{k}": prof.error_sq(m, (g, k)) for g, k in settings}
                                                 for m in known},
               "settings": {m: list(s) for m, s in found.settings.items()}, "refine": refined}
    return found.settings, details
