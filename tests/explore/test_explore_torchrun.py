"""``abfp explore`` under torchrun (2 gloo processes) finds the same designs with the same values
as one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import abfp

TASK = Path(__file__).with_name("explore_tiny_task.py")
ARGS = ["explore", "--task", f"{TASK}:make", "--formats", "abfp", "--tile-widths", "8", "--gains", "1,4",
        "--adc-bits", "3,8", "--dac-search", "none", "--noise", "1.0", "--runs", "2", "--batch-size", "16",
        "--cache-dir", "", "--no-progress", "--threads", "1"]


@pytest.mark.slow  # torchrun with two Python processes (15-40 s on 2 busy cores)
def test_two_process_explore_equals_single_process(tmp_path):
    multi = tmp_path / "multi.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "abfp", *ARGS, "--json", str(multi)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("explore-tiny:") == 1  # only rank 0 prints
    b = json.loads(multi.read_text())
    a = abfp.explore(f"{TASK}:make", formats=("abfp",), tile_widths=(8,), gains=(1, 4), auto_gain=False,
                     adc_bits=(3, 8), dac_search="none", noise_stds=(1.0,), runs=2, batch_size=16, progress=False)
    assert [d["label"] if "label" in d else (d["gain"], d["output_bits"]) for d in a["designs"]] == \
        [(d["gain"], d["output_bits"]) for d in b["designs"]]
    for da, db in zip(a["designs"], b["designs"]):
        assert da["values"] == db["values"]
        assert da["energy_pj_per_inference"] == db["energy_pj_per_inference"]
    assert any(d["std"] > 0 for d in a["designs"])  # noisy designs really are noisy
    strip = lambda c: {f: None if d is None else {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
                       for f, d in c.items()}
    assert strip(a["cheapest"]) == strip(b["cheapest"])
