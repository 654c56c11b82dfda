"""Reliability of ``abfp finetune``: ``kill -9`` at random points, then ``--resume`` to the end.

A tiny DNF run (64 Fashion-MNIST training images, batch 8, 24 steps, a checkpoint after every
step, one torch thread) is killed with SIGKILL 4 times at random moments of its training
(a seeded random delay after its progress bar appears), each time restarted with the same
command plus ``--resume``, and finally run to the end. Checked:

* after every kill the checkpoint loads (digest verified) and holds at least every step the
  killed process had reported done (its progress bar), and never goes back: a kill loses at
  most the step in flight (``--checkpoint-every 1``);
* the end state equals an uninterrupted run of the same command bit for bit: every tensor of
  the final checkpoint (weights, batch-norm statistics, AdamW moments and step counts, the
  generator state, the DNF histograms), the recorded losses and the metrics in ``--json``.

The figures (delays, steps at each kill, identical?) are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from abfp.finetune.checkpoint import load_checkpoint
from abfp.finetune.data import training_data

try:
    training_data("fashion-cnn", 64)
    HAVE_TRAIN = True
except FileNotFoundError:
    HAVE_TRAIN = False

STEPS = 24
KILLS = 4
ARGS = ["finetune", "--train-samples", "64", "--batch-size", "8", "--steps", str(STEPS), "--checkpoint-every", "1",
        "--eval-samples", "8", "--calibration-samples", "8", "--sampler", "eager", "--threads", "1", "--lr", "1e-3"]
BAR = re.compile(rf"(\d+)/{STEPS}\b")


def _start(cwd: Path, name: str, err: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "abfp", *ARGS, "--checkpoint", f"{name}.safetensors", "--json", f"{name}.json"]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err.open("wb"),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _reported(err: Path) -> int | None:
    """The last step count the progress bar showed (None before it appeared)."""
    found = BAR.findall(err.read_text(errors="replace"))
    return int(found[-1]) if found else None


def _step(path: Path) -> int:
    return int(load_checkpoint(path)[1]["step"]) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TRAIN, reason="Fashion-MNIST training data (dataset-fashion-mnist) not installed")
def test_kill_9_and_resume_is_bit_identical(tmp_path: Path) -> None:
    full = _start(tmp_path, "full", tmp_path / "full.err")  # the uninterrupted run, alongside
    rng = random.Random(20240616)
    ckpt = tmp_path / "killed.safetensors"
    figures = []
    for i in range(KILLS):
        err = tmp_path / f"kill{i}.err"
        cmd_resume = _start(tmp_path, "killed", err) if i == 0 else None
        proc = cmd_resume or subprocess.Popen(
            [sys.executable, "-m", "abfp", *ARGS, "--checkpoint", "killed.safetensors", "--json", "killed.json",
             "--resume"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err.open("wb"))
        deadline = time.monotonic() + 300
        while _reported(err) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        delay = rng.uniform(0.0, 1.0)
        time.sleep(delay)
        if proc.poll() is not None:  # it finished (or failed) before the kill: no more kills
            assert proc.returncode == 0, err.read_text()[-2000:]
            figures.append((round(delay, 2), STEPS, _step(ckpt), 0))
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        shown = _reported(err) or 0
        step = _step(ckpt)  # loads and verifies the digest: never a damaged file
        assert step >= shown, f"kill {i}: the bar showed {shown} steps, the checkpoint holds {step}"
        if figures:
            assert step >= figures[-1][2], "the checkpoint went back"
        figures.append((round(delay, 2), shown, step, proc.returncode))

    finished = bool(figures) and figures[-1][3] == 0
    final = subprocess.run([sys.executable, "-m", "abfp", *ARGS, "--no-progress", "--checkpoint", "killed.safetensors",
                            "--json", "again.json" if finished else "killed.json", "--resume"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert full.wait(timeout=300) == 0, (tmp_path / "full.err").read_text()[-2000:]

    a, meta_a = load_checkpoint(tmp_path / "full.safetensors")
    b, meta_b = load_checkpoint(ckpt)
    assert meta_a["step"] == meta_b["step"] == STEPS
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    ja, jb = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("full", "killed"))
    print(f"\nfinetune kill -9: {KILLS} kills (delay after the bar s, steps shown, checkpoint step, rc): {figures}; "
          f"resumed from {jb['resumed_from']}; {len(a)} tensors, {len(differing)} differ; "
          f"losses identical {meta_a['losses'] == meta_b['losses']}; "
          f"metric_after {ja['metric_after']} vs {jb['metric_after']}")
    assert not differing, differing[:5]
    assert meta_a["losses"] == meta_b["losses"]
    for key in ("fp32_metric", "metric_before", "metric_after", "final_loss", "steps"):
        assert ja[key] == jb[key], key
    assert sum(1 for _, _, _, rc in figures if rc == -signal.SIGKILL) >= 1
