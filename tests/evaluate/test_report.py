"""The evaluation report from a hand-made record list: files, content, malformed input."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from abfp.evaluate.report import write_report

NOISE = 1 / math.sqrt(12)


def _rec(model: str, fmt: str, value: float, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": model, "format": fmt, "tile_width": None if fmt == "fp32" else 128, "input_bits": 8,
        "weight_bits": 8, "output_bits": 8, "gain": None if fmt == "fp32" else 1.0,
        "noise_std": None if fmt == "fp32" else NOISE, "noise_dist": "uniform", "metric": "top1",
        "metric_kind": "accuracy", "higher_is_better": True, "samples": 100, "value": value, "std": 0.5,
        "runs": 3, "values": [value] * 3, "seconds": 0.1, "extra": {}, "layers": None,
    }
    base.update(kw)
    base["label"] = f"{fmt} {base['tile_width']} {base['gain']} {base['noise_std']}"
    return base


LAYERS = [
    {"site": "conv1", "kind": "conv2d", "input_shape": [8, 1, 28, 28], "weight_shape": [16, 1, 3, 3], "tiles": 1,
     "macs": 100, "adc_conversions": 1000, "saturated_fraction": 0.01, "relative_error": 0.05, "config": "x"},
    {"site": "fc", "kind": "linear", "input_shape": [8, 64], "weight_shape": [10, 64], "tiles": 1,
     "macs": 640, "adc_conversions": 80, "saturated_fraction": 0.0, "relative_error": 0.02, "config": "x"},
]


def records() -> list[dict[str, Any]]:
    fp = 90.0
    recs = [_rec("cnn", "fp32", fp, std=0.0, runs=1, delta_vs_fp32=0.0),
            _rec("cnn", "fixed", 70.0, delta_vs_fp32=-20.0)]
    for n, vals in ((8, (89.8, 89.5, 80.0)), (128, (60.0, 85.0, 89.6))):
        for g, v in zip((1.0, 4.0, 16.0), vals):
            recs.append(_rec("cnn", "abfp", v, tile_width=n, gain=g, delta_vs_fp32=v - fp,
                             layers=LAYERS if (n, g) == (128, 16.0) else None))
    recs.append(_rec("cnn", "abfp", 89.7, tile_width=128, gain="auto", gains={"conv1": 32.0, "fc": 8.0},
                     delta_vs_fp32=-0.3, layers=LAYERS))
    recs.append(_rec("cnn", "abfp", 88.0, tile_width=128, gain=16.0, noise_std=1.0, delta_vs_fp32=-2.0))
    recs.append(_rec("cnn", "abfp", 89.0, tile_width=8, gain=1.0, noise_std=1.0, delta_vs_fp32=-1.0))
    # a second model with a fidelity metric, missing optional keys (no fp32 record, no extras, no layers key)
    recs.append({"model": "encoder", "format": "abfp", "tile_width": 32, "gain": 8, "metric": "cosine",
                 "metric_kind": "fidelity", "value": 0.99, "delta_vs_fp32": -0.01, "extra": {"kl": 0.02}})
    recs.append({"model": "encoder", "format": "abfp", "tile_width": 32, "gain": 2, "metric": "cosine",
                 "value": 0.97})
    return recs


@pytest.mark.parametrize("html", [False, True])
def test_report_files(tmp_path: Path, html: bool) -> None:
    path = write_report(records(), tmp_path, html=html)
    assert path == tmp_path / ("report.html" if html else "report.md")
    text = path.read_text()
    assert "cnn" in text and "encoder" in text
    assert "accuracy" in text and "fidelity" in text
    assert "within 1%" in text
    links = re.findall(r'<img src="([^"]+)"', text) if html else re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"cnn_gain.png", "cnn_noise.png", "cnn_best.png", "cnn_layers.png", "encoder_gain.png"} <= set(links)
    for name in links:
        assert (tmp_path / name).stat().st_size > 1000
    if html:
        assert text.lstrip().startswith("<!DOCTYPE html>") and "<table>" in text
    else:
        assert "| format |" in text
    # at the reference noise four points are within 1% of 90 (>= 89.1); the best is n=8, G=1 at 89.8
    assert "best config within 1%" in text and "89.8" in text
    assert "auto (8–32)" in text


def test_lower_is_better_threshold(tmp_path: Path) -> None:
    recs = [{"model": "m", "format": "fp32", "value": 2.0, "metric": "loss", "higher_is_better": False},
            {"model": "m", "format": "abfp", "value": 2.01, "tile_width": 8, "gain": 1, "noise_std": 0.0,
             "metric": "loss", "higher_is_better": False}]
    text = write_report(recs, tmp_path).read_text()
    assert "1 of 1 device points within 1%" in text and "≤ 2.02" in text


@pytest.mark.parametrize("bad", [
    [],
    "not a list",
    [1, 2],
    [{"format": "abfp", "value": 1.0}],
    [{"model": "m", "format": "int4", "value": 1.0}],
    [{"model": "m", "format": "abfp", "value": "high"}],
    [{"model": "m", "format": "abfp", "value": 1.0, "gain": "max"}],
    [{"model": "m", "format": "abfp", "value": 1.0, "layers": "conv1"}],
])
def test_malformed_records(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError):
        write_report(bad, tmp_path)
