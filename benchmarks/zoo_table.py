"""The zoo's analog of the authors' MLPerf table, from ``abfp eval --json`` files.

One row per model: float32, fixed point, then for each tile width the metric at each gain
(mean of the runs) and at auto gain. Usage:

    python benchmarks/zoo_table.py docs/results/*.json > docs/results/zoo_table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(v: float) -> str:
    if abs(v) < 2:
        return f"{v:.3f}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def table(records: list[dict]) -> str:
    models: dict[str, list[dict]] = {}
    for r in records:
        models.setdefault(r["model"], []).append(r)
    widths = sorted({r["tile_width"] for r in records if r["format"] == "abfp"})
    gains = sorted({r["gain"] for r in records if r["format"] == "abfp" and not isinstance(r["gain"], str)})
    has_auto = any(r["gain"] == "auto" for r in records)
    head = ["model (metric, kind)", "fp32", "fixed n=128 G=1"]
    for n in widths:
        head.append(f"n = {n}: G = {', '.join(f'{g:g}' for g in gains)}" + (", auto" if has_auto else ""))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, recs in models.items():
        fp = next(r for r in recs if r["format"] == "fp32")
        fixed = [r for r in recs if r["format"] == "fixed"]
        kind = fp.get("metric_kind", "")
        row = [f"{model} ({fp['metric']}, {kind}; {fp.get('samples')} samples)", fmt(fp["value"]),
               fmt(fixed[0]["value"]) if fixed else "-"]
        for n in widths:
            vals = []
            for g in gains + (["auto"] if has_auto else []):
                hit = [r for r in recs if r["format"] == "abfp" and r["tile_width"] == n and r["gain"] == g]
                v = fmt(hit[0]["value"]) if hit else "-"
                if hit and fp["value"] and hit[0].get("higher_is_better", True) and hit[0]["value"] >= 0.99 * fp["value"]:
                    v = f"**{v}**"
                vals.append(v)
            row.append(" ".join(vals))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Bold: within 1% (relative) of float32. Each noisy point is the mean of its runs; "
                 "standard deviations are in the JSON files and the report.")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    records: list[dict] = []
    for p in paths:
        records.extend(json.loads(Path(p).read_text()))
    print(table(records))


if __name__ == "__main__":
    main(sys.argv[1:])
