"""``abfp eval --preset/--config``: the named device is the base of the sweep. Every field it sets
reaches the simulated device and the records; sweep flags given on the command line override only
the fields they name."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abfp.cli import build_parser, eval_points, main
from abfp.config import ABFPConfig, presets

SWEEP_FIELDS = ("tile_width", "weight_bits", "input_bits", "output_bits", "gain", "noise_std")


def _points(argv: list[str]):
    return eval_points(build_parser().parse_args(["eval", *argv]))


def _device_rows(points, mode: str) -> list[ABFPConfig]:
    return [p.config for p in points if p.format == mode]


@pytest.mark.parametrize("name", sorted(presets()))
def test_every_preset_is_the_device_of_the_sweep(name):
    preset = ABFPConfig.preset(name)
    points, _ = _points(["--preset", name])
    assert [p.format for p in points if p.config is None] == ["fp32"]
    assert _device_rows(points, preset.mode) == [preset]
    if preset.mode == "abfp":  # the fixed-point baseline at the preset's bits and noise
        (fixed,) = _device_rows(points, "fixed")
        assert (fixed.weight_bits, fixed.input_bits, fixed.output_bits, fixed.noise_std, fixed.gain) == (
            preset.weight_bits, preset.input_bits, preset.output_bits, preset.noise_std, 1.0)
        # at the base device's tile width: abfp-888-n32's baseline ran at n = 128 whatever the preset said
        assert fixed == preset.replace(mode="fixed", gain=1.0)
    else:  # a fixed-point device: no 'abfp' rows
        assert [p.format for p in points] == ["fp32", "fixed"]


def test_the_fixed_point_baseline_is_the_base_device_in_fixed_mode_and_its_row_says_its_tile_width():
    from abfp.evaluate import format_table

    points, _ = _points(["--config", '{"tile_width": 32, "scale_dtype": "pow2"}', "--tile-widths", "8,32"])
    (fixed,) = _device_rows(points, "fixed")
    assert fixed == ABFPConfig(mode="fixed", tile_width=32, gain=1.0, scale_dtype="pow2")
    points, _ = _points([])  # no base device named: the authors' baseline, n = 128
    (fixed,) = _device_rows(points, "fixed")
    assert fixed == ABFPConfig(mode="fixed", gain=1.0)
    rec = {"model": "m", "format": "fixed", "tile_width": 32, "weight_bits": 8, "input_bits": 8, "output_bits": 8,
           "gain": 1.0, "noise_std": 0.0, "value": 1.0, "runs": 1, "delta_vs_fp32": 0.0, "seconds": 0.0,
           "metric": "m", "samples": 1}
    assert "fixed     32" in format_table([rec])


def test_command_line_sweep_overrides_only_what_it_names():
    preset = ABFPConfig.preset("abfp-668-n32")
    points, _ = _points(["--preset", "abfp-668-n32", "--gains", "4,16"])
    assert _device_rows(points, "abfp") == [preset.replace(gain=4.0), preset.replace(gain=16.0)]
    points, _ = _points(["--preset", "abfp-668-n32", "--tile-widths", "8,128", "--bits", "8/8/8"])
    assert _device_rows(points, "abfp") == [preset.replace(tile_width=n, weight_bits=8, input_bits=8, output_bits=8)
                                            for n in (8, 128)]


def test_without_preset_the_default_sweep_is_unchanged():
    points, runs = _points([])
    rows = _device_rows(points, "abfp")
    assert runs == 3 and len(rows) == 3 * 5
    assert {(c.tile_width, c.gain) for c in rows} == set(itertools.product((8, 32, 128), (1.0, 2.0, 4.0, 8.0, 16.0)))
    assert all(c.replace(tile_width=128, gain=8.0) == ABFPConfig() for c in rows)


configs = st.builds(
    ABFPConfig,
    mode=st.sampled_from(["abfp", "fixed"]),
    tile_width=st.sampled_from([4, 8, 16, 64]),
    input_bits=st.integers(2, 12), weight_bits=st.integers(2, 12), output_bits=st.integers(2, 16),
    gain=st.sampled_from([0.5, 1.0, 3.0, 8.0]),
    noise_std=st.sampled_from([0.0, 0.1, 1.5]),
    noise_dist=st.sampled_from(["uniform", "gaussian"]),
    scale_dtype=st.sampled_from(["bfloat16", "float32", "pow2"]),
    seed=st.none() | st.integers(0, 99),
    bf16_tile_outputs=st.booleans(), bf16_io=st.booleans(),
    kernel=st.sampled_from(["auto", "reference", "chunked"]),
)
overrides = st.fixed_dictionaries({}, optional={
    "tile_width": st.lists(st.sampled_from([8, 32, 128]), min_size=1, max_size=2, unique=True),
    "gain": st.lists(st.sampled_from([1.0, 2.0, 16.0]), min_size=1, max_size=2, unique=True),
    "bits": st.lists(st.sampled_from([(6, 6, 8), (8, 8, 8), (4, 5, 9)]), min_size=1, max_size=2, unique=True),
    "noise_std": st.lists(st.sampled_from([0.0, 0.25, 2.0]), min_size=1, max_size=2, unique=True),
    "noise_dist": st.sampled_from(["uniform", "gaussian"]),
})


@settings(max_examples=60, deadline=None)
@given(base=configs, over=overrides)
def test_config_fields_survive_and_flags_override_only_their_fields(base, over):
    argv = ["--config", base.to_json(indent=None, execution=True)]  # device and execution options
    flag = {"tile_width": "--tile-widths", "gain": "--gains", "noise_std": "--noise"}
    for key, values in over.items():
        if key == "bits":
            argv += ["--bits", ",".join("/".join(map(str, b)) for b in values)]
        elif key == "noise_dist":
            argv += ["--noise-dist", values]
        else:
            argv += [flag[key], ",".join(str(v) for v in values)]
    # expected, independently: the base with every combination of the named values
    dist = {"noise_dist": over["noise_dist"]} if "noise_dist" in over else {}
    bits = over.get("bits", [(base.weight_bits, base.input_bits, base.output_bits)])
    expected = {base.replace(tile_width=n, weight_bits=b[0], input_bits=b[1], output_bits=b[2], gain=g,
                             noise_std=z, **dist)
                for b, z, n, g in itertools.product(bits, over.get("noise_std", [base.noise_std]),
                                                    over.get("tile_width", [base.tile_width]),
                                                    over.get("gain", [base.gain]))}
    points, _ = _points(argv)
    assert set(_device_rows(points, base.mode)) == expected
    assert len(_device_rows(points, base.mode)) == len(expected)
    if base.mode == "fixed":
        assert {p.format for p in points} == {"fp32", "fixed"}


TASK = '''
import torch
from torch import nn
from abfp.zoo.base import TOP1, Dataset, Task

def make():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(40, 24, generator=g)
    y = torch.randint(0, 5, (40,), generator=g)
    return Task("lin", "tiny linear", lambda: model, lambda: Dataset((x,), y), TOP1, default_batch_size=16)
'''


def _top1_on_device(task_file: Path, cfg: ABFPConfig) -> float:
    """The task's top-1 on ``cfg``, computed here without the CLI (noise-free configs)."""
    from abfp.cli_common import resolve_tasks
    from abfp.nn import calibrate, convert

    (task,) = resolve_tasks([f"{task_file}:make"])
    data = task.load_data()
    model = convert(copy.deepcopy(task.build_model()), cfg)
    if cfg.mode == "fixed":
        calibrate(model, [data.inputs])
    with torch.no_grad():  # the task's batches of 16 (its default batch size)
        out = torch.cat([model(data.inputs[0][i:i + 16]) for i in range(0, len(data), 16)])
    return 100.0 * int((out.argmax(1) == data.targets).sum()) / len(data.targets)  # exact


@pytest.mark.parametrize("device", [
    ABFPConfig(tile_width=8, weight_bits=4, input_bits=3, output_bits=5, gain=2.0, noise_std=0.0,
               scale_dtype="float32"),
    ABFPConfig(mode="fixed", tile_width=8, weight_bits=4, input_bits=4, output_bits=6, gain=1.0, noise_std=0.0),
])
def test_eval_records_show_the_config_and_its_numbers(device, tmp_path, capsys):
    task_file = tmp_path / "lin_task.py"
    task_file.write_text(TASK)
    cfg_file = tmp_path / "device.json"
    device.to_json(cfg_file)
    out = tmp_path / "r.json"
    no_fixed = ["--no-fixed"] if device.mode == "abfp" else []  # a fixed-point base has no baseline to skip
    assert main(["eval", "--task", f"{task_file}:make", "--config", str(cfg_file), "--json", str(out),
                 "--cache-dir", "", "--no-progress", *no_fixed]) == 0
    recs = json.loads(out.read_text())
    assert [r["format"] for r in recs] == ["fp32", device.mode]
    rec = recs[1]
    assert rec["config"] == device.to_dict(execution=True)
    for field in SWEEP_FIELDS:
        assert rec[field] == getattr(device, field), field
    assert rec["noise_dist"] == device.noise_dist
    assert rec["value"] == pytest.approx(_top1_on_device(task_file, device), abs=1e-9)
    assert f"{device.weight_bits}/{device.input_bits}/{device.output_bits}" in capsys.readouterr().out
