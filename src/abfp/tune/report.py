"""The report of ``abfp tune``: a Markdown table and a plot of metric and energy per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..outputs import atomic_path, atomic_write_text

__all__ = ["write_plot", "report_markdown"]


def write_plot(result: Any, path: str | Path) -> Path:
    """PNG: the metric (left) and the energy per inference (right) after each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in result.stages]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(names, [s.metric for s in result.stages], "o-")
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
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)


def report_markdown(result: Any, title: str, plot_name: str, commands: str = "") -> str:
    e0 = result.stages[0].energy if result.stages else 0.0
    lines = [f"# abfp tune: {title}", "", f"Metric: {result.metric_name} (float32 {result.fp32_metric:.4g}; "
             f"target {result.target}). Tuning took {result.seconds:.1f} s.", "",
             "| stage | metric | energy per inference (uJ) | x single gain | stage time (s) | note |",
             "|---|---|---|---|---|---|"]
    for s in result.stages:
        lines.append(f"| {s.name} | {s.metric:.4g} | {s.energy / 1e6:.4g} | {(s.energy / e0 if e0 else 0):.3f} | "
                     f"{s.seconds:.1f} | {s.note} |")
    lines += ["", f"![metric and energy per stage]({plot_name})", ""]
    if commands:
        lines += ["```", commands, "```", ""]
    return "\n".join(lines)


def write_report(result: Any, path: str | Path, plot_name: str, title: str, commands: str = "") -> Path:
    return atomic_write_text(path, report_markdown(result, title, plot_name, commands))
