"""The report of ``abfp tune``: a Markdown table and a plot of metric and energy per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..outputs import atomic_write_text
from ..plotting import new_figure, save_figure

__all__ = ["write_plot", "report_markdown"]


def write_plot(result: Any, path: str | Path) -> Path:
    """PNG: the metric (left) and the energy per inference (right) after each stage."""
    names = [s.name for s in result.stages]
    fig = new_figure(9, 3.4)
    a, b = fig.subplots(1, 2)
    a.errorbar(names, [s.metric for s in result.stages], yerr=[s.stderr or 0.0 for s in result.stages], fmt="o-",
               capsize=3)
    a.axhline(result.fp32_metric, color="gray", ls="--", label="float32")
    if result.target is not None:
        a.axhline(result.target, color="tab:red", ls=":", label="target")
    a.set_title(result.metric_name)
    a.legend(fontsize=8)
    b.bar(names, [s.energy / 1e6 for s in result.stages], color="tab:orange")
    b.set_title("energy per inference (uJ)")
    for ax in (a, b):
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def report_markdown(result: Any, title: str, plot_name: str, commands: str = "") -> str:
    e0 = result.stages[0].energy if result.stages else 0.0
    lines = [f"# abfp tune: {title}", "", f"Metric: {result.metric_name} (float32 {result.fp32_metric:.4g} on the "
             f"evaluation inputs; target {result.target} on the calibration inputs; ± one standard error over the "
             f"evaluation samples). Tuning took {result.seconds:.1f} s.", "",
             "| stage | metric | other metrics | energy per inference (uJ) | x single gain | stage time (s) | note |",
             "|---|---|---|---|---|---|---|"]
    for s in result.stages:
        extra = ", ".join(f"{k} {v:.4g}" for k, v in s.extra.items())
        lines.append(f"| {s.name} | {s.metric_text()} | {extra} | {s.energy / 1e6:.4g} | "
                     f"{(s.energy / e0 if e0 else 0):.3f} | {s.seconds:.1f} | {s.note} |")
    lines += ["", f"![metric and energy per stage]({plot_name})", ""]
    if commands:
        lines += ["```", commands, "```", ""]
    return "\n".join(lines)


def write_report(result: Any, path: str | Path, plot_name: str, title: str, commands: str = "") -> Path:
    return atomic_write_text(path, report_markdown(result, title, plot_name, commands))
