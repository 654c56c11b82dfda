"""Reliability of ``abfp eval``'s result cache: it knows the model, and damage is never served.

Every run here is a real ``python -m abfp eval`` subprocess on a tiny user task file (an MLP
on 64 random samples). The truth each cached figure is compared with is the same evaluation
with the cache off.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TASK = textwrap.dedent(
    '''
    import os
    import torch
    from torch import nn
    from abfp.zoo.base import KL, Dataset

    SEED = {seed}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 24), nn.Linear(24, 6)

        def forward(self, x):
            log = os.environ.get("ABFP_TEST_FORWARD_LOG")
            if log:  # one line per model call: how much was recomputed
                with open(log, "a") as f:
                    f.write("forward\\n")
            return self.fc2(torch.relu(self.fc1(x)))

    def make():
        g = torch.Generator().manual_seed(SEED)
        model = Net()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(7))
        return model, Dataset((x,)), KL
    '''
)

#: a small noisy grid: fixed point and ABFP, 2 tile widths x 2 gains, 2 seeded runs each
GRID = ["--tile-widths", "8,16", "--gains", "1,4", "--runs", "2", "--batch-size", "32", "--no-progress",
        "--threads", "1"]


def write_task(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tasks.py"
    path.write_text(TASK.format(seed=seed))
    return path


def abfp_eval(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    p = subprocess.run([sys.executable, "-m", "abfp", "eval", *GRID, *args], capture_output=True, text=True,
                       cwd=cwd, timeout=300, env={**os.environ, **(env or {})})
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def device_values(json_path: Path) -> dict[str, dict[str, list[float]]]:
    """{model: {point label: values}} of the device rows of an ``--json`` file."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in json.loads(json_path.read_text()):
        if r["format"] != "fp32":
            out.setdefault(r["model"], {})[r["label"]] = r["values"]
    return out


def rows(cache_dir: Path) -> int:
    with sqlite3.connect(cache_dir / "runs.sqlite") as c:
        return c.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


@pytest.mark.slow
def test_same_task_file_name_in_two_folders_and_a_model_retrained_in_place(tmp_path, record_property):
    a, b, c = write_task(tmp_path / "a", 1), write_task(tmp_path / "b", 2), write_task(tmp_path / "c", 3)
    # the truth: all three models in one run, cache off
    abfp_eval("--task", "a/tasks.py:make", "--task", "b/tasks.py:make", "--task", "c/tasks.py:make",
              "--cache-dir", "", "--json", "truth.json", cwd=tmp_path)
    truth = device_values(tmp_path / "truth.json")
    ta, tb, tc = truth["a/tasks.py:make"], truth["b/tasks.py:make"], truth["c/tasks.py:make"]
    assert ta != tb and tb != tc and ta != tc, "three different models, same file and function names"
    n_runs = sum(len(v) for v in ta.values())

    # across runs, one cache: a, then b from another folder, then a retrained in place (= c's weights)
    cache = tmp_path / "cache"
    abfp_eval("--task", "a/tasks.py:make", "--cache-dir", str(cache), "--json", "a1.json", cwd=tmp_path)
    assert device_values(tmp_path / "a1.json")["a/tasks.py:make"] == ta
    abfp_eval("--task", "b/tasks.py:make", "--cache-dir", str(cache), "--json", "b1.json", cwd=tmp_path)
    assert device_values(tmp_path / "b1.json")["b/tasks.py:make"] == tb  # not a's cached numbers
    assert rows(cache) == 2 * n_runs
    a.write_text(c.read_text())  # "retrain" a in place
    abfp_eval("--task", "a/tasks.py:make", "--cache-dir", str(cache), "--json", "a2.json", cwd=tmp_path)
    assert device_values(tmp_path / "a2.json")["a/tasks.py:make"] == tc  # not a's old numbers
    assert rows(cache) == 3 * n_runs
    record_property("figures", f"3 models under one file name: 3 distinct results, {n_runs} runs each, "
                               f"all equal to the uncached truth")
    print(f"\neval cache: 3 models named tasks.py:make -> distinct, each equal to the uncached truth "
          f"({n_runs} runs each); retrained in place -> recomputed")


@pytest.mark.slow
def test_a_damaged_cache_is_reported_by_name_and_recomputed(tmp_path, record_property):
    write_task(tmp_path / "a", 1)
    cache = tmp_path / "cache"
    db = cache / "runs.sqlite"
    abfp_eval("--task", "a/tasks.py:make", "--cache-dir", "", "--json", "truth.json", cwd=tmp_path)
    truth = device_values(tmp_path / "truth.json")
    abfp_eval("--task", "a/tasks.py:make", "--cache-dir", str(cache), cwd=tmp_path)
    n = rows(cache)
    log = tmp_path / "forward.log"

    def rerun(tag: str) -> tuple[str, int]:
        log.write_text("")
        p = abfp_eval("--task", "a/tasks.py:make", "--cache-dir", str(cache), "--json", f"{tag}.json", cwd=tmp_path,
                      env={"ABFP_TEST_FORWARD_LOG": str(log)})
        assert device_values(tmp_path / f"{tag}.json") == truth, tag  # damage never served
        return p.stderr, len(log.read_text().splitlines())

    fp32_only = 64 // 32  # model calls of the float32 pass alone (64 samples, batches of 32)

    # 1. damaged entries: a changed value (checksum no longer matches) and invalid JSON
    with sqlite3.connect(db) as con:
        keys = [k for (k,) in con.execute("SELECT key FROM runs ORDER BY key")]
        con.execute("UPDATE runs SET value = replace(value, '\"value\": ', '\"value\": 1') WHERE key = ?", (keys[0],))
        con.execute("UPDATE runs SET value = '{not json', digest = 'x' WHERE key = ?", (keys[1],))
    err, calls = rerun("entries")
    assert err.count(f"cache file {db}: entry") == 2 and "damaged" in err, err
    assert calls > fp32_only and rows(cache) == n  # the two runs recomputed and stored again

    damages = {
        "garbage bytes": lambda: db.write_bytes(b"\x00garbage\xff" * 500),
        "truncated file": lambda: db.write_bytes(db.read_bytes()[: db.stat().st_size // 2]),
        "wrong schema": lambda: (db.unlink(), sqlite3.connect(db).execute("CREATE TABLE runs (k TEXT)").connection.commit()),
    }
    figures = ["2 damaged entries"]
    for i, (what, damage) in enumerate(damages.items(), start=1):
        damage()
        err, calls = rerun(f"file{i}")
        assert f"cache file {db} is damaged" in err, (what, err)
        assert (cache / f"runs.sqlite.damaged-{i}").exists(), what  # kept for inspection, not served
        assert calls > fp32_only and rows(cache) == n, what  # recomputed into a fresh cache
        figures.append(what)
    record_property("figures", "damaged: " + ", ".join(figures) + " -> named, recomputed, results identical")
    print(f"\neval cache damage: {', '.join(figures)} -> warning naming {db.name}, no traceback, recomputed, "
          "identical to the uncached truth")
