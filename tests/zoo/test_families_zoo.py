"""The zoo's stand-ins for RNN-T, 3D U-Net and DLRM in float32: tasks, weights, generators, metrics.

The float32 metric of each shipped model is checked against the figure the training script
measured and stored in the weight file's metadata (``test_metric``, scripts/train_families.py).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from abfp import zoo
from abfp.finetune.data import TRAINABLE_TASKS, training_data
from abfp.zoo import dlrm, lstm, unet3d
from abfp.zoo.base import TOP1, Dataset

NEW_TASKS = ("fashion-lstm", "unet3d", "dlrm")
WEIGHTS = {"fashion-lstm": lstm.weights_path, "unet3d": unet3d.weights_path, "dlrm": dlrm.weights_path}


@functools.lru_cache(maxsize=None)
def model_of(name: str) -> nn.Module:
    return zoo.get(name).build_model()


@functools.lru_cache(maxsize=None)
def data_of(name: str) -> Dataset:
    return zoo.get(name).load_data()


@torch.no_grad()
def outputs(name: str, n: int | None = None) -> tuple[Tensor, Dataset]:
    data = data_of(name).take(n)
    return torch.cat([model_of(name)(*x) for x, _ in data.batches(500)]), data


def metadata(name: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(WEIGHTS[name]()), "pt") as f:
        return dict(f.metadata())


# ---------------------------------------------------------------- registry


def test_new_tasks_are_registered_with_their_metrics():
    names = zoo.names()
    for name in NEW_TASKS:
        assert name in names and zoo.available(name)
        task = zoo.get(name)
        assert "stand-in" in task.description
        assert task.metric.kind == "accuracy" and task.metric.higher_is_better
    assert zoo.get("fashion-lstm").metric is TOP1
    assert zoo.get("unet3d").metric is unet3d.DICE
    assert zoo.get("dlrm").metric is dlrm.AUC
    assert unet3d.VOXEL_AGREEMENT in zoo.extra_metrics("unet3d")
    assert TOP1 in zoo.extra_metrics("dlrm")


def test_abfp_zoo_lists_them(capsys):
    from abfp.cli import main

    assert main(["zoo"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert set(NEW_TASKS) <= listed


def test_weights_are_small_safetensors_matching_the_architecture():
    for name in NEW_TASKS:
        path = WEIGHTS[name]()
        assert path.suffix == ".safetensors" and path.stat().st_size < 2_000_000
        meta = metadata(name)
        assert meta["model"] == name and meta["script"] == "scripts/train_families.py" and meta["seed"] == "0"
        from safetensors.torch import load_file

        saved = load_file(str(path))
        model = model_of(name)
        assert not model.training
        state = model.state_dict()
        assert saved.keys() == state.keys()
        assert all(torch.equal(saved[k], state[k]) for k in saved)


# ---------------------------------------------------------------- float32 metrics


# The training script scored the whole test split in float32 (one thread, batches of 500)
# and stored it. Re-scoring it here may differ only where another thread count or summation
# order flips the arg-max of a borderline sample: a few samples (voxels) at most, far below
# these tolerances (10 images of 10,000; 0.2 Dice points; 0.05 AUC points).
@pytest.mark.slow
@pytest.mark.parametrize("name, tol", [("fashion-lstm", 0.1), ("unet3d", 0.2), ("dlrm", 0.05)])
def test_float32_metric_is_the_measured_one(name, tol):
    out, data = outputs(name)
    measured = float(metadata(name)["test_metric"])
    score = zoo.get(name).metric(out, data.targets, out)
    assert score == pytest.approx(measured, abs=tol)


def test_float32_quality_is_far_above_chance():
    out, data = outputs("fashion-lstm", 2000)
    assert TOP1(out, data.targets, out) >= 85.0  # chance: 10 %
    out, data = outputs("unet3d", 64)
    assert unet3d.organ_dice(out, data.targets, out) >= 85.0
    assert unet3d.lesion_dice(out, data.targets, out) >= 40.0
    out, data = outputs("dlrm", 5000)
    ceiling = dlrm.bayes_auc(data)
    assert ceiling - 5.0 <= dlrm.AUC(out, data.targets, out) <= ceiling + 1.0  # chance: 50 %


def test_lstm_reads_rows_and_rejects_other_shapes():
    model = model_of("fashion-lstm")
    x = data_of("fashion-lstm").inputs[0][:4]
    assert x.shape == (4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x[:, 0]), rtol=0, atol=0)
    assert isinstance(model.lstm, nn.LSTM) and model.lstm.num_layers == 2 and model.lstm.hidden_size == 128
    with pytest.raises(ValueError, match="FashionLSTM"):
        model(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="FashionLSTM"):
        model(torch.zeros(2, 28, 27))


def test_unet_layers_and_shapes():
    model = model_of("unet3d")
    kinds = {type(m) for m in model.modules()}
    assert {nn.Conv3d, nn.ConvTranspose3d} <= kinds
    assert sum(isinstance(m, nn.ConvTranspose3d) for m in model.modules()) == 2
    x = torch.randn(2, 1, 8, 12, 16)
    with torch.no_grad():
        assert model(x).shape == (2, 3, 8, 12, 16)
    with pytest.raises(ValueError, match="UNet3D"):
        model(torch.randn(2, 1, 10, 16, 16))


# ---------------------------------------------------------------- generated data


def test_unet_generator_is_deterministic_and_prefix_stable():
    v, lab = unet3d.generate(70, 5)
    v2, lab2 = unet3d.generate(70, 5)
    assert torch.equal(v, v2) and torch.equal(lab, lab2)
    v3, lab3 = unet3d.generate(10, 5)
    assert torch.equal(v3, v[:10]) and torch.equal(lab3, lab[:10])
    assert not torch.equal(unet3d.generate(10, 6)[0], v3)
    assert v.shape == (70, 1, 16, 16, 16) and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert lab.shape == (70, 16, 16, 16) and lab.dtype == torch.int64 and set(lab.unique().tolist()) <= {0, 1, 2}


def test_unet_test_split_labels_and_intensities():
    data = data_of("unet3d")
    (v,) = data.inputs
    lab = data.targets
    assert len(data) == unet3d.TEST_VOLUMES
    organ = (lab >= 1).flatten(1).sum(1)
    assert (organ > 20).all()  # every volume holds an organ
    has_lesion = (lab == 2).flatten(1).any(1).float().mean().item()
    assert abs(has_lesion - unet3d.LESION_PROBABILITY) < 0.1
    # the lesion lies inside the organ: every lesion voxel's label neighbourhood is not all background
    means = [v[:, 0][lab == c].mean().item() for c in range(3)]
    assert means[0] < means[2] < means[1]  # background < hypodense lesion < organ
    residual = v[:, 0][lab == 0] - v[:, 0][lab == 0].mean()
    assert residual.std().item() == pytest.approx(unet3d.NOISE_STD, rel=0.25)


def test_unet_training_split_differs_from_the_test_split():
    train = training_data("unet3d", 32)
    (x,) = train.inputs
    (test,) = data_of("unet3d").inputs
    assert len(train) == 32 and train.targets.shape == (32, 16, 16, 16)
    dist = torch.cdist(x.flatten(1), test.flatten(1))
    assert dist.min().item() > 1.0


def test_dlrm_generator_is_deterministic_and_learnable():
    d, s, c = dlrm.generate(5000, 3)
    d2, s2, c2 = dlrm.generate(5000, 3)
    assert torch.equal(d, d2) and torch.equal(s, s2) and torch.equal(c, c2)
    d3, s3, c3 = dlrm.generate(100, 3)
    assert torch.equal(d3, d[:100]) and torch.equal(s3, s[:100]) and torch.equal(c3, c[:100])
    assert d.shape == (5000, dlrm.DENSE) and s.shape == (5000, len(dlrm.VOCAB), dlrm.BAG)
    for f, v in enumerate(dlrm.VOCAB):
        assert 0 <= int(s[:, f].min()) and int(s[:, f].max()) < v
    # Zipf-like: id 0 is the most frequent of every feature
    assert all(int(torch.bincount(s[:, f].flatten()).argmax()) == 0 for f in range(len(dlrm.VOCAB)))
    rate = c.float().mean().item()
    assert 0.2 < rate < 0.5
    ceiling = dlrm.roc_auc(dlrm.teacher_logits(d, s), c)
    assert 75.0 < ceiling < 92.0  # learnable, but the labels are noisy (Bernoulli)


def test_dlrm_training_split_differs_from_the_test_split():
    train = training_data("dlrm", 1000)
    test = data_of("dlrm")
    assert len(train) == 1000
    assert not torch.equal(train.inputs[0], test.inputs[0][:1000])


def test_generators_reject_bad_arguments():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            unet3d.generate(bad, 0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="positive integer"):
            dlrm.generate(bad, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        dlrm.generate(4, -1)
    with pytest.raises(ValueError, match="volume size"):
        unet3d.generate(2, 0, size=4)


# ---------------------------------------------------------------- metrics against independent evaluations


def _auc_by_pairs(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return 100.0 * wins / (len(pos) * len(neg))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-4, 4), st.booleans()), min_size=2, max_size=40))
def test_roc_auc_is_the_pairwise_win_rate(pairs):
    scores = np.array([float(s) for s, _ in pairs])  # small integers: many ties
    labels = np.array([int(b) for _, b in pairs])
    if labels.min() == labels.max():
        with pytest.raises(ValueError, match="both positive and negative"):
            dlrm.roc_auc(torch.from_numpy(scores), torch.from_numpy(labels))
        return
    got = dlrm.roc_auc(torch.from_numpy(scores), torch.from_numpy(labels))
    assert got == pytest.approx(_auc_by_pairs(scores, labels), abs=1e-9)


def test_auc_metric_reads_the_click_logit_and_rejects_bad_input():
    z = torch.tensor([0.1, 2.0, -1.0, 0.5])
    clicks = torch.tensor([0, 1, 0, 1])
    logits = torch.stack([torch.full_like(z, 3.0), z + 3.0], 1)  # any common offset: same z
    assert dlrm.AUC(logits, clicks, logits) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="two-class"):
        dlrm.AUC(z, clicks, z)
    with pytest.raises(ValueError, match="NaN"):
        dlrm.roc_auc(torch.tensor([0.0, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        dlrm.AUC(logits, None, logits)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.sampled_from([(2, 3, 4), (1, 4, 4, 4)]))
def test_dice_matches_an_independent_set_count(seed, n, shape):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 3, *shape[1:]) if len(shape) == 4 else (n, 3, *shape))
    labels = rng.integers(0, 3, size=(n, *logits.shape[2:]))
    pred = logits.argmax(1)
    expected = []
    for c in (1, 2):
        p = {i for i, v in enumerate(pred.ravel()) if v == c}
        t = {i for i, v in enumerate(labels.ravel()) if v == c}
        expected.append(100.0 if not p and not t else 200.0 * len(p & t) / (len(p) + len(t)))
    out, tgt = torch.from_numpy(logits).float(), torch.from_numpy(labels)
    assert unet3d.organ_dice(out, tgt, out) == pytest.approx(expected[0], abs=1e-9)
    assert unet3d.lesion_dice(out, tgt, out) == pytest.approx(expected[1], abs=1e-9)
    assert unet3d.DICE(out, tgt, out) == pytest.approx(sum(expected) / 2, abs=1e-9)


def test_dice_edge_cases():
    logits = torch.zeros(1, 3, 2, 2, 2)
    logits[:, 0] = 1.0  # predicts background everywhere
    background = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    assert unet3d.DICE(logits, background, logits) == 100.0  # no foreground predicted nor present
    organ = torch.ones(1, 2, 2, 2, dtype=torch.long)
    assert unet3d.organ_dice(logits, organ, logits) == 0.0
    with pytest.raises(ValueError, match="do not match"):
        unet3d.DICE(logits, torch.zeros(1, 2, 2, dtype=torch.long), logits)
    with pytest.raises(ValueError, match="labels"):
        unet3d.DICE(logits, None, logits)


def test_dlrm_interaction_is_all_pairwise_dot_products():
    torch.manual_seed(0)
    t = torch.randn(5, 4, 3)
    got = dlrm.Interaction()(t)
    want = torch.stack([torch.stack([t[b, i] @ t[b, j] for i in range(4) for j in range(i)]) for b in range(5)])
    assert got.shape == (5, 6)
    torch.testing.assert_close(got, want)


def test_dlrm_outputs_two_class_logits_and_rejects_bad_shapes():
    model = model_of("dlrm")
    dense, sparse = (t[:8] for t in data_of("dlrm").inputs)
    with torch.no_grad():
        out = model(dense, sparse)
    assert out.shape == (8, 2) and torch.equal(out[:, 0], torch.zeros(8))
    assert isinstance(model.embeddings[0], nn.EmbeddingBag)
    with pytest.raises(ValueError, match="dense"):
        model(dense[:, :5], sparse)
    with pytest.raises(ValueError, match="bags"):
        model(dense, sparse[:, :3])


# ---------------------------------------------------------------- finetuning hooks


def test_new_tasks_have_training_data():
    assert set(NEW_TASKS) <= set(TRAINABLE_TASKS)
    for name in ("unet3d", "dlrm"):
        train = training_data(name, 16)
        model = model_of(name)
        with torch.no_grad():
            out = model(*train.inputs)
        loss = nn.functional.cross_entropy(out, train.targets)  # the finetuning loop's default loss
        assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="positive"):
        training_data("dlrm", 0)
