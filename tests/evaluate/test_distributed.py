"""A 2-process gloo evaluation equals the single-process one exactly (same seed and data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TASK = Path(__file__).parent / "tiny_task.py"
ARGS = ["eval", "--task", f"{TASK}:make", "--tile-widths", "8,128", "--gains", "1,8", "--noise", "0,2.0",
        "--runs", "2", "--batch-size", "16", "--cache-dir", "", "--no-progress", "--threads", "1"]


def test_two_process_gloo_evaluation_equals_single_process(tmp_path):
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    p = subprocess.run([sys.executable, "-m", "abfp", *ARGS, "--json", str(single)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "abfp", *ARGS, "--json", str(multi)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("tiny:") == 1  # only rank 0 prints
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert len(a) == len(b) == 1 + 2 + 8
    for ra, rb in zip(a, b):
        assert ra["label"] == rb["label"]
        assert ra["values"] == rb["values"], ra["label"]
    assert any(r["runs"] == 2 and r["std"] > 0 for r in a)  # the noisy points really are noisy
