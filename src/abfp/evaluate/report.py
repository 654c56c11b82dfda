"""A readable report of evaluation records: ``report.md`` (or ``report.html``) and PNG plots.

The records are what ``abfp eval --json`` writes (see :func:`abfp.evaluate.evaluate`). Per
model (and metric): a table of every point, the best configuration within 1% of float32,
the metric against gain, the metric against noise where several noise levels were run,
the best ABFP point per tile width against fixed point and float32, and the per-layer
relative error and saturation of the best ABFP point. Plots use matplotlib's Agg canvas
directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import html as _html
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

from ..config import REFERENCE_NOISE_STD
from ..outputs import atomic_write_text
from ..plotting import new_figure, save_figure

__all__ = ["write_report", "report_files", "validate_records", "new_figure", "save_figure"]

Record = dict[str, Any]
FORMATS = ("fp32", "fixed", "abfp")
_LINESTYLES = ("-", "--", ":", "-.")


# --------------------------------------------------------------------------- validation
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_records(records: Any) -> list[Record]:
    """Check the shape of ``records``; raise ``ValueError`` naming the first bad record."""
    if not isinstance(records, (list, tuple)):
        raise ValueError(f"records must be a list of dicts, got {type(records).__name__}")
    if not records:
        raise ValueError("no records to report (the list is empty)")
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise ValueError(f"record {i} is a {type(r).__name__}, not a dict")
        missing = [k for k in ("model", "format", "value") if k not in r]
        if missing:
            raise ValueError(f"record {i} lacks the key(s) {', '.join(missing)}")
        if r["format"] not in FORMATS:
            raise ValueError(f"record {i}: format must be one of {', '.join(FORMATS)}, got {r['format']!r}")
        if not _is_number(r["value"]):
            raise ValueError(f"record {i}: value must be a number, got {r['value']!r}")
        for key in ("std", "tile_width", "noise_std", "delta_vs_fp32", "seconds"):
            if r.get(key) is not None and not _is_number(r[key]):
                raise ValueError(f"record {i}: {key} must be a number or absent, got {r[key]!r}")
        g = r.get("gain")
        if g is not None and g not in ("auto", "plan") and not _is_number(g):
            raise ValueError(f"record {i}: gain must be a number, 'auto' or 'plan', got {g!r}")
        layers = r.get("layers")
        if layers is not None and (not isinstance(layers, list) or not all(isinstance(x, Mapping) for x in layers)):
            raise ValueError(f"record {i}: layers must be a list of dicts or None")
    return [dict(r) for r in records]


# --------------------------------------------------------------------------- record helpers
def _num(r: Mapping[str, Any], key: str, default: float = math.nan) -> float:
    v = r.get(key)
    return float(v) if _is_number(v) else default


def _bits(r: Record) -> str:
    b = [r.get(k) for k in ("weight_bits", "input_bits", "output_bits")]
    return "/".join(str(x) for x in b) if all(x is not None for x in b) else "?"


def _gain_text(r: Record) -> str:
    g = r.get("gain")
    if g in ("auto", "plan"):  # per-layer gains: chosen at run time, or a tuned plan's (abfp eval --plan)
        per = [v for v in (r.get("gains") or {}).values() if _is_number(v)]
        return f"{g} ({min(per):g}–{max(per):g})" if per else g
    return f"{g:g}" if _is_number(g) else ""


def _noise(r: Record) -> float | None:
    z = r.get("noise_std")
    return float(z) if _is_number(z) else None


def _noise_text(z: float | None) -> str:
    return "?" if z is None else f"{z:.3g}"


def _label(r: Record) -> str:
    if r.get("label"):
        return str(r["label"])
    if r["format"] == "fp32":
        return "fp32"
    return f"{r['format']} n={r.get('tile_width')} {_bits(r)} G={_gain_text(r)} noise={_noise_text(_noise(r))}"


def _fmt(v: float, spec: str = ".4g") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _sort_noise(zs: Sequence[float | None]) -> list[float | None]:
    return sorted(set(zs), key=lambda z: (z is None, z or 0.0))


class _Group:
    """The records of one (model, metric) with the derived reference values."""

    def __init__(self, model: str, metric: str, recs: list[Record]) -> None:
        self.model, self.metric, self.recs = model, metric, recs
        self.higher = bool(next((r["higher_is_better"] for r in recs if r.get("higher_is_better") is not None), True))
        self.kind = next((r["metric_kind"] for r in recs if r.get("metric_kind")), None)
        self.fp32 = self._fp32()
        self.abfp = [r for r in recs if r["format"] == "abfp"]
        self.fixed = [r for r in recs if r["format"] == "fixed"]
        zs = [_noise(r) for r in self.abfp + self.fixed]
        self.noises = _sort_noise(zs)
        self.primary_noise = self._primary(zs)

    def _fp32(self) -> float | None:
        for r in self.recs:
            if r["format"] == "fp32":
                return float(r["value"])
        for r in self.recs:
            if _is_number(r.get("delta_vs_fp32")):
                return float(r["value"]) - float(r["delta_vs_fp32"])
        return None

    @staticmethod
    def _primary(zs: list[float | None]) -> float | None:
        if not zs:
            return None
        counts = {z: zs.count(z) for z in set(zs)}
        return max(counts, key=lambda z: (counts[z], -abs((z if z is not None else -1.0) - REFERENCE_NOISE_STD)))

    @property
    def threshold(self) -> float | None:
        """The metric 1% (relative) worse than float32."""
        if self.fp32 is None:
            return None
        return self.fp32 - 0.01 * abs(self.fp32) if self.higher else self.fp32 + 0.01 * abs(self.fp32)

    def best(self, recs: Sequence[Record]) -> Record | None:
        finite = [r for r in recs if math.isfinite(float(r["value"]))]
        if not finite:
            return None
        return (max if self.higher else min)(finite, key=lambda r: float(r["value"]))

    def within(self, r: Record) -> bool:
        t = self.threshold
        return t is not None and (float(r["value"]) >= t if self.higher else float(r["value"]) <= t)

    def delta(self, r: Record) -> float:
        d = r.get("delta_vs_fp32")
        if _is_number(d):
            return float(d)
        return float(r["value"]) - self.fp32 if self.fp32 is not None else math.nan


# --------------------------------------------------------------------------- document
class _Doc:
    """Blocks of a report, rendered as Markdown or HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, head: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (head, rows)))

    def img(self, name: str, alt: str) -> None:
        self.blocks.append(("img", (name, alt)))

    def markdown(self) -> str:
        out: list[str] = []
        for kind, b in self.blocks:
            if kind == "h":
                out.append("#" * b[0] + " " + b[1])
            elif kind == "p":
                out.append(b)
            elif kind == "table":
                head, rows = b
                cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
                out.append("\n".join(["| " + " | ".join(map(cell, head)) + " |", "|" + "---|" * len(head)]
                                     + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]))
            else:
                out.append(f"![{b[1]}]({b[0]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = _html.escape
        out = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
               "td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}img{max-width:100%}</style>"
               "</head><body>"]
        for kind, b in self.blocks:
            if kind == "h":
                out.append(f"<h{b[0]}>{e(b[1])}</h{b[0]}>")
            elif kind == "p":
                out.append(f"<p>{e(b)}</p>")
            elif kind == "table":
                head, rows = b
                out.append("<table><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in head) + "</tr>"
                           + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                           + "</table>")
            else:
                out.append(f"<p><img src=\"{e(b[0])}\" alt=\"{e(b[1])}\"></p>")
        return "\n".join(out) + "\n</body></html>\n"


# --------------------------------------------------------------------------- plots
def _ref_lines(ax: Any, g: _Group) -> None:
    if g.fp32 is None:
        return
    ax.axhline(g.fp32, color="k", linewidth=1, label="fp32")
    ax.axhline(g.threshold, color="k", linewidth=1, linestyle=":", label="fp32 −1%" if g.higher else "fp32 +1%")


def _keys(recs: Sequence[Record]) -> tuple[list[Any], list[str]]:
    widths = sorted({r.get("tile_width") for r in recs}, key=lambda n: (n is None, n or 0))
    bits = sorted({_bits(r) for r in recs})
    return widths, bits


def _plot_gain(g: _Group, path: Path) -> None:
    widths, bits = _keys(g.abfp)
    numeric = sorted({float(r["gain"]) for r in g.abfp + g.fixed if _is_number(r.get("gain"))}) or [1.0]
    x_auto = numeric[-1] * 2
    panels = [z for z in g.noises if any(_noise(r) == z for r in g.abfp)]
    fig = new_figure(5.2 * len(panels) + 1, 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, z in zip(axes, panels):
        for i, n in enumerate(widths):
            for j, b in enumerate(bits):
                sel = [r for r in g.abfp if r.get("tile_width") == n and _bits(r) == b and _noise(r) == z]
                line = sorted((r for r in sel if _is_number(r.get("gain"))), key=lambda r: r["gain"])
                style = dict(color=f"C{i}", capsize=3)
                if line:
                    ax.errorbar([r["gain"] for r in line], [r["value"] for r in line],
                                yerr=[_num(r, "std", 0.0) for r in line], marker="o", markersize=4,
                                linestyle=_LINESTYLES[j % 4], label=f"ABFP n={n} {b}", **style)
                for r in (r for r in sel if r.get("gain") in ("auto", "plan")):
                    ax.errorbar([x_auto], [r["value"]], yerr=[_num(r, "std", 0.0)], marker="*" if r["gain"] == "auto"
                                else "D", markersize=12 if r["gain"] == "auto" else 8, linestyle="none",
                                label=f"{r['gain']} gain n={n} {b}", **style)
        for j, b in enumerate(sorted({_bits(r) for r in g.fixed})):
            sel = [r for r in g.fixed if _bits(r) == b and _noise(r) == z]
            if sel:
                ax.errorbar([_num(r, "gain", 1.0) for r in sel], [r["value"] for r in sel],
                            yerr=[_num(r, "std", 0.0) for r in sel], marker="XP"[j % 2], markersize=9, color="0.3",
                            linestyle="none", capsize=3, label=f"fixed point {b}")
        _ref_lines(ax, g)
        ax.set_xscale("log", base=2)
        per_layer = sorted({r["gain"] for r in g.abfp if r.get("gain") in ("auto", "plan")})
        ticks = numeric + ([x_auto] if per_layer else [])
        ax.set_xticks(ticks, [f"{t:g}" for t in numeric] + ["/".join(per_layer)] * (len(ticks) - len(numeric)))
        ax.set_xlabel("gain G")
        ax.set_title(f"noise std {_noise_text(z)} LSB")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(g.metric)
    handles: dict[str, Any] = {}
    for ax in axes:  # one legend for all panels, each entry once
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lbl, h)
    axes[-1].legend(list(handles.values()), list(handles), fontsize=7, loc="best")
    fig.suptitle(f"{g.model}: {g.metric} against gain")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _plot_noise(g: _Group, path: Path) -> None:
    widths, bits = _keys(g.abfp)
    fig = new_figure(7, 4.2)
    ax = fig.subplots()
    zs = [z for z in g.noises if z is not None]
    for i, n in enumerate(widths):
        for j, b in enumerate(bits):
            pts = []
            for z in zs:
                best = g.best([r for r in g.abfp if r.get("tile_width") == n and _bits(r) == b and _noise(r) == z])
                if best is not None:
                    pts.append((z, best))
            if not pts:
                continue
            ax.errorbar([z for z, _ in pts], [r["value"] for _, r in pts], yerr=[_num(r, "std", 0.0) for _, r in pts],
                        color=f"C{i}", marker="o", linestyle=_LINESTYLES[j % 4], capsize=3,
                        label=f"ABFP n={n} {b} (best gain)")
            for z, r in pts:
                ax.annotate(f"G={_gain_text(r)}", (z, r["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for j, b in enumerate(sorted({_bits(r) for r in g.fixed})):
        pts = [(z, g.best([r for r in g.fixed if _bits(r) == b and _noise(r) == z])) for z in zs]
        pts = [(z, r) for z, r in pts if r is not None]
        if pts:
            ax.errorbar([z for z, _ in pts], [r["value"] for _, r in pts], yerr=[_num(r, "std", 0.0) for _, r in pts],
                        color="0.3", marker="XP"[j % 2], markersize=8, linestyle=":", capsize=3,
                        label=f"fixed point {b}")
    _ref_lines(ax, g)
    ax.set_xlabel("noise std (LSB)")
    ax.set_ylabel(g.metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{g.model}: {g.metric} against device noise")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _best_points(g: _Group) -> list[tuple[str, Record, str]]:
    """(bar label, record, colour): best ABFP per (tile width, bits) and best fixed per bits, at the primary noise."""
    z0 = g.primary_noise
    out: list[tuple[str, Record, str]] = []
    widths, bits = _keys(g.abfp)
    for i, n in enumerate(widths):
        for b in bits:
            best = g.best([r for r in g.abfp if r.get("tile_width") == n and _bits(r) == b and _noise(r) == z0])
            if best is not None:
                out.append((f"ABFP n={n}\n{b} G={_gain_text(best)}", best, f"C{i}"))
    for b in sorted({_bits(r) for r in g.fixed}):
        best = g.best([r for r in g.fixed if _bits(r) == b and _noise(r) == z0])
        if best is not None:
            out.append((f"fixed\n{b}", best, "0.5"))
    return out


def _plot_bars(g: _Group, path: Path) -> None:
    bars = [(lbl, float(r["value"]), _num(r, "std", 0.0), c) for lbl, r, c in _best_points(g)]
    if g.fp32 is not None:
        bars.append(("fp32", g.fp32, 0.0, "k"))
    fig = new_figure(max(5.0, 1.1 * len(bars) + 1), 4.2)
    ax = fig.subplots()
    xs = range(len(bars))
    ax.bar(xs, [b[1] for b in bars], yerr=[b[2] for b in bars], color=[b[3] for b in bars], capsize=3)
    for x, b in zip(xs, bars):
        ax.annotate(_fmt(b[1]), (x, b[1] + b[2]), ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    if g.threshold is not None:
        ax.axhline(g.threshold, color="k", linestyle=":", linewidth=1, label="fp32 −1%" if g.higher else "fp32 +1%")
        ax.legend(fontsize=7)
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=7)
    lo = min(b[1] - b[2] for b in bars)
    hi = max([b[1] + b[2] for b in bars] + ([g.threshold] if g.threshold is not None else []))
    if all(math.isfinite(v) for v in (lo, hi)):  # zoom in: the interesting differences are small
        pad = 0.15 * (hi - lo) or 0.05 * abs(hi) or 1.0
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(g.metric)
    ax.set_title(f"{g.model}: best ABFP gain per tile width vs fixed point vs fp32 (noise {_noise_text(g.primary_noise)})",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _layer_record(g: _Group) -> Record | None:
    with_layers = [r for r in g.abfp if r.get("layers")]
    at_primary = [r for r in with_layers if _noise(r) == g.primary_noise]
    return g.best(at_primary) or g.best(with_layers) or g.best([r for r in g.recs if r.get("layers")])


def _plot_layers(layers: list[Mapping[str, Any]], title: str, path: Path) -> None:
    sites = [str(x.get("site", i))[-32:] for i, x in enumerate(layers)]
    fig = new_figure(min(40.0, max(6.0, 0.28 * len(sites) + 2)), 6.5)
    axes = fig.subplots(2, 1, sharex=True)
    xs = list(range(len(sites)))
    for ax, key, name, scale in ((axes[0], "relative_error", "relative error", 1.0),
                                 (axes[1], "saturated_fraction", "saturated %", 100.0)):
        vals = [_num(x, key) * scale for x in layers]
        ax.bar(xs, vals, color="C0" if key == "relative_error" else "C3")
        ax.set_ylim(bottom=0)
        ax.set_ylabel(name)
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].set_xticks(xs, sites, rotation=90, fontsize=8 if len(sites) <= 20 else 6)
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


# --------------------------------------------------------------------------- sections
def _kind_text(g: _Group) -> str:
    better = "higher is better" if g.higher else "lower is better"
    if g.kind == "accuracy":
        return f"{g.metric}: an accuracy metric (against the labels; {better})"
    if g.kind == "fidelity":
        return f"{g.metric}: a fidelity metric (agreement with the float32 outputs; {better})"
    return f"{g.metric} ({better})"


def _best_lines(g: _Group) -> list[str]:
    if g.fp32 is None:
        best = g.best(g.abfp + g.fixed)
        return [f"No float32 reference; best device point: {_label(best)} = {_fmt(float(best['value']))}."] if best else []
    rel = "≥" if g.higher else "≤"
    lines = []
    for z in g.noises:
        pts = [r for r in g.abfp + g.fixed if _noise(r) == z]
        ok = [r for r in pts if g.within(r)]
        best = g.best(ok) or g.best(pts)
        if best is None:
            continue
        head = f"Noise std {_noise_text(z)}: " + (f"{len(ok)} of {len(pts)} device points within 1% of fp32 "
                                                   f"({rel} {_fmt(g.threshold)}); best config within 1%: " if ok
                                                   else f"no device point within 1% of fp32 ({rel} {_fmt(g.threshold)}); closest: ")
        lines.append(head + f"{_label(best)} = {_fmt(float(best['value']))} (Δ {_fmt(g.delta(best), '+.3g')}).")
    return lines


def _table(g: _Group) -> tuple[list[str], list[list[str]]]:
    extras = sorted({k for r in g.recs for k in (r.get("extra") or {})})
    head = ["format", "n", "bits w/x/y", "gain", "noise std", g.metric + " (± std)", "runs", "Δ vs fp32", "s/run"] + extras
    rows = []
    for r in g.recs:
        fp = r["format"] == "fp32"
        std = _num(r, "std", 0.0)
        value = _fmt(float(r["value"])) + (f" ± {std:.2g}" if std > 0 else "")
        ex = r.get("extra") or {}
        rows.append([r["format"], "" if fp else str(r.get("tile_width", "")), "" if fp else _bits(r),
                     "" if fp else _gain_text(r), "" if fp else _noise_text(_noise(r)), value,
                     str(r.get("runs", "")), "" if fp else _fmt(g.delta(r), "+.3g"), _fmt(_num(r, "seconds"), ".3g")]
                    + [_fmt(ex[k]) if _is_number(ex.get(k)) else "" for k in extras])
    return head, rows


def _noise_plot_wanted(g: _Group) -> bool:
    return len([z for z in g.noises if z is not None and any(_noise(r) == z for r in g.abfp)]) > 1


def _section_images(g: _Group, slug: str) -> dict[str, str]:
    """The PNGs of one section: kind -> file name (only those the records call for)."""
    out = {}
    if g.abfp:
        out["gain"] = f"{slug}_gain.png"
    if _noise_plot_wanted(g):
        out["noise"] = f"{slug}_noise.png"
    if g.abfp or g.fixed:
        out["best"] = f"{slug}_best.png"
    if _layer_record(g) is not None:
        out["layers"] = f"{slug}_layers.png"
    return out


def _section(doc: _Doc, g: _Group, heading: str, slug: str, out: Path) -> None:
    images = _section_images(g, slug)
    doc.h(2, heading)
    samples = next((r["samples"] for r in g.recs if r.get("samples") is not None), None)
    doc.p(_kind_text(g) + (f"; {samples} samples" if samples is not None else "")
          + (f"; float32: {_fmt(g.fp32)}." if g.fp32 is not None else "; no float32 reference."))
    for line in _best_lines(g):
        doc.p(line)
    doc.table(*_table(g))
    if "gain" in images:
        _plot_gain(g, out / images["gain"])
        doc.h(3, "Metric against gain")
        doc.img(images["gain"], f"{g.model} {g.metric} against gain")
    if "noise" in images:
        _plot_noise(g, out / images["noise"])
        doc.h(3, "Metric against noise (best gain per tile width)")
        doc.img(images["noise"], f"{g.model} {g.metric} against noise")
    if "best" in images:
        _plot_bars(g, out / images["best"])
        doc.h(3, "Best ABFP vs fixed point vs fp32")
        doc.img(images["best"], f"{g.model} best configurations")
    lr = _layer_record(g)
    if lr is not None:
        layers = lr["layers"]
        doc.h(3, f"Per layer: {_label(lr)}")
        _plot_layers(layers, f"{g.model}: per-layer error and saturation at {_label(lr)}", out / images["layers"])
        doc.img(images["layers"], f"{g.model} per-layer relative error and saturation")
        worst = sorted(layers, key=lambda x: -_num(x, "relative_error", -1.0))[:5]
        doc.p(f"The {len(worst)} layers with the largest relative error (of {len(layers)}):")
        doc.table(["site", "kind", "relative error", "saturated %", "ADC conversions"],
                  [[str(x.get("site", "")), str(x.get("kind", "")), _fmt(_num(x, "relative_error")),
                    _fmt(100 * _num(x, "saturated_fraction"), ".3g"), str(x.get("adc_conversions", ""))] for x in worst])


def _plan(recs: list[Record]) -> list[tuple[str, str, _Group]]:
    """(heading, file slug, group) per (model, metric), in record order."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in recs:
        groups.setdefault((str(r["model"]), str(r.get("metric") or "metric")), []).append(r)
    per_model: dict[str, int] = {}
    for model, _ in groups:
        per_model[model] = per_model.get(model, 0) + 1
    used: set[str] = set()
    plan = []
    for (model, metric), rs in groups.items():
        several = per_model[model] > 1
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}_{metric}" if several else model).strip("_") or "model"
        while slug in used:
            slug += "_"
        used.add(slug)
        plan.append((f"{model} — {metric}" if several else model, slug, _Group(model, metric, rs)))
    return plan


def report_files(records: list[dict], *, html: bool = False) -> list[str]:
    """The names of the files :func:`write_report` writes for ``records`` (to check them first)."""
    recs = validate_records(records)
    names = ["report.html" if html else "report.md"]
    for _, slug, g in _plan(recs):
        names.extend(_section_images(g, slug).values())
    return names


def write_report(records: list[dict], out_dir: str | Path, *, html: bool = False) -> Path:
    """Write ``report.md`` (or ``report.html``) and its PNG plots to ``out_dir``; return the report's path.

    ``records``: evaluation records (several models allowed; missing optional keys are
    tolerated). Raises ``ValueError`` for an empty list or a malformed record. Every file is
    written atomically; :func:`report_files` names them beforehand (the CLI checks that none
    exists unless ``--force``).
    """
    recs = validate_records(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(recs)
    doc = _Doc()
    doc.h(1, "ABFP evaluation report")
    doc.p(f"{len(recs)} records; models: {', '.join(dict.fromkeys(g.model for _, _, g in plan))}. Values are means "
          "over runs ± their standard deviation; 'within 1%' means within 1% (relative) of the float32 value.")
    for heading, slug, g in plan:
        _section(doc, g, heading, slug, out)
    path = out / ("report.html" if html else "report.md")
    atomic_write_text(path, doc.html("ABFP evaluation report") if html else doc.markdown())
    return path
