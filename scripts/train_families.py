#!/usr/bin/env python3
"""Train the zoo's stand-ins for the authors' RNN-T, 3D U-Net and DLRM and write their weights.

    PYTHONPATH=src python scripts/train_families.py --model lstm     # fashion-lstm
    PYTHONPATH=src python scripts/train_families.py --model unet3d   # unet3d
    PYTHONPATH=src python scripts/train_families.py --model dlrm     # dlrm

``lstm`` trains on the 60,000 Fashion-MNIST training images of the Debian package
``dataset-fashion-mnist``; ``unet3d`` and ``dlrm`` on their generated training splits
(``abfp.zoo.unet3d.training_data``, ``abfp.zoo.dlrm.training_data``; disjoint seeds from the
test splits). Every model is trained with AdamW, a linear warm-up then cosine decay, and the
cross entropy of its logits against the labels (per voxel for the U-Net; DLRM's two-class
logits ``(0, z)`` make it the binary cross entropy of the click logit ``z``). Deterministic for a
given seed, thread count and machine. The exact commands and results are in docs/zoo.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from abfp.zoo import dlrm, fashion, lstm, unet3d  # noqa: E402
from abfp.zoo.base import Dataset, Metric  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    """How one model is trained: constructor, data, metric, and default hyper-parameters."""

    name: str
    build: Callable[[], nn.Module]
    train_data: Callable[[], Dataset]
    test_data: Callable[[], Dataset]
    metric: Metric
    weights: Callable[[], Path]
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 1e-4


def _fashion_train() -> Dataset:
    images, labels = fashion.load_split("train")
    return Dataset((fashion.normalize(images),), labels)


RECIPES: dict[str, Recipe] = {
    "lstm": Recipe("fashion-lstm", lstm.FashionLSTM, _fashion_train, fashion.load_test_data, lstm.TASKS[0].metric,
                   lstm.weights_path, epochs=8, lr=3e-3, batch_size=128),
    "unet3d": Recipe("unet3d", unet3d.UNet3D, lambda: unet3d.training_data(), unet3d.load_test_data,
                     unet3d.DICE, unet3d.weights_path, epochs=3, lr=3e-3, batch_size=16),
    "dlrm": Recipe("dlrm", dlrm.DLRM, lambda: dlrm.training_data(), dlrm.load_test_data, dlrm.AUC,
                   dlrm.weights_path, epochs=4, lr=3e-3, batch_size=256),
}  # fmt: skip


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, metric: Metric, batch_size: int = 500) -> float:
    """``metric`` of ``model`` (eval mode) on ``data``."""
    model.eval()
    out = torch.cat([model(*inputs) for inputs, _ in data.batches(batch_size)])
    return metric(out, data.targets, out)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


def train(args: argparse.Namespace) -> float:
    """Train, evaluate and save; returns the final test metric."""
    recipe = RECIPES[args.model]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)
    epochs = args.epochs if args.epochs is not None else recipe.epochs
    lr = args.lr if args.lr is not None else recipe.lr
    batch_size = args.batch_size or recipe.batch_size

    train_data, test_data = recipe.train_data(), recipe.test_data()
    model = recipe.build()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)  # fmt: skip
    steps_per_epoch = math.ceil(len(train_data) / batch_size)
    total = epochs * steps_per_epoch
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {recipe.name} ({n_params:,} parameters) on {len(train_data):,} samples for {epochs} epochs, "
          f"batch {batch_size}, lr {lr:g}, seed {args.seed}, {args.threads} thread(s)")  # fmt: skip

    start, step = time.time(), 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_data), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            inputs = tuple(t[idx] for t in train_data.inputs)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, steps_per_epoch // 2, lr)
            loss = nn.functional.cross_entropy(model(*inputs), train_data.targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            running = 0.98 * running + 0.02 * loss.item() if i else loss.item()
        score = evaluate(model, test_data, recipe.metric)
        print(f"epoch {epoch + 1}/{epochs}: loss {running:.4f}, test {recipe.metric.name} {score:.2f}, "
              f"{time.time() - start:.0f} s", flush=True)  # fmt: skip

    elapsed = time.time() - start
    score = evaluate(model, test_data, recipe.metric)
    print(f"test {recipe.metric.name}: {score:.2f} ({len(test_data):,} samples), training time {elapsed:.0f} s")
    save(model.eval(), recipe, args, epochs, lr, batch_size, score, elapsed)
    return score


def save(model: nn.Module, recipe: Recipe, args: argparse.Namespace, epochs: int, lr: float, batch_size: int,
         score: float, elapsed: float) -> None:  # fmt: skip
    """Write the state dict as safetensors, with the training settings as metadata."""
    from safetensors.torch import save_file

    out = Path(args.out) if args.out else recipe.weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "model": recipe.name,
        "script": "scripts/train_families.py",
        "epochs": str(epochs),
        "seed": str(args.seed),
        "lr": str(lr),
        "batch_size": str(batch_size),
        "threads": str(args.threads),
        "metric": recipe.metric.name,
        "test_metric": f"{score:.4f}",
        "training_seconds": f"{elapsed:.0f}",
        "torch": torch.__version__,
    }
    save_file(state, str(out), metadata=meta)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.3f} MB)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(RECIPES), required=True)
    p.add_argument("--epochs", type=int, default=None, help="default per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: the shipped weights file in src/abfp/zoo/weights/")
    p.add_argument("--batch-size", type=int, default=None, help="default per model")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per model)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
