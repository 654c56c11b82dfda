"""``fashion-lstm``: a recurrent classifier reading Fashion-MNIST images row by row.

A stand-in for the LSTM layers of the authors' RNN-T (MLPerf speech recognition): no
speech data installs offline, so the sequence is an image read as 28 time steps of 28
pixels. Per time step and layer the LSTM computes the two products ``x_t W_ih^T`` and
``h_{t-1} W_hh^T`` (SPEC 3.1: both analog on the device); the gates, the cell update and
the biases stay digital. The classifier head is a linear layer on the last hidden state.

The model takes the same normalised ``N x 1 x 28 x 28`` images as the other Fashion-MNIST
tasks (so it shares their data, test set and finetuning split) and reads them as
``N x 28 x 28`` sequences. Weights: ``scripts/train_families.py --model lstm``.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from .base import AGREEMENT, KL, TOP1, Metric, Task
from .fashion import WEIGHTS_DIR, load_test_data

#: Pixels per time step (one image row) and time steps (rows) per image.
ROW = 28
STEPS = 28


class FashionLSTM(nn.Module):
    """``nn.LSTM`` over the image rows (``layers`` layers of width ``hidden``), then ``nn.Linear``
    on the last time step's hidden state: ``logits = W_out h_T + b_out``."""

    def __init__(self, hidden: int = 128, layers: int = 2, num_classes: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(ROW, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N x 10) of normalised images (N x 1 x 28 x 28, or N x 28 x 28 row sequences)."""
        if x.dim() == 4:
            if x.shape[1] != 1:
                raise ValueError(f"FashionLSTM expects one-channel images, got input of shape {tuple(x.shape)}")
            x = x[:, 0]
        if x.dim() != 3 or x.shape[-1] != ROW:
            raise ValueError(f"FashionLSTM expects N x 1 x 28 x 28 images or N x T x 28 rows, got {tuple(x.shape)}")
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def weights_path() -> Path:
    """Where the shipped ``fashion-lstm`` weights live."""
    return WEIGHTS_DIR / "fashion_lstm.safetensors"


def build_model() -> nn.Module:
    """The trained :class:`FashionLSTM`, float32, eval mode."""
    from safetensors.torch import load_file

    path = weights_path()
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path} (train them with scripts/train_families.py --model lstm)")
    model = FashionLSTM()
    model.load_state_dict(load_file(str(path)))
    return model.float().eval()


TASKS: list[Task] = [
    Task(
        name="fashion-lstm",
        description="Fashion-MNIST read row by row (28 steps of 28 pixels), 2-layer LSTM (hidden 128) + linear; "
        "stand-in for RNN-T's LSTM layers, trained by scripts/train_families.py; top-1 accuracy on the test images",
        build_model=build_model,
        load_data=load_test_data,
        metric=TOP1,
        default_samples=100,
        default_batch_size=100,
    ),
]

EXTRA_METRICS: dict[str, list[Metric]] = {t.name: [AGREEMENT, KL] for t in TASKS}
