"""The commands' plots are drawn on matplotlib's Agg canvas whatever ``MPLBACKEND`` says (an unknown
backend there made ``import matplotlib`` raise, and ``abfp tune`` failed after all its work, its plan
and weights written, its report not), and a missing matplotlib is refused before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")
TASK = "import torch\n\ndef make():\n    torch.manual_seed(0)\n    return torch.nn.Linear(6, 4), torch.randn(12, 6), 'agreement'\n"


def _abfp(argv: list[str], env: dict[str, str], prelude: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{prelude}\nfrom abfp.cli import main\nsys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **env})


def test_tune_and_report_plot_under_an_unusable_mplbackend(tmp_path: Path):
    (tmp_path / "t.py").write_text(TASK)
    out = tmp_path / "o"
    r = _abfp(["tune", "--task", f"{tmp_path}/t.py:make", "--json", str(out / "plan.json"), "--no-progress"],
              {"MPLBACKEND": "no-such-backend"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "plan.png", "plan.report.md", "plan.safetensors"]
    assert (out / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_matplotlib_is_refused_before_the_work(tmp_path: Path):
    (tmp_path / "t.py").write_text(TASK)
    out = tmp_path / "o"
    r = _abfp(["tune", "--task", f"{tmp_path}/t.py:make", "--json", str(out / "plan.json"), "--no-progress"],
              {}, prelude="sys.modules['matplotlib'] = None  # as if not installed")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "abfp's plots need matplotlib" in r.stderr, r.stderr
    assert not out.exists() or not list(out.iterdir())  # no plan, no weights, no journal
