"""``kill -9`` of ``abfp eval`` at random points, then a rerun: nothing committed is lost and
the final results equal an uninterrupted run's exactly (seeded noise).

While each victim runs, this test reads the cache database (a concurrent reader) and notes
every committed run it sees; after the kill all of them must still be there.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TASK = textwrap.dedent(
    '''
    import torch
    from torch import nn
    from abfp.zoo.base import KL, Dataset

    def make():
        g = torch.Generator().manual_seed(5)
        model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 6))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(7))
        return model, Dataset((x,)), KL
    '''
)

#: fixed point + 3 x 3 ABFP points, 3 seeded noisy runs each: 30 cached runs
ARGS = ["eval", "--task", "tasks.py:make", "--tile-widths", "8,16,32", "--gains", "1,2,4", "--runs", "3",
        "--batch-size", "16", "--no-progress", "--threads", "1"]
N_RUNS = 30
KILLS = 5


def committed(db: Path) -> set[str]:
    """The keys committed so far (empty while the database or its table does not exist yet)."""
    if not db.exists():
        return set()
    try:
        con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=5)
        try:
            return {k for (k,) in con.execute("SELECT key FROM runs")}
        finally:
            con.close()
    except sqlite3.Error:
        return set()


def device_values(path: Path) -> dict[str, list[float]]:
    return {r["label"]: r["values"] for r in json.loads(path.read_text()) if r["format"] != "fp32"}


@pytest.mark.slow
def test_kill_9_at_random_points_then_rerun_gives_identical_results(tmp_path, record_property):
    (tmp_path / "tasks.py").write_text(TASK)
    cache = tmp_path / "cache"
    db = cache / "runs.sqlite"

    def cli(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "abfp", *ARGS, *extra], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    p = cli("--cache-dir", "", "--json", "truth.json")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    truth = device_values(tmp_path / "truth.json")
    assert sum(len(v) for v in truth.values()) == N_RUNS

    rng = random.Random(20240916)
    # kill once the victim has committed `target` runs in all (0: during start-up), then after
    # a random extra delay (up to 0.2 s), so kills fall anywhere between (or inside) commits
    targets = sorted(rng.sample(range(0, N_RUNS - 4), KILLS))
    log = []
    for target in targets:
        victim = cli("--cache-dir", str(cache))
        seen: set[str] = set()
        t0 = time.monotonic()
        while victim.poll() is None and len(seen) < target and time.monotonic() - t0 < 240:
            seen |= committed(db)
            time.sleep(0.005)
        time.sleep(rng.uniform(0.5, 2.0) if target == 0 else rng.uniform(0.0, 0.2))
        seen |= committed(db)
        finished = victim.poll() is not None
        if not finished:
            os.kill(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=60)
        after = committed(db)
        assert seen <= after, f"kill at {target}: {len(seen - after)} committed runs lost"
        log.append(f"{len(seen)}->{len(after)}{' (had finished)' if finished else ''}")
        if finished:
            assert victim.returncode == 0
        else:
            assert victim.returncode == -signal.SIGKILL

    p = cli("--cache-dir", str(cache), "--json", "final.json")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "damaged" not in err, err  # kill -9 never damages the cache
    assert device_values(tmp_path / "final.json") == truth
    assert len(committed(db)) == N_RUNS
    summary = (f"{KILLS} kill -9 at committed-run targets {targets} (seen->after: {', '.join(log)}), "
               f"{N_RUNS} runs, final results identical to the uninterrupted run")
    record_property("figures", summary)
    print("\neval kill:", summary)
