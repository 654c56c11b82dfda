#!/usr/bin/env python3
"""Train the Fashion-MNIST zoo models (``fashion-cnn``, ``fashion-vit``) and write their weights.

Reads the 60,000 training images from the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``) and reports accuracy on the 10,000 test images
that ship with abfp. Deterministic for a given seed, thread count and machine.

    PYTHONPATH=src python scripts/train_fashion.py --model cnn
    PYTHONPATH=src python scripts/train_fashion.py --model vit

The exact commands used for the shipped weights, and their accuracies, are in docs/zoo.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from abfp.zoo import fashion  # noqa: E402

#: Per-model defaults: epochs, peak learning rate, weight decay, label smoothing.
DEFAULTS: dict[str, dict[str, float]] = {
    "cnn": {"epochs": 15, "lr": 2e-3, "weight_decay": 5e-4, "label_smoothing": 0.0},
    "vit": {"epochs": 10, "lr": 1.5e-3, "weight_decay": 0.05, "label_smoothing": 0.1},
}


def augment(x: Tensor, gen: torch.Generator, shift: int = 2) -> Tensor:
    """Random horizontal flip and random translation by up to ``shift`` pixels (zero fill).

    ``x`` holds unnormalised images in [0, 1], shape N x 1 x 28 x 28.
    """
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if shift <= 0:
        return x
    padded = nn.functional.pad(x, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # N x H x 1
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # N x 1 x W
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def standardise(x: Tensor) -> Tensor:
    """[0, 1] images -> the normalisation the zoo task uses (training mean and std)."""
    return (x - fashion.MEAN) / fashion.STD


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy (%) of ``model`` on normalised ``images``."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += int((model(images[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum())
    return 100.0 * correct / len(images)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


def train(args: argparse.Namespace) -> float:
    """Train, evaluate and save; returns the final test accuracy (%)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)
    defaults = DEFAULTS[args.model]
    epochs = int(args.epochs if args.epochs is not None else defaults["epochs"])
    lr = args.lr if args.lr is not None else defaults["lr"]

    train_images, train_labels = fashion.load_split("train", args.data_dir)
    test_images, test_labels = fashion.load_split("test")
    train_x = train_images.float().div(255.0).unsqueeze(1)
    test_x = fashion.normalize(test_images)

    model = fashion.ARCHITECTURES[args.model]()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": defaults["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=defaults["label_smoothing"])
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total = epochs * steps_per_epoch
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training fashion-{args.model} ({n_params:,} parameters) for {epochs} epochs, seed {args.seed}")

    start = time.time()
    step = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        running = 0.0
        for i in bar:
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = train_x[idx]
            if not args.no_augment:
                x = augment(x, gen)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, steps_per_epoch, lr)
            loss = loss_fn(model(standardise(x)), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            running = 0.98 * running + 0.02 * loss.item() if i else loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
        acc = accuracy(model, test_x, test_labels)
        tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {running:.4f}, test accuracy {acc:.2f}%, "
                   f"{time.time() - start:.0f} s")  # fmt: skip

    elapsed = time.time() - start
    acc = accuracy(model, test_x, test_labels)
    print(f"test accuracy: {acc:.2f}% ({int((acc * len(test_x) / 100) + 0.5)}/{len(test_x)}), "
          f"training time {elapsed:.0f} s")  # fmt: skip
    save(model.eval(), args, epochs, lr, acc)
    return acc


def save(model: nn.Module, args: argparse.Namespace, epochs: int, lr: float, acc: float) -> None:
    """Write the state dict as safetensors, with the training settings as metadata."""
    from safetensors.torch import save_file

    out = Path(args.out) if args.out else fashion.weights_path(args.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "model": f"fashion-{args.model}",
        "epochs": str(epochs),
        "seed": str(args.seed),
        "lr": str(lr),
        "batch_size": str(args.batch_size),
        "augment": str(not args.no_augment),
        "threads": str(args.threads),
        "test_accuracy": f"{acc:.2f}",
        "torch": torch.__version__,
    }
    save_file(state, str(out), metadata=meta)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(fashion.ARCHITECTURES), required=True)
    p.add_argument("--epochs", type=int, default=None, help="default: 15 (cnn), 10 (vit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: src/abfp/zoo/weights/fashion_<model>.safetensors")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None, help="directory with train-*-idx*-ubyte.gz (default: Debian's)")
    p.add_argument("--no-augment", action="store_true", help="no random flips or shifts")
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
