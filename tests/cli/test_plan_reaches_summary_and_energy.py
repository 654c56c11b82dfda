"""``--plan`` reaches ``abfp summary`` (new) and ``abfp energy``: every module at its own device,
refused for another architecture, with ``--preset``/``--config``, or for several tasks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from abfp import ABFPConfig
from abfp.cli import main
from abfp.nn import convert, summary
from abfp.tune.plan import DevicePlan
from abfp.tune.provenance import architecture_fingerprint

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "evaluate"))
import tiny_task  # noqa: E402

TASK = str(HERE.parent / "evaluate" / "tiny_task.py") + ":make"
DW, FC = ABFPConfig(gain=2.0, noise_std=0.0), ABFPConfig(gain=4.0, repeats=2, noise_std=0.0)


def _plan(tmp_path: Path, architecture: str | None = None) -> Path:
    model = tiny_task.make().build_model()
    plan = DevicePlan(ABFPConfig(noise_std=0.0), {"dw": DW, "fc": FC},
                      info={"weights": {"architecture": architecture or architecture_fingerprint(model)}})
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return path


def _rows(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in text.splitlines() if ":" in line.split()[0]}


def test_summary_tabulates_each_module_at_its_plan_device(tmp_path, capsys):
    """abfp summary had no --plan: a tuned plan's per-module gains and repeats could not be tabulated."""
    assert main(["summary", "--task", TASK, "--plan", str(_plan(tmp_path)), "--batch-size", "8"]) == 0
    rows = _rows(capsys.readouterr().out)
    x = tiny_task.make().load_data().take(8).inputs
    by_hand = convert(tiny_task.make().build_model(), ABFPConfig(noise_std=0.0), overrides={"dw": DW, "fc": FC})
    expected = {r["site"]: r for r in summary(by_hand, x).as_dicts()}
    assert set(rows) == set(expected)
    for site, r in expected.items():
        assert int(rows[site][-3].replace(",", "")) == r["adc_conversions"]
        assert float(rows[site][-2]) == pytest.approx(100 * r["saturated_fraction"], abs=1e-3)
    # not the base device's table: fc runs twice (repeats 2) and at G = 4 does not saturate (at G = 8 it does)
    assert expected["fc:linear0"]["adc_conversions"] == 2 * 80 and expected["fc:linear0"]["saturated_fraction"] == 0


@pytest.mark.parametrize("command", ["summary", "energy"])
@pytest.mark.parametrize("extra,message", [
    (["--config", "{}"], "--plan sets the device; drop --config"),
    (["--preset", "default"], "--plan sets the device; drop --preset"),
])
def test_plan_with_a_base_device_is_refused(command, extra, message, tmp_path, capsys):
    assert main([command, "--task", TASK, "--plan", str(_plan(tmp_path)), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["summary", "energy"])
def test_a_plan_tuned_for_another_architecture_is_refused(command, tmp_path, capsys):
    """abfp energy --plan accounted a plan on any model whose module names matched."""
    assert main([command, "--task", TASK, "--plan", str(_plan(tmp_path, "0" * 64))]) == 2
    assert "another architecture" in capsys.readouterr().err


def test_summary_plan_with_every_task_is_refused(tmp_path, capsys):
    assert main(["summary", "--task", "all", "--plan", str(_plan(tmp_path))]) == 2
    assert "one --task" in capsys.readouterr().err
