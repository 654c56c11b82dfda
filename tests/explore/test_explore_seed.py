"""The explore JSON says which noise seed and kernel its designs ran with."""

from __future__ import annotations

from pathlib import Path

import abfp
from abfp import ABFPConfig


def test_explore_records_the_seed_and_kernel_its_designs_ran_with():
    """A base device with its own noise seed: its designs run from that seed (evaluate's rule), and
    the explore JSON said seed 0 and left the device's execution options out of base_config."""
    task = str(Path(__file__).with_name("explore_tiny_task.py")) + ":make"
    kw = dict(formats=("abfp",), tile_widths=(8,), gains=(4,), auto_gain=False, adc_bits=(6, 6), dac_search="none",
              noise_stds=(0.5,), runs=2, progress=False)
    own = abfp.explore(task, base=ABFPConfig(seed=7, kernel="chunked"), **kw)
    assert own["seed"] == 7
    assert own["base_config"]["execution"] == {"kernel": "chunked", "seed": 7}
    assert ABFPConfig.from_dict(own["base_config"]) == ABFPConfig(seed=7, kernel="chunked")
    given = abfp.explore(task, seed=7, **kw)  # the same seed given as the evaluation's: the same numbers
    assert [d["values"] for d in own["designs"]] == [d["values"] for d in given["designs"]]
