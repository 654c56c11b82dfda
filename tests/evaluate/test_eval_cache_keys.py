"""The result cache keys on what decides a result (model, data, metric) and never serves damage."""

from __future__ import annotations

import functools
import math
import sqlite3
import sys
import threading
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import abfp
from abfp import zoo
from abfp.evaluate import EvalSettings, evaluate
from abfp.evaluate.cache import CacheWarning, RunCache, _digest, run_key
from abfp.evaluate.fingerprint import callable_fingerprint, data_fingerprint, metric_fingerprint, model_fingerprint
from abfp.evaluate.grid import Point
from abfp.zoo.base import KL, TOP1, Dataset, Metric


def mlp(seed: int = 0, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 3))


# ------------------------------------------------------------------ fingerprints
def test_model_fingerprint_is_stable_and_sees_weights_structure_and_code():
    base = model_fingerprint(mlp())
    assert model_fingerprint(mlp()) == base  # rebuilt the same: the same print
    assert model_fingerprint(mlp(seed=1)) != base  # other weights
    assert model_fingerprint(mlp(act=nn.GELU)) != base  # same weights, another structure
    m = mlp()
    m[0].register_buffer("running", torch.zeros(2))
    assert model_fingerprint(m) != base  # a buffer counts

    class Scaled(nn.Module):
        def __init__(self, k: float = 1.0):
            super().__init__()
            self.lin, self.k = nn.Linear(4, 2), k

        def forward(self, x):
            return self.lin(x) * self.k

    class Scaled2(Scaled):  # same weights and attributes, another forward
        def forward(self, x):
            return self.lin(x) * self.k + 1

    torch.manual_seed(0)
    a = Scaled()
    b = Scaled(2.0)
    b.load_state_dict(a.state_dict())
    c = Scaled2()
    c.load_state_dict(a.state_dict())
    assert len({model_fingerprint(a), model_fingerprint(b), model_fingerprint(c)}) == 3


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 6 * 8 + 8 + 8 * 3 + 3 - 1), st.sampled_from([1, -1]))
def test_any_one_weight_moved_by_one_ulp_changes_the_model_fingerprint(index, direction):
    m = mlp()
    base = model_fingerprint(m)
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    assert index < flat.numel()
    with torch.no_grad():
        for p in m.parameters():
            if index < p.numel():
                v = p.view(-1)
                v[index] = torch.nextafter(v[index], torch.tensor(direction * math.inf))
                break
            index -= p.numel()
    assert model_fingerprint(m) != base


def test_data_fingerprint_sees_every_element_the_labels_and_the_dtype():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10) % 3
    base = data_fingerprint((x,), y)
    assert data_fingerprint((x.clone(),), y.clone()) == base
    x2 = x.clone()
    x2[9, 3] += 1e-6
    assert data_fingerprint((x2,), y) != base
    assert data_fingerprint((x,), (y + 1) % 3) != base
    assert data_fingerprint((x,), None) != base
    assert data_fingerprint((x.double(),), y) != base
    assert data_fingerprint((x[:9],), y[:9]) != base  # fewer samples
    assert data_fingerprint((x.to(torch.bfloat16),), y) != data_fingerprint((x.to(torch.float16),), y)


def test_metric_fingerprint_sees_the_function_and_its_parameters():
    def accuracy(out, tgt, ref, k=1):
        return 100.0 * (out.topk(k, -1).indices == tgt[:, None]).any(-1).float().mean().item()

    top1 = Metric("acc", "accuracy", functools.partial(accuracy, k=1))
    top5 = Metric("acc", "accuracy", functools.partial(accuracy, k=5))
    assert metric_fingerprint(top1) != metric_fingerprint(top5)
    assert metric_fingerprint(TOP1) != metric_fingerprint(KL)
    assert metric_fingerprint(TOP1) == metric_fingerprint(Metric(TOP1.name, TOP1.kind, TOP1.fn, unit=TOP1.unit,
                                                                 per_sample=TOP1.per_sample))
    assert metric_fingerprint(TOP1) != metric_fingerprint(Metric(TOP1.name, TOP1.kind, TOP1.fn, higher_is_better=False,
                                                                 unit=TOP1.unit, per_sample=TOP1.per_sample))

    def scaled(c):
        return lambda out, tgt, ref: c * float(out.mean())

    # the per-sample values give the standard errors a cached run holds: they count too
    halved = Metric(TOP1.name, TOP1.kind, TOP1.fn, unit=TOP1.unit, per_sample=lambda o, t, r: TOP1.per_sample(o, t, r) / 2)
    assert metric_fingerprint(halved) != metric_fingerprint(Metric(TOP1.name, TOP1.kind, TOP1.fn, unit=TOP1.unit,
                                                                   per_sample=TOP1.per_sample))
    assert callable_fingerprint(scaled(1.0)) != callable_fingerprint(scaled(2.0))  # closure values count
    assert callable_fingerprint(scaled(1.0)) == callable_fingerprint(scaled(1.0))


_USER_CODE = """
import torch
from torch import nn
SCALE = 1.0
LIMIT = torch.tensor(3.0)
CALLS = {"forward": 0}
def helper(x):
    return x * SCALE
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.offset = torch.zeros(2)  # a plain tensor attribute, not a buffer
    def forward(self, x):
        CALLS["forward"] += 1
        return torch.minimum(helper(self.fc(x)), LIMIT) + self.offset
def score(out, tgt, ref):
    return float(out.mean()) * SCALE
"""


def _user_module(name: str = "user_net"):
    """A user's module, as ``abfp eval --task mymodule:fn`` imports it."""
    import types

    mod = types.ModuleType(name)
    exec(compile(_USER_CODE, f"{name}.py", "exec"), mod.__dict__)
    return mod


def test_model_and_metric_prints_see_the_helpers_constants_and_tensors_user_code_reads():
    """A model whose forward calls a helper of its module that reads a module constant: editing
    the helper or the constant changes its outputs, so it must change the print (a cache served
    the old numbers); a counter the forward bumps must not (else nothing is ever served)."""
    mod = _user_module()
    torch.manual_seed(0)
    m = mod.Net()
    base, metric = model_fingerprint(m), callable_fingerprint(mod.score)
    m(torch.ones(1, 2))  # the counter moved: the same print
    assert model_fingerprint(m) == base and callable_fingerprint(mod.score) == metric
    mod.SCALE = 2.0
    assert model_fingerprint(m) != base and callable_fingerprint(mod.score) != metric
    mod.SCALE = 1.0
    mod.LIMIT = torch.tensor(4.0)
    assert model_fingerprint(m) != base
    mod.LIMIT = torch.tensor(3.0)
    assert model_fingerprint(m) == base
    exec("def helper(x):\n    return x * SCALE + 1\n", mod.__dict__)
    assert model_fingerprint(m) != base
    m2 = _user_module("user_net").Net()
    m2.load_state_dict(m.state_dict())
    assert model_fingerprint(m2) == base
    m2.offset = torch.ones(2)
    assert model_fingerprint(m2) != base


def test_model_fingerprint_sees_a_settings_object_and_tensor_lists_the_forward_reads():
    """A config dataclass or namespace kept on a module (``self.cfg.scale``) decides its outputs:
    two models that differ only there got one print, so the second was served the first's numbers."""
    import dataclasses
    import types

    @dataclasses.dataclass
    class Cfg:
        scale: float = 1.0

    class M(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.cfg, self.fc, self.masks = cfg, nn.Linear(2, 2), [torch.ones(2)]

        def forward(self, x):
            return self.fc(x) * self.cfg.scale * self.masks[0]

    torch.manual_seed(0)
    a = M(Cfg())
    base = model_fingerprint(a)
    for other in (Cfg(scale=2.0), types.SimpleNamespace(scale=1.0)):
        b = M(other)
        b.load_state_dict(a.state_dict())
        assert model_fingerprint(b) != base
    c = M(Cfg())
    c.load_state_dict(a.state_dict())
    assert model_fingerprint(c) == base
    c.masks = [torch.zeros(2)]
    assert model_fingerprint(c) != base


# ------------------------------------------------------------------ evaluate with a cache
def _eval(model, data, metric, cache, **kw):
    pts = [Point("abfp", abfp.ABFPConfig(tile_width=8, gain=2.0, noise_std=1.0))]
    return evaluate(model, data, metric, pts, task_name="same-name",
                    settings=EvalSettings(progress=False, runs=1, batch_size=16, layer_stats=False,
                                          cache_path=cache, **kw))[-1]["values"]


@pytest.mark.slow
def test_a_cache_never_serves_another_models_or_datas_numbers(tmp_path):
    cache = str(tmp_path / "runs.sqlite")
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    data = Dataset((x,))
    truth_a, truth_b = _eval(mlp(0), data, KL, None), _eval(mlp(1), data, KL, None)
    assert truth_a != truth_b
    assert _eval(mlp(0), data, KL, cache) == truth_a
    assert _eval(mlp(1), data, KL, cache) == truth_b  # same task name, another model
    m = mlp(0)
    with torch.no_grad():
        m[2].bias.add_(0.5)  # "retrained in place"
    assert _eval(m, data, KL, cache) == _eval(m, data, KL, None)
    other = Dataset((x.flip(0),))
    assert _eval(mlp(0), other, KL, cache) == _eval(mlp(0), other, KL, None)
    cos = zoo.COSINE
    assert _eval(mlp(0), data, cos, cache) == _eval(mlp(0), data, cos, None)
    with RunCache(cache) as c:
        assert len(c) == 5  # five distinct (model, data, metric)
    assert _eval(mlp(0), data, KL, cache) == truth_a  # and the first is still served


# ------------------------------------------------------------------ the store
def test_run_cache_rejects_what_it_could_not_serve(tmp_path):
    with RunCache(tmp_path / "c.sqlite") as c:
        for bad in ({"value": float("nan"), "seconds": 1.0}, {"seconds": 1.0}, {"value": 1.0}, [1.0]):
            with pytest.raises(ValueError, match="cannot cache run"):
                c.put("k", bad)  # type: ignore[arg-type]
        assert len(c) == 0


def test_damaged_entries_are_reported_deleted_and_not_served(tmp_path):
    path = tmp_path / "c.sqlite"
    with RunCache(path) as c:
        for i in range(4):
            c.put(f"k{i}", {"value": float(i), "seconds": 0.5})
    with sqlite3.connect(path) as con:
        con.execute("UPDATE runs SET value = replace(value, '1.0', '7.0') WHERE key = 'k1'")  # checksum
        con.execute("UPDATE runs SET value = 'nonsense', digest = 'x' WHERE key = 'k2'")
        nan = '{"seconds": 0.5, "value": NaN}'
        con.execute("UPDATE runs SET value = ?, digest = ? WHERE key = 'k3'", (nan, _digest("k3", nan)))  # NaN
    with RunCache(path) as c, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert c.get("k0") == {"value": 0.0, "seconds": 0.5}
        assert c.get("k1") is None and c.get("k2") is None and c.get("k3") is None
        assert c.keys() == ["k0"]
    msgs = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(msgs) == 3 and all(str(path) in m and "damaged" in m for m in msgs)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "schema version", "foreign table", "old json"])
def test_a_damaged_file_is_named_moved_aside_and_replaced(tmp_path, damage):
    path = tmp_path / "c.sqlite"
    with RunCache(path) as c:
        for i in range(24):  # about 12 pages of 4 KiB
            c.put(f"k{i}", {"value": float(i), "seconds": 0.5, "extra": {"pad": "x" * 2000}})
    if damage == "garbage":
        path.write_bytes(bytes(range(256)) * 64)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    elif damage == "schema version":
        with sqlite3.connect(path) as con:
            con.execute("PRAGMA user_version = 99")
    elif damage == "foreign table":
        path.unlink()
        with sqlite3.connect(path) as con:
            con.execute("CREATE TABLE runs (key TEXT, value REAL)")
    else:
        path.write_text('{"abc": {"value": 1.0}}')
    with pytest.warns(CacheWarning, match=f"cache file {path} is damaged"):
        c = RunCache(path)
    with c:
        assert len(c) == 0 and c.get("k1") is None
        c.put("k1", {"value": 1.0, "seconds": 0.1})
        assert c.get("k1") == {"value": 1.0, "seconds": 0.1}
    assert (tmp_path / "c.sqlite.damaged-1").exists()


def test_threads_and_connections_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "c.sqlite"
    caches = [RunCache(path) for _ in range(4)]  # four connections, as four processes would hold

    def write(j: int) -> None:
        for i in range(25):
            caches[j].put(f"{j}-{i}", {"value": float(i), "seconds": float(j)})

    threads = [threading.Thread(target=write, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(caches[0]) == 100
    for c in caches:
        c.close()


def test_run_key_changes_with_every_part():
    parts = {"model": "m", "data": "d", "metric": "k", "config": {"gain": 2.0}, "run": 0}
    keys = {run_key(parts)} | {run_key({**parts, name: "other"}) for name in parts}
    assert len(keys) == len(parts) + 1


# ------------------------------------------------------------------ task files
def test_same_named_task_files_in_two_folders_load_two_models(tmp_path):
    src = "import torch\nfrom torch import nn\ndef make():\n    torch.manual_seed({s})\n" \
          "    return nn.Linear(2, 2), torch.randn(4, 2), 'agreement'\n"
    for folder, s in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "tasks.py").write_text(src.format(s=s))
    before = set(sys.modules)
    ta = zoo.load_callable(f"{tmp_path / 'a' / 'tasks.py'}:make")
    tb = zoo.load_callable(f"{tmp_path / 'b' / 'tasks.py'}:make")
    assert ta.name != tb.name
    assert model_fingerprint(ta.build_model()) != model_fingerprint(tb.build_model())
    assert "tasks" not in set(sys.modules) - before  # no bare module name to collide with
    (tmp_path / "a" / "tasks.py").write_text(src.format(s=2))  # edited in place: read again
    assert model_fingerprint(zoo.load_callable(f"{tmp_path / 'a' / 'tasks.py'}:make").build_model()) == \
        model_fingerprint(tb.build_model())
    with pytest.raises(ValueError, match="no such file"):
        zoo.load_callable(f"{tmp_path / 'c' / 'tasks.py'}:make")


def test_calibration_split_sets_fixed_point_scales_and_keys_the_cache(tmp_path):
    """Fixed-point scales come from the calibration inputs when given (a task's
    ``load_calibration``), not from the evaluated ones; and the cache knows which were used."""
    from abfp.evaluate import EvalSettings, evaluate
    from abfp.zoo.base import KL, Dataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    data = Dataset((torch.randn(32, 16),))
    wide = Dataset((8.0 * torch.randn(32, 16),))  # a calibration split with a much larger range
    cfg = abfp.ABFPConfig(mode="fixed", tile_width=8, output_bits=6, gain=1.0, noise_std=0.0)
    st = EvalSettings(progress=False, batch_size=32, calibration_samples=32, cache_path=str(tmp_path / "c.sqlite"))

    def value(calibration):
        (rec,) = [r for r in evaluate(model, data, KL, [cfg], settings=st, calibration=calibration)
                  if r["format"] != "fp32"]
        return rec["value"]

    own, other = value(None), value(wide)
    assert own != other  # the static input scale came from the calibration inputs
    # independently: calibrate on the wide split by hand, then evaluate the data once
    m = abfp.convert(model, cfg)
    abfp.calibrate(m, [wide.inputs])
    with torch.no_grad():
        ref, out = model(*data.inputs), m(*data.inputs)
    assert other == pytest.approx(KL(out, None, ref), rel=1e-6)
    # served from the cache: each calibration split keeps its own result
    assert value(wide) == other and value(None) == own


def test_model_fingerprint_is_the_same_in_every_process():
    """A set literal in a method (``x in {"a", "b"}``, as torch's Conv2d has) compiles to a
    frozenset constant whose repr order follows the per-process string hash seed; the print
    must not (else a cache written by one process is never read by the next)."""
    import subprocess
    import sys

    code = ("import torch.nn as nn\n"
            "from abfp.evaluate.fingerprint import model_fingerprint\n"
            "class M(nn.Module):\n"
            "    def forward(self, x):\n"
            "        return x if self.mode in {'alpha', 'beta', 'gamma', 'delta', 'eps'} else -x\n"
            "import torch; torch.manual_seed(0)\n"
            "m = M(); m.mode = 'alpha'\n"
            "print(model_fingerprint(nn.Sequential(m, nn.Conv2d(1, 2, 3))))\n")
    prints = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout
              for seed in (1, 2, 3, 4)}
    assert len(prints) == 1 and len(prints.pop().strip()) == 64
