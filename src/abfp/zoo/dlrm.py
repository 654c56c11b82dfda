"""``dlrm``: a DLRM-style click-through model on a generated task (a stand-in for the authors' Criteo DLRM).

No click log installs offline, so the data is generated (deterministic by seed) from a
ground truth that a DLRM can learn: 13 standard-normal dense features and 8 categorical
features, each a bag of 3 category ids drawn from a Zipf-like distribution (``P(c) ~
(c + 1)^-1.1``) over vocabularies of 20 to 1,000 ids. A hidden "teacher" gives every id a
latent vector ``v`` (dimension 4) and the dense features a latent vector ``u = tanh(A d)``;
with ``e_f`` the sum of the bag's vectors of feature ``f`` and ``e_0 = u``, the click logit is

    t = b + w . d + sum_{i < j} <e_i, e_j> / 6

and the label is a Bernoulli draw with probability ``sigmoid(t)`` (so even the teacher's own
logits do not reach AUC 100: :func:`bayes_auc` gives that ceiling).

The model (:class:`DLRM`) follows Naumov et al.: the dense features go through a bottom MLP
(13 -> 64 -> 16), every categorical bag through an ``nn.EmbeddingBag`` (sum, dimension 16,
a digital memory look-up), then the pairwise dot products of the 9 vectors are one
``torch.bmm`` of the stacked vectors with their transpose (an activation-by-activation product:
analog on the device, SPEC 3.1); the 36 products below the diagonal, with the bottom MLP's
output, feed the top MLP (52 -> 64 -> 32 -> 1) that gives the click logit ``z``. The model
returns the two-class logits ``(0, z)``, whose softmax is ``(1 - sigmoid(z), sigmoid(z))``: cross
entropy on them is DLRM's binary cross entropy, and the classification metrics apply as is.

The metric is the ROC AUC of ``z`` against the clicks, in percent (MLPerf's DLRM metric), as
the Mann-Whitney statistic with ties counted half. Weights: ``scripts/train_families.py --model dlrm``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .base import AGREEMENT, KL, TOP1, Dataset, Metric, Task

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

DENSE = 13
#: Vocabulary size of each categorical feature.
VOCAB = (1000, 600, 400, 200, 100, 60, 40, 20)
#: Category ids per bag (multi-hot).
BAG = 3
#: Latent dimension of the generating teacher.
TEACHER_DIM = 4
ZIPF = 1.1
TEACHER_SEED = 1234
TEST_SEED = 20_240_002
TRAIN_SEED = 11
TEST_SAMPLES = 20_000
TRAIN_SAMPLES = 200_000
#: Samples per generator block (see :func:`generate`).
BLOCK = 4096


def _teacher() -> dict[str, Tensor]:
    """The fixed ground truth (float64): per-id latent vectors, dense projection, weights, bias."""
    g = torch.Generator().manual_seed(TEACHER_SEED)
    return {
        "tables": [torch.randn(v, TEACHER_DIM, generator=g, dtype=torch.float64) * 0.5 for v in VOCAB],
        "A": torch.randn(TEACHER_DIM, DENSE, generator=g, dtype=torch.float64) / DENSE**0.5,
        "w": torch.randn(DENSE, generator=g, dtype=torch.float64) * 0.15,
        "b": torch.tensor(-1.0, dtype=torch.float64),
    }


def teacher_logits(dense: Tensor, sparse: Tensor) -> Tensor:
    """The ground-truth click logits ``t`` (float64, N) of dense (N x 13) and sparse (N x 8 x 3) features."""
    t = _teacher()
    vectors = [torch.tanh(dense.double() @ t["A"].T)]
    vectors += [t["tables"][f][sparse[:, f]].sum(1) for f in range(len(VOCAB))]
    e = torch.stack(vectors, 1)  # N x 9 x TEACHER_DIM
    gram = e @ e.transpose(1, 2)
    i, j = torch.tril_indices(len(vectors), len(vectors), offset=-1)
    return t["b"] + dense.double() @ t["w"] + gram[:, i, j].sum(-1) / 6.0


def _block(seed: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, DENSE, generator=g)
    ids = []
    for v in VOCAB:
        p = (torch.arange(v, dtype=torch.float64) + 1.0) ** -ZIPF
        ids.append(torch.multinomial(p, n * BAG, replacement=True, generator=g).view(n, BAG))
    sparse = torch.stack(ids, 1)  # N x 8 x BAG
    u = torch.rand(n, generator=g, dtype=torch.float64)
    clicks = (u < torch.sigmoid(teacher_logits(dense, sparse))).long()
    return dense, sparse, clicks


def generate(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` samples: dense features (float32, n x 13), bags of category ids (int64, n x 8 x 3) and
    clicks (int64 0/1, n), deterministic by ``seed``; ``generate(k, s)`` is the first ``k`` of
    ``generate(n, s)`` (blocks of :data:`BLOCK` samples, each from a generator seeded
    ``seed * 1_000_003 + block``)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of samples must be a positive integer, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    parts = [_block(seed * 1_000_003 + b, BLOCK) for b in range((n + BLOCK - 1) // BLOCK)]
    return tuple(torch.cat([p[k] for p in parts])[:n].contiguous() for k in range(3))  # type: ignore[return-value]


def load_test_data() -> Dataset:
    """The 20,000 generated test samples (seed :data:`TEST_SEED`): inputs (dense, sparse), clicks."""
    dense, sparse, clicks = generate(TEST_SAMPLES, TEST_SEED)
    return Dataset((dense, sparse), clicks)


def training_data(samples: int | None = None) -> Dataset:
    """The generated training split (200,000 samples, seed :data:`TRAIN_SEED`; the first ``samples`` if given)."""
    dense, sparse, clicks = generate(TRAIN_SAMPLES if samples is None else samples, TRAIN_SEED)
    return Dataset((dense, sparse), clicks)


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (%) of ``scores`` for binary ``labels``: the probability that a random
    positive scores above a random negative, ties counting one half (Mann-Whitney U / (n+ n-))."""
    scores, labels = scores.reshape(-1).double(), labels.reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"AUC: {scores.numel()} scores for {labels.numel()} labels")
    if not torch.isfinite(scores).all():
        raise ValueError("AUC: the scores contain NaN or infinity")
    positive = labels.bool()
    n_pos = int(positive.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    sorted_scores, order = torch.sort(scores, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # 1-based rank of each tie group's last member
    mean_rank = (last - (counts.double() - 1.0) / 2.0)[inverse]
    rank_sum = float(mean_rank[positive[order]].sum())
    return 100.0 * (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def click_logit(outputs: Tensor) -> Tensor:
    """``z`` from the model's two-class logits ``(0, z)`` (N x 2): their difference."""
    if outputs.dim() != 2 or outputs.shape[1] != 2:
        raise ValueError(f"expected two-class logits N x 2, got {tuple(outputs.shape)}")
    return outputs[:, 1] - outputs[:, 0]


def auc(outputs: Tensor, targets: Tensor | None, reference: Tensor) -> float:
    """ROC AUC (%) of the click logit against the clicks."""
    if targets is None:
        raise ValueError("AUC needs click labels")
    return roc_auc(click_logit(outputs), targets)


def bayes_auc(data: Dataset) -> float:
    """AUC (%) of the ground-truth logits on ``data``: the ceiling any model can reach on its labels."""
    dense, sparse = data.inputs
    if data.targets is None:
        raise ValueError("bayes_auc needs labelled data")
    return roc_auc(teacher_logits(dense, sparse), data.targets)


AUC = Metric("ROC AUC", "accuracy", auc, unit="%")


def _mlp(sizes: tuple[int, ...], last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Interaction(nn.Module):
    """DLRM's dot interaction: ``Z = T T^T`` of the stacked vectors ``T`` (N x F x D) as one ``torch.bmm``,
    then the ``F (F - 1) / 2`` entries below the diagonal (N x F(F-1)/2)."""

    def forward(self, stacked: Tensor) -> Tensor:
        """Pairwise dot products of the ``F`` vectors of each sample."""
        f = stacked.shape[1]
        z = torch.bmm(stacked, stacked.transpose(1, 2))
        i, j = torch.tril_indices(f, f, offset=-1, device=stacked.device)
        return z[:, i, j]


class DLRM(nn.Module):
    """Bottom MLP, embedding bags, the pairwise ``bmm`` interaction and the top MLP; returns ``(0, z)`` logits."""

    def __init__(self, dim: int = 16, bottom: tuple[int, ...] = (64,), top: tuple[int, ...] = (64, 32)) -> None:
        super().__init__()
        self.bottom = _mlp((DENSE, *bottom, dim), last_relu=True)
        self.embeddings = nn.ModuleList(nn.EmbeddingBag(v, dim, mode="sum") for v in VOCAB)
        for table in self.embeddings:
            nn.init.normal_(table.weight, std=dim**-0.5 / BAG)
        self.interaction = Interaction()
        features = len(VOCAB) + 1
        self.top = _mlp((dim + features * (features - 1) // 2, *top, 1), last_relu=False)

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        """Two-class logits (N x 2) of dense features (N x 13) and bags of ids (N x 8 x bag)."""
        if dense.dim() != 2 or dense.shape[1] != DENSE:
            raise ValueError(f"DLRM expects dense features N x {DENSE}, got {tuple(dense.shape)}")
        if sparse.dim() != 3 or sparse.shape[:2] != (dense.shape[0], len(VOCAB)):
            raise ValueError(f"DLRM expects id bags N x {len(VOCAB)} x bag, got {tuple(sparse.shape)}")
        x = self.bottom(dense)
        vectors = [x] + [table(sparse[:, f]) for f, table in enumerate(self.embeddings)]
        z = self.top(torch.cat([x, self.interaction(torch.stack(vectors, 1))], 1))
        return torch.cat([torch.zeros_like(z), z], 1)


def weights_path() -> Path:
    """Where the shipped ``dlrm`` weights live."""
    return WEIGHTS_DIR / "dlrm.safetensors"


def build_model() -> nn.Module:
    """The trained :class:`DLRM`, float32, eval mode."""
    from safetensors.torch import load_file

    path = weights_path()
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path} (train them with scripts/train_families.py --model dlrm)")
    model = DLRM()
    model.load_state_dict(load_file(str(path)))
    return model.float().eval()


TASKS: list[Task] = [
    Task(
        name="dlrm",
        description="DLRM-style click model (bottom MLP, 8 embedding bags, pairwise bmm interaction, top MLP) "
        "on a generated click-through task; stand-in for the authors' Criteo DLRM; ROC AUC",
        build_model=build_model,
        load_data=load_test_data,
        metric=AUC,
        default_samples=2000,
        default_batch_size=1000,
    ),
]

EXTRA_METRICS: dict[str, list[Metric]] = {"dlrm": [TOP1, AGREEMENT, KL]}
