"""Two ``abfp eval`` processes sharing one cache directory at once lose nothing.

The grids overlap (both compute tile width 16), so the two processes also write the same
entries. Afterwards a run over the union of both grids must recompute nothing: the model is
called only for the float32 reference (each call is logged to a file).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TASK = textwrap.dedent(
    '''
    import os
    import time
    import torch
    from torch import nn
    from abfp.zoo.base import KL, Dataset

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 24), nn.Linear(24, 6)

        def forward(self, x):
            log = os.environ.get("ABFP_TEST_FORWARD_LOG")
            if log:
                with open(log, "a") as f:
                    f.write("forward\\n")
            time.sleep(float(os.environ.get("ABFP_TEST_SLEEP", "0")))  # long enough runs to overlap
            return self.fc2(torch.relu(self.fc1(x)))

    def barrier(folder, parties):
        """Wait until `parties` processes got here: both evaluations start together."""
        open(os.path.join(folder, f"ready-{os.getpid()}"), "w").close()
        t0 = time.monotonic()
        while sum(n.startswith("ready-") for n in os.listdir(folder)) < parties and time.monotonic() - t0 < 120:
            time.sleep(0.01)

    def make():
        if os.environ.get("ABFP_TEST_BARRIER"):
            barrier(os.environ["ABFP_TEST_BARRIER"], 2)
        g = torch.Generator().manual_seed(11)
        model = Net()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(7))
        return model, Dataset((x,)), KL
    '''
)

COMMON = ["eval", "--task", "tasks.py:make", "--gains", "1,2,4", "--runs", "3", "--batch-size", "16",
          "--no-progress", "--threads", "1", "--no-fixed"]


def device_values(path: Path) -> dict[str, list[float]]:
    return {r["label"]: r["values"] for r in json.loads(path.read_text()) if r["format"] != "fp32"}


@pytest.mark.slow
def test_two_concurrent_evals_on_one_cache_lose_nothing(tmp_path, record_property):
    (tmp_path / "tasks.py").write_text(TASK)
    cache = tmp_path / "cache"

    def cli(tiles: str, out: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "abfp", *COMMON, "--tile-widths", tiles, "--cache-dir",
                                 str(cache), "--json", out], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, **env})

    sync = tmp_path / "barrier"
    sync.mkdir()
    env = {"ABFP_TEST_BARRIER": str(sync), "ABFP_TEST_SLEEP": "0.01"}
    first, second = cli("8,16", "p1.json", **env), cli("32,16", "p2.json", **env)  # both at once
    for p in (first, second):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    both = {**device_values(tmp_path / "p1.json"), **device_values(tmp_path / "p2.json")}
    expected = sum(len(v) for v in both.values())  # 3 tiles x 3 gains x 3 runs = 27 distinct runs
    assert expected == 27
    with sqlite3.connect(cache / "runs.sqlite") as con:
        stored = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        # did the two really write at the same time? (their own points, each written first: n=8 and n=32)
        spans = [con.execute("SELECT MIN(written), MAX(written) FROM runs WHERE info LIKE ?", (f"% n={n} %",)).fetchone()
                 for n in (8, 32)]
    assert stored == expected
    overlap = max(0.0, min(spans[0][1], spans[1][1]) - max(spans[0][0], spans[1][0]))
    assert overlap > 0, f"the two evaluations did not write at the same time: {spans}"

    log = tmp_path / "forward.log"
    union = cli("8,16,32", "union.json", ABFP_TEST_FORWARD_LOG=str(log))
    _, err = union.communicate(timeout=300)
    assert union.returncode == 0, err[-3000:]
    assert len(log.read_text().splitlines()) == 4  # the float32 pass only (64 samples / 16): all 27 hit
    assert device_values(tmp_path / "union.json") == both
    summary = (f"2 concurrent evals (9 + 9 points, 3 shared): {stored}/{expected} runs stored, rerun recomputed 0; "
               f"their writes overlapped for {overlap:.2f} s")
    record_property("figures", summary)
    print("\neval concurrent:", summary)
