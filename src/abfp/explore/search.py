"""The search of the device space: for each family, the cheapest design that meets the target.

For one model, one fidelity target and each family of designs (number format x tile width x
gain rule x noise level, see :mod:`abfp.explore.designs`):

1. **ADC bits by bisection** (:func:`abfp.explore.bisect.smallest_passing`, first guess the
   base device's ADC bits) with the DACs at the base device's bits. A *single-gain* family
   first tries every gain of its ladder at the first guess; then, best-scoring gain first,
   the first gain bisects the whole ADC range and every later gain only the bits that could
   still improve on the family so far (fewer ADC bits than the best found, or less energy
   than the cheapest found: energy grows with bits, so both bounds cut the range from
   above), so most gains cost one or two evaluations and none tries a slow high-resolution
   ADC it cannot win with. An *auto-gain* family (one gain per layer, chosen on calibration
   data) bisects once.
   When no design of the family meets the target at the base DAC bits, even at the highest
   ADC bits, and ``dac_max_bits`` is set, both DACs of the gain that came closest there are
   raised by bisection in ``(base, dac_max_bits]`` (:meth:`Explorer.raise_dac`; the top,
   ``dac_max_bits``, evaluated only when every fewer-bit DAC misses) and the ADC bits are
   bisected again at those DAC bits.
2. **DAC bits by bisection** on the family's cheapest design: both DACs together
   (``dac_search="joint"``), inputs then weights (``"separate"``), or not at all (``"none"``).

A design that a failure already implies is not evaluated: the metric is taken as monotone in
every converter's bits, so a design of a device (format, tile width, gain, noise) with no more
bits in any converter than one that missed the target misses it too (``implied_failures``).
3. **Energy** of every evaluated design from :class:`abfp.explore.costs.CostModel`; the
   family's cheapest design is the one of least energy per inference that meets the target.

Every design is evaluated by :func:`abfp.evaluate.evaluate` (same cache, same sharding under
``torchrun``, noisy designs averaged over ``runs`` runs with their standard deviation), once
per design per call of :func:`explore`. One :class:`abfp.evaluate.memo.EvalMemo` serves the
whole search: the float32 outputs, fixed-point scales and auto gains are computed once, so a
design whose runs are in the cache costs no forward pass. Auto gains are chosen once per
device (format and tile width) at the base device's bits and reused at every bit setting.

Two options trade completeness for time:

* ``early_stop = z``: a noisy design stops averaging runs once its mean is ``z`` standard
  errors from the target, or once no remaining run can move the mean of all runs across the
  target (a metric with known bounds, e.g. a percentage: certain) (:func:`abfp.explore.target.decided`).
* ``screen = k``: every design is first evaluated on ``k`` of the samples spread evenly over
  them (one run, calibrated on the same inputs as the full evaluation); one that misses the target there by at
  least ``screen_z`` standard errors over those samples is not evaluated on all of them (its
  record has ``screened_out`` and ``samples = k``). Only failures are decided on the screen:
  every design that meets the target was evaluated on all samples. A design with at least the
  bits (every converter) of a design of the same device that passed the screen skips it
  (``screen_skipped_by``): it would pass too, and a screen only rejects.
* ``global_prune``: a design whose energy, even with its DACs at the fewest bits the DAC search
  tries, is at least that of a design already known to meet the target (any family) is not
  evaluated: neither it nor a design derived from it can be the cheapest. Its bisection treats it
  as passing (a cheaper design of the family may lie below it) and it is listed under
  ``pruned``. Every family's designs at the base ADC bits are evaluated first, cheapest first
  (they run the fast path and usually decide), then the families are searched in that order,
  so that a low bound is found early. A family may then have no cheapest design of its
  own (``cheapest`` is ``null``, ``pruned_families`` names what dominated it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import REFERENCE_NOISE_STD, ABFPConfig
from ..energy import EnergyParams
from ..evaluate.distributed import world as dist_world
from ..evaluate.grid import Point
from ..evaluate.memo import EvalMemo
from ..evaluate.runner import EvalSettings, evaluate
from ..zoo.base import Dataset, Metric
from .bisect import smallest_passing
from .costs import CostModel
from .designs import Design, family_name
from .pareto import pareto_front
from .target import Target, decided

__all__ = ["SearchSpace", "Explorer", "explore_model"]

DAC_SEARCHES = ("joint", "separate", "none")


@dataclass(frozen=True)
class SearchSpace:
    """What :func:`explore_model` searches (every field a knob; the defaults are the issue's)."""

    formats: tuple[str, ...] = ("fixed", "abfp")
    tile_widths: tuple[int, ...] = (8, 32, 128)
    gains: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    """The single-gain ladder of ABFP families (the family's best gain is picked from it)."""
    auto_gain: bool = True
    """Also search an ABFP family with one gain per layer (``G = "auto"``)."""
    fixed_gains: tuple[float, ...] = (1.0,)
    """The gain ladder of fixed-point families (the authors' baseline: ``G = 1``)."""
    adc_bits: tuple[int, int] = (2, 16)
    """The ADC bits ``b_y`` searched, ``[lo, hi]``."""
    dac_min_bits: int = 2
    """The fewest DAC bits the DAC search tries (it starts from the base device's bits)."""
    dac_search: str = "joint"
    dac_max_bits: int | None = None
    """The most DAC bits a family's DACs are raised to when none of its designs meets the target at
    the base device's DAC bits and the highest ADC bits (None: never raised)."""
    screen: int | None = None
    """Evaluate every design first on the first ``screen`` samples (one run); one that misses the
    target there by ``screen_z`` standard errors is not evaluated on all samples (None: no screen)."""
    screen_z: float = 3.0
    noise_stds: tuple[float, ...] = (REFERENCE_NOISE_STD,)
    """Device noise, in ADC LSBs (one family per level); SPEC's default: one bin wide."""
    prune: bool = True
    """Skip the bits of a later gain that cannot improve the family (off: bisect every gain fully)."""
    global_prune: bool = False
    """Skip every design whose energy is at least that of a design known to meet the target."""
    early_stop: float | None = None
    """``z``: stop averaging a noisy design's runs once its mean is ``z`` standard errors from the
    target (:func:`abfp.explore.target.decided`); None: every design runs ``runs`` times."""

    def __post_init__(self) -> None:
        if not self.formats or any(f not in ("fixed", "abfp") for f in self.formats):
            raise ValueError(f"formats must be a non-empty subset of fixed, abfp; got {list(self.formats)}")
        if not self.tile_widths or any(type(n) is not int or n < 1 for n in self.tile_widths):
            raise ValueError(f"tile widths must be positive integers, got {list(self.tile_widths)}")
        for name in ("gains", "fixed_gains"):
            for g in getattr(self, name):
                if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0:
                    raise ValueError(f"{name}: {g!r} is not a finite number > 0")
        if "abfp" in self.formats and not self.gains and not self.auto_gain:
            raise ValueError("ABFP needs at least one gain (a number, or auto)")
        if "fixed" in self.formats and not self.fixed_gains:
            raise ValueError("fixed point needs at least one gain")
        if len(self.adc_bits) != 2:
            raise ValueError(f"ADC bits range must be (lo, hi), got {self.adc_bits!r}")
        lo, hi = self.adc_bits
        if not (type(lo) is int and type(hi) is int and 2 <= lo <= hi <= 24):
            raise ValueError(f"ADC bits range must be integers 2 <= lo <= hi <= 24, got {lo}..{hi}")
        if not (type(self.dac_min_bits) is int and 2 <= self.dac_min_bits <= 24):
            raise ValueError(f"DAC minimum bits must be an integer in [2, 24], got {self.dac_min_bits!r}")
        if self.dac_max_bits is not None and not (type(self.dac_max_bits) is int and 2 <= self.dac_max_bits <= 24):
            raise ValueError(f"DAC maximum bits must be an integer in [2, 24], got {self.dac_max_bits!r}")
        if self.screen is not None and not (type(self.screen) is int and self.screen >= 1):
            raise ValueError(f"screen samples must be an integer >= 1, got {self.screen!r}")
        sz = self.screen_z
        if isinstance(sz, bool) or not isinstance(sz, (int, float)) or not math.isfinite(sz) or sz <= 0:
            raise ValueError(f"screen z must be a finite number of standard errors > 0, got {sz!r}")
        if self.dac_search not in DAC_SEARCHES:
            raise ValueError(f"DAC search must be one of {', '.join(DAC_SEARCHES)}, got {self.dac_search!r}")
        if not self.noise_stds or any(not math.isfinite(z) or z < 0 for z in self.noise_stds):
            raise ValueError(f"noise levels must be finite numbers >= 0, got {list(self.noise_stds)}")
        z = self.early_stop
        if z is not None and (isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z) or z <= 0):
            raise ValueError(f"early stop must be a finite number of standard errors > 0, got {z!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"formats": list(self.formats), "tile_widths": list(self.tile_widths), "gains": list(self.gains),
                "auto_gain": self.auto_gain, "fixed_gains": list(self.fixed_gains), "adc_bits": list(self.adc_bits),
                "dac_min_bits": self.dac_min_bits, "dac_search": self.dac_search, "dac_max_bits": self.dac_max_bits,
                "screen": self.screen, "screen_z": self.screen_z,
                "noise_stds": list(self.noise_stds), "prune": self.prune, "global_prune": self.global_prune,
                "early_stop": self.early_stop}


class Explorer:
    """Evaluates designs of one model (each once), prices them and runs the searches."""

    def __init__(self, model: nn.Module, data: Dataset, metric: Metric, *, task_name: str, target: Target,
                 settings: EvalSettings, base: ABFPConfig, costs: CostModel,
                 progress: Callable[[str], None] | None = None, calibration: Dataset | None = None,
                 early_stop: float | None = None, global_prune: bool = False, dac_floor: int | None = None,
                 screen: int | None = None, screen_z: float = 3.0) -> None:
        self.model, self.data, self.metric, self.task_name = model, data, metric, task_name
        self.settings, self.base, self.costs = settings, base, costs
        self.calibration, self.early_stop, self.global_prune = calibration, early_stop, global_prune
        self.dac_floor = dac_floor  # the fewest DAC bits the DAC search may reach (None: no DAC search)
        self.higher = metric.higher_is_better
        self.progress = progress
        self.memo = EvalMemo()
        self.results: dict[tuple[Design, str], dict[str, Any]] = {}  # (design, family) -> record
        self._by_design: dict[Design, dict[str, Any]] = {}
        self.pruned: dict[Design, dict[str, Any]] = {}  # designs global pruning did not evaluate
        self.implied: dict[Design, dict[str, Any]] = {}  # designs known to fail without evaluation
        self._device_gains: dict[tuple[str, int], dict[str, float]] = {}  # (format, n) -> auto gains
        self.adc_search_dacs: dict[str, tuple[int, int]] = {}  # family -> raised (input, weight) DAC bits
        self.samples = len(data.take(settings.samples))
        fp = self._evaluate(Point("fp32"))
        self.fp32 = float(fp["value"])
        self.target_rule = target
        self.target = target.value(self.fp32, self.higher)
        self.screen: tuple[EvalSettings, Dataset, Dataset, float] | None = None
        if screen is not None and screen < self.samples:
            self.screen = self._screen_setup(screen)
        self.screen_z = screen_z

    def _screen_setup(self, k: int) -> tuple[EvalSettings, Dataset, Dataset, float]:
        """Settings, samples, calibration inputs and target of the screen: ``k`` of the evaluated
        samples spread evenly over them (:func:`spread`: data sets are often ordered, e.g. crops
        photo by photo), one run, calibrated on the same inputs as the full evaluation (the
        task's calibration split, else the first evaluated inputs): the same device."""
        n_calib = min(self.settings.calibration_samples, self.samples)
        calib = (self.calibration if self.calibration is not None else self.data).take(n_calib)
        data = spread(self.data.take(self.samples), k)
        settings = EvalSettings(**{**self.settings.__dict__, "samples": None, "runs": 1, "calibration_count": n_calib})
        (fp,) = evaluate(self.model, data, self.metric, [Point("fp32")], task_name=self.task_name,
                         settings=settings, memo=self.memo)
        return settings, data, calib, self.target_rule.value(float(fp["value"]), self.higher)

    def _evaluate(self, point: Point) -> dict[str, Any]:
        stop = None
        if self.early_stop is not None and point.format != "fp32":
            z, target, runs, bounds = self.early_stop, self.target, self.settings.runs, getattr(self.metric, "bounds", None)
            stop = lambda values, stderrs: decided(values, stderrs, target, z, runs=runs, bounds=bounds,  # noqa: E731
                                                   higher_is_better=self.higher)
        (r,) = evaluate(self.model, self.data, self.metric, [point], task_name=self.task_name,
                        settings=self.settings, calibration=self.calibration, memo=self.memo, enough=stop)
        return r

    def _screened_out(self, point: Point) -> dict[str, Any] | None:
        """The screen's record of ``point`` when it misses the screen's target by at least
        ``screen_z`` standard errors over the screened samples (then it is not evaluated on
        all samples); None when it passes the screen or is too close to call."""
        assert self.screen is not None
        settings, data, calib, target = self.screen
        (r,) = evaluate(self.model, data, self.metric, [point], task_name=self.task_name,
                        settings=settings, calibration=calib, memo=self.memo)
        v, se = float(r["value"]), r.get("stderr")
        if Target.meets(v, target, self.higher) or se is None or abs(v - target) < self.screen_z * float(se):
            return None
        return {**r, "screen_target": target}

    # ---------------------------------------------------------------- one design
    def measure(self, design: Design, family: str) -> dict[str, Any]:
        """The record of ``design`` (evaluated at its first request, then remembered)."""
        rec = self._by_design.get(design)
        if rec is None:
            if self.progress:
                self.progress(f"{family}: {design.label()}")
            point = design.point(self.base)
            passed_screen = self._passed_screen_below(design) if self.screen is not None else None
            try:
                r = self._screened_out(point) if self.screen is not None and passed_screen is None else None
                screened = r is not None
                if r is None:
                    r = self._evaluate(point)
            except FloatingPointError as e:  # the design makes the model's outputs NaN: it fails, named
                if self.progress:
                    self.progress(f"  {design.label()}: {e}")
                screened, r = False, {"value": math.nan, "std": math.nan, "stderr": None, "runs": 0, "values": [],
                                      "samples": len(self.data), "seconds": 0.0, "failed": str(e)}
            gains = r.get("gains") if design.auto_gain else None
            if gains is not None:  # chosen once per device: they price the device's other designs
                self._device_gains.setdefault((design.format, design.tile_width), dict(gains))
            energy = self.costs.energy(design, self.base, gains)
            rec = {**design.fields(), "value": float(r["value"]), "std": float(r["std"]),
                   "stderr": r.get("stderr"), "runs": int(r["runs"]),
                   "values": [float(v) for v in r["values"]],
                   "energy_pj_per_inference": energy["total"], "adc_energy_pj_per_inference": energy["adc"],
                   "energy_by_kind_pj": {k: energy[k] for k in ("analog", "dac", "adc", "digital")},
                   "meets_target": not screened and Target.meets(float(r["value"]), self.target, self.higher),
                   "samples": int(r["samples"]), "seconds": float(r["seconds"])}
            if self.screen is not None:
                rec["screened_out"] = screened
                if passed_screen is not None:
                    rec["screen_skipped_by"] = passed_screen
            if "early_stopped" in r:
                rec["early_stopped"] = bool(r["early_stopped"])
            if "failed" in r:
                rec["failed"] = r["failed"]
            if gains is not None:
                rec["gains"] = dict(gains)
            self._by_design[design] = rec
        key = (design, family)
        if key not in self.results:
            self.results[key] = {**rec, "family": family}
        return rec

    def passes(self, design: Design, family: str) -> bool:
        """Whether ``design`` meets the target; a design global pruning skips counts as passing
        (it cannot be the cheapest, and a cheaper design of its family may lie below it)."""
        if self.global_prune and design not in self._by_design and self.dominated(design, family):
            return True
        if design not in self._by_design and self.implied_fail(design, family):
            return False
        return bool(self.measure(design, family)["meets_target"])

    def implied_fail(self, design: Design, family: str) -> bool:
        """Whether an evaluated design of the same device (format, tile width, gain, noise) with at
        least as many bits in each converter missed the target: the metric is taken as monotone in
        every converter's bits, so ``design`` misses it too and is not evaluated (it is listed
        under ``implied_failures``)."""
        if design in self.implied:
            return True
        for d, r in self._by_design.items():
            if not r["meets_target"] and _no_more_bits(design, d):
                self.implied[design] = {**design.fields(), "family": family, "implied_by": d.label()}
                return True
        return False

    def _passed_screen_below(self, design: Design) -> str | None:
        """The label of an evaluated design of the same device with no more bits in any converter
        than ``design`` that passed the screen (it was evaluated on all samples), else None. By the
        monotonicity :meth:`implied_fail` assumes, ``design`` would pass the screen too, so its
        screen is skipped: a screen only rejects, so skipping it never changes a decision (the
        evaluation on all samples makes it), it only saves the screen's pass."""
        for d, r in self._by_design.items():
            if not r.get("screened_out", True) and _no_more_bits(d, design):
                return d.label()
        return None

    def value_at(self, design: Design, family: str) -> float | None:
        """The metric of ``design`` (None when global pruning skips it)."""
        if self.global_prune and design not in self._by_design and self.dominated(design, family):
            return None
        return float(self.measure(design, family)["value"])

    def energy_of(self, design: Design) -> float:
        """Energy of a design before it is evaluated (it does not depend on the metric). For an
        auto-gain design: exact once its device's gains are known, else a lower bound (every
        layer at ``G = 1``; a gain never lowers the energy)."""
        if design.auto_gain:
            gains = self._device_gains.get((design.format, design.tile_width))
            if gains is None:
                gains = {}
            return self.costs.energy(design, self.base, gains)["total"]
        return self.costs.energy(design, self.base)["total"]

    def energy_floor(self, design: Design) -> float:
        """The least energy of ``design`` and of every design the DAC search could derive from
        it (both DACs at the fewest bits it tries): what global pruning compares."""
        if self.dac_floor is None:
            return self.energy_of(design)
        return self.energy_of(design.with_bits(input_bits=min(design.input_bits, self.dac_floor),
                                               weight_bits=min(design.weight_bits, self.dac_floor)))

    def dominated(self, design: Design, family: str) -> bool:
        """Whether a design already known to meet the target costs no more than ``design``, even
        with its DACs at the fewest bits the DAC search tries (then ``design`` is recorded
        under ``pruned`` and not evaluated: neither it nor a design derived from it can be
        the cheapest)."""
        if design in self.pruned:
            return True
        e = self.energy_floor(design)
        best = None
        for d, r in self._by_design.items():
            if r["meets_target"] and r["energy_pj_per_inference"] <= e:
                if best is None or r["energy_pj_per_inference"] < best[1]["energy_pj_per_inference"]:
                    best = (d, r)
        if best is None:
            return False
        self.pruned[design] = {**design.fields(), "family": family, "energy_pj_per_inference_at_least": e,
                               "dominated_by": best[0].label(),
                               "dominated_by_energy_pj": best[1]["energy_pj_per_inference"]}
        return True

    # ---------------------------------------------------------------- families
    def family_records(self, family: str) -> list[dict[str, Any]]:
        return [r for (d, f), r in self.results.items() if f == family]

    def cheapest(self, family: str) -> tuple[Design, dict[str, Any]] | None:
        best = None
        for (d, f), r in self.results.items():
            if f == family and r["meets_target"]:
                if best is None or r["energy_pj_per_inference"] < best[1]["energy_pj_per_inference"]:
                    best = (d, r)
        return best

    def search_adc(self, family: str, seeds: Sequence[Design], lo: int, hi: int, prune: bool,
                   start: int | None = None) -> None:
        """Bisect the ADC bits of each seed design (one per gain) within the family's bounds;
        ``start``: the first guess of each bisection (the base device's ADC bits)."""
        best_bits: int | None = None
        if len(seeds) > 1 and start is not None and lo <= start <= hi:
            # every gain at the first guess first (each bisection would start there anyway), then the
            # best-scoring gain first: its threshold bounds the later gains, which then never try the
            # slow high-resolution ADCs they could not win with
            at_start = {seed: self.value_at(seed.with_bits(output_bits=start), family) for seed in seeds}
            sign = -1.0 if self.higher else 1.0
            seeds = sorted(seeds, key=lambda d: math.inf if at_start[d] is None else sign * at_start[d])
        for seed in seeds:
            top = hi
            if prune and best_bits is not None and not seed.auto_gain:
                best = self.cheapest(family)
                best_e = best[1]["energy_pj_per_inference"] if best else math.inf
                top = lo - 1
                for b in range(lo, hi + 1):  # both bounds are closed downwards: keep the largest b allowed
                    if b < best_bits or self.energy_of(seed.with_bits(output_bits=b)) < best_e:
                        top = b
            first = lo
            if start is not None and lo <= start <= hi:
                rec = self._by_design.get(seed.with_bits(output_bits=start))
                if rec is not None and not rec["meets_target"]:
                    first = start + 1  # monotone in the ADC bits: every bit below a failing one fails too
            b = smallest_passing(first, top, lambda bits: self.passes(seed.with_bits(output_bits=bits), family),
                                 start=start if start is not None and first <= start < top else None)
            if b is not None:
                best_bits = b if best_bits is None else min(best_bits, b)

    def raise_dac(self, family: str, seeds: Sequence[Design], adc_bits: int, top: int) -> list[Design] | None:
        """When no design of the family meets the target: the seeds with both DACs raised to the
        fewest bits, at most ``top``, at which the gain that came closest at ``adc_bits`` (the
        highest ADC bits) meets it (bisection above the seeds' DAC bits); None when even ``top``
        bits do not (or no seed was evaluated at ``adc_bits``)."""
        at_top = {seed: self.value_at(seed.with_bits(output_bits=adc_bits), family) for seed in seeds}
        sign = -1.0 if self.higher else 1.0
        ranked = sorted((d for d in seeds if at_top[d] is not None), key=lambda d: sign * at_top[d])  # type: ignore[operator]
        if not ranked:
            return None
        lead = ranked[0]
        b0 = max(lead.input_bits, lead.weight_bits)
        if b0 >= top:
            return None

        def raised(d: Design, b: int) -> Design:
            return d.with_bits(input_bits=max(b, d.input_bits), weight_bits=max(b, d.weight_bits))

        # the top (the most expensive design) is evaluated only when every fewer-bit DAC fails
        b = smallest_passing(b0 + 1, top, lambda b: self.passes(raised(lead, b).with_bits(output_bits=adc_bits), family),
                             top_last=True)
        if b is None:
            return None
        return [raised(d, b) for d in seeds]

    def search_dac(self, family: str, lo: int, mode: str) -> None:
        """Bisect the DAC bits of the family's cheapest design (if it has one)."""
        found = self.cheapest(family)
        if found is None or mode == "none":
            return
        d, _ = found
        x0, w0 = d.input_bits, d.weight_bits
        if mode == "joint":
            top = max(x0, w0)
            if lo < top:
                smallest_passing(lo, top, lambda b: self.passes(
                    d.with_bits(input_bits=min(b, x0), weight_bits=min(b, w0)), family), known_pass=top)
            return
        bx = smallest_passing(lo, x0, lambda b: self.passes(d.with_bits(input_bits=b), family), known_pass=x0) \
            if lo < x0 else x0
        d2 = d.with_bits(input_bits=bx)
        if lo < w0:
            smallest_passing(lo, w0, lambda b: self.passes(d2.with_bits(weight_bits=b), family), known_pass=w0)


def _no_more_bits(a: Design, b: Design) -> bool:
    """Whether ``a`` is a design of ``b``'s device (format, tile width, gain, noise) with no more
    bits than ``b`` in any converter."""
    return ((a.format, a.tile_width, a.gain, a.noise_std) == (b.format, b.tile_width, b.gain, b.noise_std)
            and a.input_bits <= b.input_bits and a.weight_bits <= b.weight_bits and a.output_bits <= b.output_bits)


def spread(data: Dataset, k: int) -> Dataset:
    """``k`` samples of ``data`` spread evenly over it: indices ``floor(i N / k)``, ``i < k``."""
    n = len(data)
    idx = torch.arange(k, dtype=torch.int64) * n // k
    return Dataset(tuple(t[idx] for t in data.inputs), None if data.targets is None else data.targets[idx])


def explore_model(model: nn.Module, data: Dataset, metric: Metric, *, task_name: str = "model",
                  target: Target | None = None, space: SearchSpace | None = None, base: ABFPConfig | None = None,
                  energy_params: EnergyParams | None = None, energy_samples: int = 1,
                  settings: EvalSettings | None = None, progress: bool = True,
                  calibration: Dataset | None = None) -> dict[str, Any]:
    """Search the device space of ``model`` on ``data`` for the cheapest designs meeting ``target``.

    ``calibration``: the task's calibration split (fixed-point scales and auto gains come from
    it, never from the evaluated inputs); None: the first evaluated inputs, as ``evaluate``.

    Returns the explore result (a JSON-ready dict): ``target``, ``fp32``, ``metric``,
    ``energy_params``, ``designs`` (every evaluated design, with ``family``, ``value``,
    ``std``, energies, ``meets_target`` and ``pareto``), ``cheapest`` (family -> its cheapest
    design meeting the target, or None) and ``min_adc_bits`` (family -> the fewest ADC bits
    that met the target at the base DAC bits, or None).
    """
    t0 = time.perf_counter()
    target = target or Target()
    space = space or SearchSpace()
    base = base or ABFPConfig()
    eval_settings = settings or EvalSettings()
    # auto gains: chosen once per device (format, tile width) at the base device's bits
    eval_settings = EvalSettings(**{**eval_settings.__dict__, "progress": False, "layer_stats": False,
                         "autogain_bits": (base.weight_bits, base.input_bits, base.output_bits)})
    if energy_samples < 1:
        raise ValueError(f"energy samples must be >= 1, got {energy_samples}")
    sub = data.take(eval_settings.samples)
    costs = CostModel.from_model(model, sub.take(energy_samples).inputs, energy_params, base)
    rank = dist_world()[0]
    bar = tqdm(desc=f"explore {task_name}", unit="design", disable=not progress or rank != 0, dynamic_ncols=True)

    def tick(text: str) -> None:
        bar.set_postfix_str(text[-60:])
        bar.update(1)

    ex = Explorer(model, data, metric, task_name=task_name, target=target, settings=eval_settings, base=base, costs=costs,
                  progress=tick, calibration=calibration, early_stop=space.early_stop,
                  global_prune=space.global_prune, dac_floor=None if space.dac_search == "none" else space.dac_min_bits,
                  screen=space.screen, screen_z=space.screen_z)
    lo, hi = space.adc_bits
    plan = _families(space, base)
    families = [fam for fam, _ in plan]
    start = base.output_bits
    try:
        if space.global_prune and lo <= start <= hi:
            # probes: every family's designs at the base ADC bits first, cheapest first (they run the
            # fast path and usually decide), so that the deeper searches start with a low bound
            plan.sort(key=lambda f: min(ex.energy_of(d.with_bits(output_bits=start)) for d in f[1]))
            for fam, seeds in plan:
                for seed in sorted(seeds, key=lambda d: ex.energy_of(d.with_bits(output_bits=start))):
                    ex.passes(seed.with_bits(output_bits=start), fam)
        for fam, seeds in plan:
            ex.search_adc(fam, seeds, lo, hi, space.prune, start=start)
            if (space.dac_max_bits is not None and ex.cheapest(fam) is None
                    and not any(p["family"] == fam for p in ex.pruned.values())):
                # nothing meets the target at the base DAC bits, even at the highest ADC bits:
                # raise the DACs (the gain that came closest), then bisect the ADC bits there
                raised = ex.raise_dac(fam, seeds, hi, space.dac_max_bits)
                if raised is not None:
                    ex.adc_search_dacs[fam] = (raised[0].input_bits, raised[0].weight_bits)
                    ex.search_adc(fam, raised, lo, hi, space.prune, start=start)
            ex.search_dac(fam, space.dac_min_bits, space.dac_search)
    finally:
        bar.close()
    return _result(ex, families, task_name, target, space, base, costs, len(sub), eval_settings, time.perf_counter() - t0)


def _families(space: SearchSpace, base: ABFPConfig) -> list[tuple[str, list[Design]]]:
    """Every family of the space (in report order) with its seed designs (one per gain, at the
    base DAC bits and the highest ADC bits searched)."""
    hi = space.adc_bits[1]
    out: list[tuple[str, list[Design]]] = []
    several_noises = len(space.noise_stds) > 1
    for noise in space.noise_stds:
        suffix = noise if several_noises else None
        for fmt in space.formats:
            for n in space.tile_widths:
                ladders: list[tuple[str, list[Any]]] = []
                single = list(space.fixed_gains if fmt == "fixed" else space.gains)
                if single:
                    ladders.append((family_name(fmt, n, False, suffix), [float(g) for g in single]))
                if fmt == "abfp" and space.auto_gain:
                    ladders.append((family_name(fmt, n, True, suffix), ["auto"]))
                for fam, ladder in ladders:
                    out.append((fam, [Design(fmt, n, base.input_bits, base.weight_bits, hi, g, float(noise))
                                      for g in ladder]))
    return out


def _result(ex: Explorer, families: list[str], task_name: str, target: Target, space: SearchSpace,
            base: ABFPConfig, costs: CostModel, samples: int, eval_settings: EvalSettings, seconds: float) -> dict[str, Any]:
    designs = list(ex.results.values())
    points = [(r["energy_pj_per_inference"], r["value"]) for r in designs]
    front = set(pareto_front(points, ex.higher))
    for i, r in enumerate(designs):
        r["pareto"] = i in front
    cheapest: dict[str, Any] = {}
    min_bits: dict[str, int | None] = {}
    for fam in families:
        found = ex.cheapest(fam)
        cheapest[fam] = dict(found[1]) if found else None
        xb, wb = ex.adc_search_dacs.get(fam, (base.input_bits, base.weight_bits))
        ok = [r["output_bits"] for r in ex.family_records(fam) if r["meets_target"]
              and r["input_bits"] == xb and r["weight_bits"] == wb]
        min_bits[fam] = min(ok) if ok else None
    pruned_families = {fam: sorted({p["dominated_by"] for p in ex.pruned.values() if p["family"] == fam})
                       for fam in families if cheapest[fam] is None and any(
                           p["family"] == fam for p in ex.pruned.values())}
    rule = ({"drop_percent": target.drop_percent} if target.absolute is None else {"absolute": target.absolute})
    return {
        "task": task_name,
        "metric": ex.metric.name,
        "metric_kind": ex.metric.kind,
        "higher_is_better": ex.higher,
        "fp32": ex.fp32,
        "target": ex.target,
        "target_rule": rule,
        "samples": samples,
        "runs": eval_settings.runs,
        # the noise seed of run 0 (run r: seed + r): the base device's own when it has one (evaluate's rule)
        "seed": eval_settings.seed if base.seed is None else base.seed,
        "energy_params": costs.params.to_dict(),
        "energy_accounting": costs.describe(),
        "base_config": base.to_dict(execution=True),  # kernel and seed too: they decide the numbers
        # the screen as run: none when --screen K is not fewer than the samples evaluated
        "search": {**space.to_dict(), "screen": space.screen if ex.screen is not None else None},
        "designs": designs,
        "cheapest": cheapest,
        "min_adc_bits": min_bits,
        "adc_search_dac_bits": {fam: list(ex.adc_search_dacs.get(fam, (base.input_bits, base.weight_bits)))
                                for fam in families},
        "implied_failures": list(ex.implied.values()),
        "evaluations": len(ex._by_design),
        "pruned": list(ex.pruned.values()),
        "pruned_families": pruned_families,
        "autogain_bits": list(eval_settings.autogain_bits) if eval_settings.autogain_bits else None,
        "calibration": "calibration split" if ex.calibration is not None else "evaluated inputs",
        "calibration_samples": min(eval_settings.calibration_samples, samples,
                                   *([len(ex.calibration)] if ex.calibration is not None else [])),
        "forward_passes": dict(ex.memo.forwards),
        "seconds": seconds,
    }
