"""The authors' micro-benchmark: files written, numbers sane (small batch to stay fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abfp.evaluate.microbench import check_observations, run_microbench


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[dict]]:
    out = tmp_path_factory.mktemp("microbench")
    table = run_microbench(out, batch=1, seed=0)
    rows = json.loads((out / "microbench.json").read_text())
    return out, table, rows


def _row(rows: list[dict], n: int, g: float, noisy: bool) -> dict:
    (r,) = [r for r in rows if r["tile_width"] == n and r["gain"] == g and (r["noise_std"] > 0) == noisy]
    return r


def test_files_and_table(bench: tuple[Path, str, list[dict]]) -> None:
    out, table, rows = bench
    for name in ("microbench.json", "microbench.md", "microbench.png"):
        assert (out / name).stat().st_size > 0
    assert len(rows) == 3 * 5 * 2
    assert table.count("\n") == len(rows) + 1  # header, rule, one line per row
    md = (out / "microbench.md").read_text()
    assert table in md and "microbench.png" in md
    assert md.count("agree") >= 3  # each observation gets a verdict


def test_numbers_are_sane(bench: tuple[Path, str, list[dict]]) -> None:
    _, _, rows = bench
    for r in rows:
        assert 0 <= r["saturated_fraction"] <= 1
        assert 0 < r["mean_abs_error"] <= r["max_abs_error"]
        assert 0 < r["relative_error"] < 1
    # n = 128: more gain spends ADC codes on the small products, no saturation yet
    assert _row(rows, 128, 8.0, False)["error_std"] < _row(rows, 128, 1.0, False)["error_std"]
    for n in (8, 32, 128):
        for noisy in (False, True):
            sat = [_row(rows, n, g, noisy)["saturated_fraction"] for g in (1.0, 2.0, 4.0, 8.0, 16.0)]
            assert sat == sorted(sat)
            for g in (1.0, 2.0, 4.0, 8.0, 16.0):
                clean, noisy_r = _row(rows, n, g, False), _row(rows, n, g, True)
                # independent noise adds variance; where almost all error is clipping, it is a wash
                assert noisy_r["error_std"] >= clean["error_std"] * (1 - 1e-3)


def test_observation_checks_follow_the_numbers() -> None:
    def row(n: int, g: float, std: float, mx: float, sat: float) -> dict:
        return {"tile_width": n, "gain": g, "noise_std": 0.0, "error_std": std, "max_abs_error": mx,
                "saturated_fraction": sat}

    gains = (1.0, 2.0, 4.0, 8.0, 16.0)
    rows = [row(8, g, g, g, 0.0) for g in gains]  # grows everywhere
    rows += [row(128, g, 1.0, 1.0, 0.0) for g in gains]  # flat: does not shrink
    rows += [row(32, g, 1 / g, m, s) for g, m, s in zip(gains, (4, 3, 2, 5, 9), (0, 0, 0, 1e-4, 1e-2))]
    lines = check_observations(rows)
    assert "agrees (at every gain step)" in lines[0]
    assert "disagrees" in lines[1]
    assert "agrees: max |E| rises exactly at G = 8 and 16" in lines[2]
