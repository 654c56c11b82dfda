"""The explorer's table and Pareto plot (``abfp explore --out DIR``, ``abfp report explore.json``).

The table lists each family's cheapest design meeting the target (energy per inference, ADC
energy, metric ± its spread over runs) and the fewest ADC bits that met it; the plot shows
every evaluated design as metric against energy per inference (log scale), one marker per
family, the Pareto frontier joined by a line, and the float32 metric and the target as
horizontal lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..evaluate.report import _Doc, new_figure, save_figure
from ..outputs import atomic_write_text

__all__ = ["DESIGN_KEYS", "RESULT_KEYS", "explore_report_files", "format_explore_table", "is_explore_result",
           "plot_pareto", "validate_explore", "write_explore_report"]

#: The keys of the explore JSON (issue 14, item 5) and of each of its designs.
RESULT_KEYS = ("target", "fp32", "metric", "energy_params", "designs", "cheapest")
DESIGN_KEYS = ("format", "tile_width", "input_bits", "weight_bits", "output_bits", "gain", "noise_std", "value", "std",
               "energy_pj_per_inference", "adc_energy_pj_per_inference", "meets_target")
PLOT = "pareto.png"


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_explore_result(obj: Any) -> bool:
    """Whether ``obj`` looks like an explore result (a dict with ``designs``), not eval records."""
    return isinstance(obj, Mapping) and "designs" in obj


def validate_explore(obj: Any) -> dict[str, Any]:
    """Check an explore result's shape; ``ValueError`` naming the first missing or bad field."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"an explore result is a JSON object, got {type(obj).__name__}")
    missing = [k for k in RESULT_KEYS if k not in obj]
    if missing:
        raise ValueError(f"explore result lacks the key(s) {', '.join(missing)}")
    for k in ("target", "fp32"):
        if not _num(obj[k]):
            raise ValueError(f"explore result: {k} must be a number, got {obj[k]!r}")
    if not isinstance(obj["designs"], list) or not obj["designs"]:
        raise ValueError("explore result: designs must be a non-empty list")
    for i, d in enumerate(obj["designs"]):
        if not isinstance(d, Mapping):
            raise ValueError(f"design {i} is a {type(d).__name__}, not an object")
        lack = [k for k in DESIGN_KEYS if k not in d]
        if lack:
            raise ValueError(f"design {i} lacks the key(s) {', '.join(lack)}")
        for k in ("value", "std", "energy_pj_per_inference", "adc_energy_pj_per_inference", "tile_width"):
            if not _num(d[k]):
                raise ValueError(f"design {i}: {k} must be a number, got {d[k]!r}")
        if d["gain"] != "auto" and not _num(d["gain"]):
            raise ValueError(f"design {i}: gain must be a number or 'auto', got {d['gain']!r}")
    if not isinstance(obj["cheapest"], Mapping):
        raise ValueError("explore result: cheapest must be an object (family -> design or null)")
    return dict(obj)


def _gain(d: Mapping[str, Any]) -> str:
    g = d["gain"]
    if g == "auto":
        per = [v for v in (d.get("gains") or {}).values() if _num(v)]
        return f"auto {min(per):g}-{max(per):g}" if per else "auto"
    return f"{float(g):g}"


def _bits(d: Mapping[str, Any]) -> str:
    return f"{d['weight_bits']}/{d['input_bits']}/{d['output_bits']}"


def _value(d: Mapping[str, Any]) -> str:
    return (f"{d['value']:.3f}" + (f" ± {d['std']:.3f}" if d.get("runs", 1) > 1 else "")
            + (f" (screen: {d.get('samples')} samples)" if d.get("screened_out") else ""))


def _rows(res: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    min_bits = res.get("min_adc_bits") or {}
    dominated = res.get("pruned_families") or {}
    for fam, d in res["cheapest"].items():
        mb = min_bits.get(fam)
        if d is None:
            why = "dominated (global prune)" if dominated.get(fam) else "none meets the target"
            rows.append([fam, why, "", "", "", "", "", "" if mb is None else str(mb)])
            continue
        rows.append([fam, _bits(d), _gain(d), f"{d['noise_std']:.3g}", _value(d),
                     f"{d['energy_pj_per_inference']:.4g}", f"{d['adc_energy_pj_per_inference']:.4g}",
                     "" if mb is None else str(mb)])
    return rows


_HEAD = ["family", "bits w/x/y", "gain", "noise", "metric", "pJ/inference", "ADC pJ/inf.", "min ADC bits"]


def _summary_line(res: Mapping[str, Any]) -> str:
    rule = res.get("target_rule") or {}
    how = (f"{rule['drop_percent']:g}% from float32" if "drop_percent" in rule
           else "absolute" if "absolute" in rule else "")
    return (f"{res.get('task', 'model')}: {res['metric']}, float32 {res['fp32']:.4g}, target {res['target']:.4g}"
            + (f" ({how})" if how else "") + f"; {len(res['designs'])} designs evaluated"
            + (f" on {res['samples']} samples, {res.get('runs')} runs per noisy design" if res.get("samples") else "")
            + _speed_note(res))


def _speed_note(res: Mapping[str, Any]) -> str:
    """Early stop and global pruning, when the search used them."""
    search = res.get("search") or {}
    notes = []
    if search.get("early_stop") is not None:
        stopped = sum(1 for d in res["designs"] if d.get("early_stopped"))
        notes.append(f"early stop at {search['early_stop']:g} standard errors ({stopped} designs stopped early)")
    if search.get("screen"):
        out = sum(1 for d in res["designs"] if d.get("screened_out"))
        skipped = sum(1 for d in res["designs"] if d.get("screen_skipped_by"))
        notes.append(f"screen on {search['screen']} samples ({out} designs rejected there"
                     + (f", {skipped} skipped it above a design that passed it)" if skipped else ")"))
    if search.get("dac_max_bits") is not None:
        raised = {f: b for f, b in (res.get("adc_search_dac_bits") or {}).items()
                  if b != [res["base_config"]["input_bits"], res["base_config"]["weight_bits"]]} \
            if isinstance(res.get("base_config"), Mapping) else {}
        notes.append(f"DACs raised up to {search['dac_max_bits']} bits where needed"
                     + (f" ({', '.join(f'{f}: {b[0]}/{b[1]}' for f, b in raised.items())})" if raised else ""))
    if search.get("global_prune"):
        notes.append(f"global prune ({len(res.get('pruned') or [])} dominated designs skipped)")
    return "; " + ", ".join(notes) if notes else ""


def format_explore_table(res: Mapping[str, Any]) -> str:
    """The cheapest design of each family as aligned text."""
    widths = [max(len(str(c)) for c in col) for col in zip(_HEAD, *_rows(res))]
    lines = [_summary_line(res), "  " + "  ".join(h.ljust(w) for h, w in zip(_HEAD, widths))]
    lines += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in _rows(res)]
    best = _overall(res)
    if best is not None:
        fam, d = best
        lines.append(f"  cheapest overall: {fam} {_bits(d)} G={_gain(d)}, {d['energy_pj_per_inference']:.4g} pJ per "
                     f"inference")
    return "\n".join(lines)


def _overall(res: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    found = [(f, d) for f, d in res["cheapest"].items() if d is not None]
    return min(found, key=lambda fd: fd[1]["energy_pj_per_inference"]) if found else None


def _family(d: Mapping[str, Any]) -> str:
    if d.get("family"):
        return str(d["family"])
    return f"{d['format']}-n{d['tile_width']}" + ("-auto" if d["gain"] == "auto" else "")


def plot_pareto(res: Mapping[str, Any], path: str | Path) -> Path:
    """Metric against energy per inference: every design (one marker per family; hollow when it
    misses the target), the Pareto frontier, the float32 metric and the target."""
    designs = res["designs"]
    fig = new_figure(8, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    markers = "os^vD<>pPhX*"
    fams = list(dict.fromkeys(_family(d) for d in designs))
    colors = [f"C{i % 10}" for i in range(len(fams))]
    for i, fam in enumerate(fams):
        ds = [d for d in designs if _family(d) == fam]
        for meets in (True, False):
            sel = [d for d in ds if bool(d["meets_target"]) == meets]
            if not sel:
                continue
            first = meets or not any(d["meets_target"] for d in ds)  # one legend entry per family
            ax.scatter([d["energy_pj_per_inference"] for d in sel], [d["value"] for d in sel],
                       marker=markers[i % len(markers)], s=28, label=fam if first else None,
                       facecolors=colors[i] if meets else "none", edgecolors=colors[i])
    front = sorted((d for d in designs if d.get("pareto")), key=lambda d: d["energy_pj_per_inference"])
    if front:
        ax.plot([d["energy_pj_per_inference"] for d in front], [d["value"] for d in front], color="k",
                linewidth=1.2, drawstyle="steps-post" if res.get("higher_is_better", True) else "default",
                label="Pareto frontier")
    ax.axhline(res["fp32"], color="k", linewidth=1, linestyle="-", alpha=0.6, label=f"float32 {res['fp32']:.4g}")
    ax.axhline(res["target"], color="r", linewidth=1, linestyle=":", label=f"target {res['target']:.4g}")
    if all(d["energy_pj_per_inference"] > 0 for d in designs):
        ax.set_xscale("log")
    vals = [d["value"] for d in designs if math.isfinite(d["value"])]
    if vals:  # keep the interesting band in view: designs far below the target squeeze it otherwise
        top = max(vals + [res["fp32"]])
        span = abs(top - res["target"]) or abs(top) * 0.01 or 1.0
        low = min(min(vals), res["target"] - 4 * span)
        ax.set_ylim(max(low, res["target"] - 8 * span), top + 0.5 * span)
    ax.set_xlabel("energy per inference (pJ)")
    ax.set_ylabel(str(res["metric"]))
    ax.set_title(f"{res.get('task', 'model')}: metric vs energy (hollow: misses the target)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def explore_report_files(*, html: bool = False) -> list[str]:
    """The files :func:`write_explore_report` writes (to check them before any work)."""
    return ["explore.html" if html else "explore.md", PLOT]


def write_explore_report(res: Mapping[str, Any], out_dir: str | Path, *, html: bool = False) -> Path:
    """``explore.md`` (or ``.html``) with the table of cheapest designs, every design, and ``pareto.png``."""
    res = validate_explore(res)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_pareto(res, out / PLOT)
    doc = _Doc()
    doc.h(1, f"Device exploration: {res.get('task', 'model')}")
    doc.p(_summary_line(res) + ". Energy per inference from abfp.energy with the parameters below; a gain G "
          "costs G times the analog MAC energy.")
    doc.h(2, "Cheapest design per family meeting the target")
    doc.table(_HEAD, _rows(res))
    best = _overall(res)
    if best is not None:
        doc.p(f"Cheapest overall: {best[0]}, {_bits(best[1])}, G = {_gain(best[1])}, "
              f"{best[1]['energy_pj_per_inference']:.4g} pJ per inference.")
    doc.h(2, "Metric against energy")
    doc.img(PLOT, "Pareto plot")
    doc.h(2, "Every evaluated design")
    doc.table(["family", "bits w/x/y", "gain", "noise", "metric", "runs", "meets", "pareto", "pJ/inference",
               "ADC pJ/inf."],
              [[_family(d), _bits(d), _gain(d), f"{d['noise_std']:.3g}", _value(d), str(d.get("runs", "")),
                "yes" if d["meets_target"] else "",
                "yes" if d.get("pareto") else "", f"{d['energy_pj_per_inference']:.4g}",
                f"{d['adc_energy_pj_per_inference']:.4g}"] for d in res["designs"]])
    doc.h(2, "Energy parameters (pJ per event)")
    doc.table(["parameter", "value"], [[k, str(v)] for k, v in res["energy_params"].items()])
    path = out / ("explore.html" if html else "explore.md")
    atomic_write_text(path, doc.html(f"Device exploration: {res.get('task', 'model')}") if html else doc.markdown())
    return path
