"""Fashion-MNIST models trained by this project: a small CNN and a small vision transformer.

Both are scored by top-1 accuracy on the full 10,000-image Fashion-MNIST test set, which
ships inside the package (``abfp/zoo/data``, MIT licence, see its README). The weights were
produced by ``scripts/train_fashion.py`` (see ``docs/zoo.md`` for the exact commands).

The vision transformer writes its attention out explicitly (``nn.Linear`` projections and
``@`` products) so that every matrix product is visible to the simulator; it deliberately
avoids ``nn.MultiheadAttention`` whose fused fast path hides them.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .base import AGREEMENT, KL, TOP1, Dataset, Metric, Task

DATA_DIR = Path(__file__).resolve().parent / "data"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Where the Debian package ``dataset-fashion-mnist`` puts the full data set (training only).
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Pixel mean and standard deviation of the 60,000 training images (values scaled to [0, 1]).
MEAN = 0.2860
STD = 0.3530
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}  # fmt: skip


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array.

    The format: two zero bytes, a type code, the number of dimensions, each dimension as a
    big-endian int32, then the data in row-major order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} but the payload has {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def load_split(split: str = "test", root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Raw images (uint8, N x 28 x 28) and labels (int64) of the ``"train"`` or ``"test"`` split.

    ``root`` defaults to the packaged data for the test split and to the Debian
    ``dataset-fashion-mnist`` directory for the training split.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if root is None:
        root = DATA_DIR if split == "test" else DEBIAN_DIR
    root = Path(root)
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        hint = " (install it with: apt-get install dataset-fashion-mnist)" if root == DEBIAN_DIR else ""
        raise FileNotFoundError(f"Fashion-MNIST {split} images not found at {images_path}{hint}")
    images = torch.from_numpy(read_idx(images_path).copy())
    labels = torch.from_numpy(read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
    return images, labels


def normalize(images: Tensor) -> Tensor:
    """uint8 images (N x 28 x 28) -> float32 N x 1 x 28 x 28, standardised with the training statistics."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def load_test_data() -> Dataset:
    """The full Fashion-MNIST test set, normalised, with its labels."""
    images, labels = load_split("test")
    return Dataset((normalize(images),), labels)


class FashionCNN(nn.Module):
    """Four 3x3 convolutions (with batch norm) in two stages, then a two-layer classifier."""

    def __init__(self, width: int = 16, hidden: int = 128, num_classes: int = 10, dropout: float = 0.25) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.features = nn.Sequential(
            *conv(1, w), *conv(w, w), nn.MaxPool2d(2),
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * w * 7 * 7, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N x 10) of normalised images (N x 1 x 28 x 28)."""
        return self.classifier(self.features(x))


class Attention(nn.Module):
    """Multi-head self-attention with the products written out (no fused kernels)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        return x.view(n, t, self.heads, self.head_dim).transpose(1, 2)  # N x H x T x Dh

    def forward(self, x: Tensor) -> Tensor:
        """``x``: N x T x D -> N x T x D."""
        n, t, d = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = (q @ k.transpose(-2, -1)) * self.scale
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: N x T x D -> N x T x D."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FashionViT(nn.Module):
    """A small vision transformer: 4x4 patches (49 tokens), learned positions, mean-pooled tokens."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128, patch: int = 4,
                 num_classes: int = 10) -> None:  # fmt: skip
        super().__init__()
        if 28 % patch:
            raise ValueError(f"patch size {patch} does not divide 28")
        tokens = (28 // patch) ** 2
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N x 10) of normalised images (N x 1 x 28 x 28)."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # N x T x D
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


#: Model constructors by short name (used by the training script).
ARCHITECTURES: dict[str, type[nn.Module]] = {"cnn": FashionCNN, "vit": FashionViT}


def weights_path(arch: str) -> Path:
    """Where the shipped weights of ``arch`` (``"cnn"`` or ``"vit"``) live."""
    return WEIGHTS_DIR / f"fashion_{arch}.safetensors"


def build_pretrained(arch: str) -> nn.Module:
    """The ``arch`` model with its shipped weights, float32, in eval mode."""
    from safetensors.torch import load_file

    model = ARCHITECTURES[arch]()
    path = weights_path(arch)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path} (train them with scripts/train_fashion.py)")
    model.load_state_dict(load_file(str(path)))
    return model.float().eval()


def build_cnn() -> nn.Module:
    """The pretrained Fashion-MNIST CNN."""
    return build_pretrained("cnn")


def build_vit() -> nn.Module:
    """The pretrained Fashion-MNIST vision transformer."""
    return build_pretrained("vit")


_DESCRIPTION = "Fashion-MNIST, {what}, trained by scripts/train_fashion.py; top-1 accuracy on the 10,000 test images"

TASKS: list[Task] = [
    Task(
        name="fashion-cnn",
        description=_DESCRIPTION.format(what="small CNN (4 conv + 2 linear)"),
        build_model=build_cnn,
        load_data=load_test_data,
        metric=TOP1,
        default_samples=None,
        default_batch_size=500,
    ),
    Task(
        name="fashion-vit",
        description=_DESCRIPTION.format(what="small vision transformer (4 pre-norm blocks, explicit attention)"),
        build_model=build_vit,
        load_data=load_test_data,
        metric=TOP1,
        default_samples=None,
        default_batch_size=500,
    ),
]

EXTRA_METRICS: dict[str, list[Metric]] = {t.name: [AGREEMENT, KL] for t in TASKS}
