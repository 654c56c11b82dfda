"""Data-parallel finetuning: a 2-process gloo job (torchrun) against one process.

Noise-free QAT (ADC rounding only; batch norm, no dropout) on two processes ends with the
single-process weights up to float rounding: not bitwise, because DDP's all-reduce adds
the two ranks' gradient sums (each the mean over 32 samples) where one process adds 64
samples in one reduction, and batch norm's global statistics are summed per rank too, so
the last bits differ (about 1e-7 after 5 steps). With noise (DNF, dropout, refreshes) the
two-process run is reproducible and a killed, resumed run equals the uninterrupted one
exactly. Rank 0 alone writes; the evaluation is shared among the ranks and exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_job import dnf_noisy, qat_noise_free, record

from abfp.finetune.data import training_data
from abfp.finetune.parallel import check_divisible, shard, step_seed

try:
    training_data("fashion-cnn", 64)
    HAVE_TRAIN = True
except FileNotFoundError:
    HAVE_TRAIN = False

JOB = Path(__file__).parent / "ddp_job.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    p = subprocess.run([*TORCHRUN, str(JOB), str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _load(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=False)


def test_sharding_and_seeds() -> None:
    x, t = torch.arange(8).view(8, 1), torch.arange(8)
    parts = [shard(((x,), t), r, 4) for r in range(4)]
    assert torch.equal(torch.cat([p[0][0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), t)
    seeds = {step_seed(s, r, k) for s in range(3) for r in range(4) for k in range(100)}
    assert len(seeds) == 3 * 4 * 100
    with pytest.raises(ValueError, match="not divisible by the number of processes"):
        check_divisible(63, 2)


def test_two_processes_equal_one_without_noise(two_ranks: Path) -> None:
    one, two = record(qat_noise_free()), _load(two_ranks, "qat")
    assert two["details"]["world_size"] == 2 and one["details"]["world_size"] == 1
    assert one["state"].keys() == two["state"].keys()
    for k, a in one["state"].items():
        torch.testing.assert_close(two["state"][k], a, atol=1e-6, rtol=0, msg=k)
    assert two["losses"] == pytest.approx(one["losses"], rel=0, abs=1e-6)
    assert two["metric_before"] == one["metric_before"]  # same weights: the sharded evaluation is exact
    assert two["metric_after"] == one["metric_after"]


def test_two_processes_with_noise_reproducible_and_resumable(two_ranks: Path) -> None:
    a, b, resumed = (_load(two_ranks, n) for n in ("dnf_a", "dnf_b", "dnf_resumed"))
    assert resumed["details"]["resumed_from"] == 2
    for other in (b, resumed):
        assert other["losses"] == a["losses"]
        assert other["metric_after"] == a["metric_after"]
        for k, v in a["state"].items():
            assert torch.equal(other["state"][k], v), k
    # noise is drawn per rank: the two-process run is not the one-process run
    one = record(dnf_noisy())
    assert one["losses"][1:] != a["losses"][1:]


def test_indivisible_batch_is_refused(two_ranks: Path) -> None:
    assert "batch size 63 is not divisible by the number of processes (2)" in (two_ranks / "indivisible.txt").read_text()


@pytest.mark.skipif(not HAVE_TRAIN, reason="Fashion-MNIST training data (dataset-fashion-mnist) not installed")
def test_cli_under_torchrun(tmp_path: Path) -> None:
    args = ["-m", "abfp", "finetune", "--method", "qat", "--steps", "2", "--train-samples", "64", "--eval-samples",
            "40", "--no-progress", "--threads", "1", "--checkpoint", str(tmp_path / "c.safetensors")]
    p = subprocess.run([*TORCHRUN, *args, "--batch-size", "15"], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "abfp: error: --batch-size 15 is not divisible by the number of processes (2)" in p.stderr
    out = tmp_path / "r.json"
    p = subprocess.run([*TORCHRUN, *args, "--batch-size", "16", "--json", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("on 2 processes") == 1  # rank 0 alone prints
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["steps"] == 2 and (tmp_path / "c.safetensors").exists()
