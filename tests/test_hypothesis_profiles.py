"""The hypothesis profiles of tests/conftest.py: the default run draws the same examples every time
(a CI failure reproduces), ``--hypothesis-profile explore`` draws new ones, ten times as many, and
a test's own ``@settings`` still compose with either (its max_examples kept, no deadline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")
PROBE = '''
import os
from hypothesis import given, settings, strategies as st

@settings(max_examples=7)
@given(st.integers(0, 10**12))
def test_probe(v):
    s = test_probe._hypothesis_internal_use_settings
    with open(os.environ["PROBE_LOG"], "a") as f:
        f.write(f"{v} {s.max_examples} {s.deadline} {s.derandomize} {s.print_blob}\\n")

@pytest.mark.parametrize("i", [0, 1])
@settings(max_examples=3)
@given(st.integers(0, 10**12))
def test_parametrised(i, v):
    with open(os.environ["PROBE_LOG"] + ".par", "a") as f:
        f.write(f"{i}\\n")
'''


def _run(tmp_path: Path, name: str, *args: str) -> tuple[list[list[str]], list[str]]:
    d = tmp_path / name
    d.mkdir()
    (d / "conftest.py").write_text(CONFTEST.read_text())
    (d / "test_probe.py").write_text("import pytest\n" + PROBE)
    log = d / "log"
    env = {k: v for k, v in os.environ.items() if k != "ABFP_EXPLORE_FACTOR"} | {"PROBE_LOG": str(log)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(d), *args],
                       cwd=d, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return [ln.split() for ln in log.read_text().splitlines()], log.with_suffix(".par").read_text().split()


@pytest.mark.slow
def test_default_profile_is_reproducible_and_explore_draws_ten_times_more_new_examples(tmp_path):
    a, par = _run(tmp_path, "ci1")
    b, _ = _run(tmp_path, "ci2")
    assert len(a) == 7 and [r[1:] for r in a] == [["7", "None", "True", "True"]] * 7
    assert a == b  # derandomised: the same examples on every run
    assert sorted(par) == ["0"] * 3 + ["1"] * 3  # a parametrised test keeps its own max_examples per case
    e, par = _run(tmp_path, "explore", "--hypothesis-profile", "explore", "--hypothesis-seed", "1")
    assert len(e) == 70 and e[0][1:] == ["70", "None", "False", "True"]
    assert sorted(par) == ["0"] * 30 + ["1"] * 30  # scaled once, not once per parametrised case
    assert {r[0] for r in e} != {r[0] for r in a}  # new examples
