"""Finetuning runs of the data-parallel tests, on one process or under ``torchrun``.

``python -m torch.distributed.run --standalone --nproc-per-node 2 ddp_job.py OUT`` runs every
scenario of :data:`SCENARIOS` on two gloo processes; rank 0 writes ``OUT/<name>.pt`` (final
float32 weights, losses, metrics). ``test_parallel.py`` runs the same functions in-process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ft_tiny import TinyNet, make_data

from abfp import ABFPConfig
from abfp.finetune import FinetuneResult, dnf, qat

torch.set_num_threads(1)

COMMON: dict[str, Any] = dict(steps=5, lr=0.01, batch_size=64, progress=False, timing_steps=1, timing_every=2)


class Killed(Exception):
    pass


def qat_noise_free() -> FinetuneResult:
    """QAT on a device without noise (ADC rounding only), batch norm and no dropout: nothing random."""
    cfg = ABFPConfig(tile_width=8, gain=1.0, noise_std=0.0, seed=3)
    return qat(TinyNet(batch_norm=True).eval(), make_data(256, 1), cfg, eval_data=make_data(128, 2), **COMMON)


def dnf_noisy(ckpt: Path | None = None, resume: bool = False, kill_at: int = 0) -> FinetuneResult:
    """DNF with noise, dropout, batch norm and a histogram refresh: random at every step."""

    def callback(done: int, loss: float) -> None:
        if done == kill_at:
            raise Killed

    cfg = ABFPConfig(tile_width=8, gain=1.0, noise_std=0.5, seed=3)
    return dnf(TinyNet(dropout=0.2, batch_norm=True).eval(), make_data(256, 1), cfg, eval_data=make_data(128, 2),
               sampler="eager", calibration_samples=32, refresh_every=2, checkpoint=ckpt, checkpoint_every=2,
               resume=resume, callback=callback if kill_at else None, **COMMON)


def record(r: FinetuneResult) -> dict[str, Any]:
    return {"state": {k: v.detach().clone() for k, v in r.model.state_dict().items()}, "losses": r.losses,
            "metric_before": r.metric_before, "metric_after": r.metric_after, "details": r.details}


def run_all(out: Path, rank: int) -> None:
    runs: dict[str, Callable[[], FinetuneResult]] = {
        "qat": qat_noise_free,
        "dnf_a": dnf_noisy,
        "dnf_b": dnf_noisy,  # the global generator has moved on: only the per-step seeds make it equal
    }
    for name, fn in runs.items():
        r = fn()
        if rank == 0:
            torch.save(record(r), out / f"{name}.pt")
    ckpt = out / "dnf.safetensors"
    try:
        dnf_noisy(ckpt, kill_at=3)  # killed after step 3; the checkpoint holds step 2
    except Killed:
        pass
    r = dnf_noisy(ckpt, resume=True)
    if rank == 0:
        torch.save(record(r), out / "dnf_resumed.pt")
    try:
        qat(TinyNet(), make_data(256, 1), ABFPConfig(), steps=1, lr=0.01, batch_size=63, progress=False)
    except ValueError as e:
        if rank == 0:
            (out / "indivisible.txt").write_text(str(e))


if __name__ == "__main__":
    from abfp.evaluate.distributed import init_from_env, shutdown

    rank, _ = init_from_env()
    run_all(Path(sys.argv[1]), rank)
    shutdown()
