"""``unet3d``: a small 3-D U-Net segmenting generated volumes (a stand-in for the authors' KiTS19 3D U-Net).

No volumetric medical data installs offline, so the task is generated (the generator ships
here and is deterministic by seed). Each 16^3 volume holds one "organ", a randomly placed,
sized and rotated ellipsoid of intensity 1, that contains a smaller hypodense "lesion" (a
sphere of intensity 0.35) in four volumes out of five, on a background of 0; edges are soft
(a logistic of the signed distance, one voxel wide), and the volume gets a smooth random
brightness gradient plus white Gaussian noise (standard deviation 0.4). The labels are the
hard shapes: 0 background, 1 organ, 2 lesion (the lesion wins where both hold), as in KiTS19
(kidney, tumour).

The metric is the mean Dice coefficient of the two foreground classes, in percent,
``Dice_c = 2 |P_c and T_c| / (|P_c| + |T_c|)`` over all voxels of the evaluated volumes, where
``P_c`` are the voxels whose arg-max logit is ``c`` and ``T_c`` those labelled ``c``.

The network (:class:`UNet3D`): two 3x3x3 convolutions per level, strided 2x2x2 ``nn.Conv3d``
down, 2x2x2 stride-2 ``nn.ConvTranspose3d`` up, skip connections by concatenation, batch norm,
a 1x1x1 convolution to three class logits. Weights: ``scripts/train_families.py --model unet3d``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import Dataset, Metric, Task

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

#: Edge length of the cubic volumes (voxels).
SIZE = 16
CLASSES = ("background", "organ", "lesion")
#: Seeds of the generated splits (disjoint streams).
TEST_SEED = 20_240_001
TRAIN_SEED = 7
TEST_VOLUMES = 256
TRAIN_VOLUMES = 4096
#: Intensities and noise of the generator.
ORGAN_LEVEL = 1.0
LESION_LEVEL = 0.35
NOISE_STD = 0.4
LESION_PROBABILITY = 0.8


def _rotations(angles: Tensor) -> Tensor:
    """Rotation matrices ``R_z(c) R_y(b) R_x(a)`` (N x 3 x 3) of Euler angles (N x 3)."""
    a, b, c = angles.unbind(-1)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    rx = torch.stack([one, zero, zero, zero, a.cos(), -a.sin(), zero, a.sin(), a.cos()], -1).view(-1, 3, 3)
    ry = torch.stack([b.cos(), zero, b.sin(), zero, one, zero, -b.sin(), zero, b.cos()], -1).view(-1, 3, 3)
    rz = torch.stack([c.cos(), -c.sin(), zero, c.sin(), c.cos(), zero, zero, zero, one], -1).view(-1, 3, 3)
    return rz @ ry @ rx


#: Volumes per generator block: block ``b`` of seed ``s`` draws from its own generator, seeded
#: ``s * 1_000_003 + b``, so the first ``k`` volumes of a split do not depend on its length.
BLOCK = 64


def generate(n: int, seed: int, size: int = SIZE) -> tuple[Tensor, Tensor]:
    """``n`` volumes (float32, n x 1 x size^3) and their labels (int64, n x size^3), deterministic by ``seed``.

    The random numbers of each block of :data:`BLOCK` volumes come from one ``torch.Generator``
    drawn in a fixed order, so the same arguments give the same tensors on every machine, and
    ``generate(k, seed)`` is the first ``k`` volumes of ``generate(n, seed)`` for ``k <= n``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of volumes must be a positive integer, got {n!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ValueError(f"volume size must be an integer >= 8, got {size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    parts = [_block(seed * 1_000_003 + b, BLOCK, size) for b in range((n + BLOCK - 1) // BLOCK)]
    volumes, labels = torch.cat([v for v, _ in parts])[:n], torch.cat([lab for _, lab in parts])[:n]
    return volumes.contiguous(), labels.contiguous()


def _block(seed: int, n: int, size: int) -> tuple[Tensor, Tensor]:
    """One block of ``n`` volumes and labels from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    centre = uniform(0.35, 0.65, n, 3) * size  # organ centre (voxel units)
    radii = uniform(0.2, 0.34, n, 3) * size  # organ semi-axes
    rot = _rotations(uniform(0.0, 2 * math.pi, n, 3))
    has_lesion = torch.rand(n, generator=g, dtype=torch.float64) < LESION_PROBABILITY
    lesion_r = uniform(0.1, 0.16, n) * size
    # lesion centre: a random direction in the organ's frame, at most half way to its surface
    direction = torch.randn(n, 3, generator=g, dtype=torch.float64)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    depth = uniform(0.0, 0.5, n, 1)
    lesion_c = centre + ((direction * depth * radii).unsqueeze(1) @ rot.transpose(1, 2)).squeeze(1)
    gradient = uniform(-0.3, 0.3, n, 3)  # brightness change across the volume, per axis
    noise = torch.randn(n, size, size, size, generator=g, dtype=torch.float64) * NOISE_STD

    axis = torch.arange(size, dtype=torch.float64) + 0.5
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).view(1, -1, 3)  # 1 x V x 3
    local = (grid - centre[:, None, :]) @ rot  # coordinates in the organ's frame, n x V x 3
    # approximate signed distance to the ellipsoid surface (voxels; negative inside)
    rho = (local / radii[:, None, :]).norm(dim=-1)
    organ_d = (rho - 1.0) * radii.min(dim=-1).values[:, None]
    lesion_d = (grid - lesion_c[:, None, :]).norm(dim=-1) - lesion_r[:, None]
    lesion_d = torch.where(has_lesion[:, None], lesion_d, torch.full_like(lesion_d, math.inf))
    organ_soft, lesion_soft = torch.sigmoid(-2.0 * organ_d), torch.sigmoid(-2.0 * lesion_d)
    image = organ_soft * (ORGAN_LEVEL + lesion_soft * (LESION_LEVEL - ORGAN_LEVEL))
    image = image + ((grid / size - 0.5) * gradient[:, None, :]).sum(-1)
    labels = torch.zeros(n, size**3, dtype=torch.int64)
    inside = organ_d <= 0
    labels[inside] = 1
    labels[inside & (lesion_d <= 0)] = 2
    volume = image.view(n, size, size, size) + noise
    return volume.float().unsqueeze(1), labels.view(n, size, size, size)


def load_test_data() -> Dataset:
    """The 256 generated test volumes (seed :data:`TEST_SEED`) and their voxel labels."""
    volumes, labels = generate(TEST_VOLUMES, TEST_SEED)
    return Dataset((volumes,), labels)


def training_data(samples: int | None = None) -> Dataset:
    """The generated training split (4,096 volumes, seed :data:`TRAIN_SEED`; the first ``samples`` if given)."""
    n = TRAIN_VOLUMES if samples is None else samples
    volumes, labels = generate(n, TRAIN_SEED)
    return Dataset((volumes,), labels)


def dice_per_class(outputs: Tensor, targets: Tensor | None, classes: tuple[int, ...] = (1, 2)) -> list[float]:
    """Dice (%) of each class in ``classes``: ``2 |P and T| / (|P| + |T|)`` over all voxels.

    ``outputs``: logits N x C x D x H x W (the class is the arg-max over C); ``targets``: N x D x H x W.
    A class absent from both prediction and labels scores 100.
    """
    if targets is None:
        raise ValueError("Dice needs voxel labels")
    if outputs.dim() != targets.dim() + 1 or outputs.shape[2:] != targets.shape[1:]:
        raise ValueError(f"Dice: logits {tuple(outputs.shape)} do not match labels {tuple(targets.shape)}")
    pred = outputs.argmax(1)
    scores = []
    for c in classes:
        p, t = pred == c, targets == c
        denom = int(p.sum()) + int(t.sum())
        scores.append(100.0 if denom == 0 else 200.0 * int((p & t).sum()) / denom)
    return scores


def mean_dice(outputs: Tensor, targets: Tensor | None, reference: Tensor) -> float:
    """Mean Dice (%) of the organ and lesion classes."""
    scores = dice_per_class(outputs, targets)
    return sum(scores) / len(scores)


def organ_dice(outputs: Tensor, targets: Tensor | None, reference: Tensor) -> float:
    """Dice (%) of the organ class."""
    return dice_per_class(outputs, targets, (1,))[0]


def lesion_dice(outputs: Tensor, targets: Tensor | None, reference: Tensor) -> float:
    """Dice (%) of the lesion class."""
    return dice_per_class(outputs, targets, (2,))[0]


def voxel_agreement(outputs: Tensor, targets: Tensor | None, reference: Tensor) -> float:
    """Percentage of voxels whose arg-max class equals the float32 model's."""
    return 100.0 * (outputs.argmax(1) == reference.argmax(1)).float().mean().item()


DICE = Metric("mean Dice (organ, lesion)", "accuracy", mean_dice, unit="%")
ORGAN_DICE = Metric("organ Dice", "accuracy", organ_dice, unit="%")
LESION_DICE = Metric("lesion Dice", "accuracy", lesion_dice, unit="%")
VOXEL_AGREEMENT = Metric("voxel agreement with fp32", "fidelity", voxel_agreement, unit="%")


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    pad = 1 if kernel == 3 else 0
    return [nn.Conv3d(cin, cout, kernel, stride=stride, padding=pad, bias=False), nn.BatchNorm3d(cout), nn.ReLU()]


class UNet3D(nn.Module):
    """Three-level 3-D U-Net of widths ``w, 2w, 4w``: logits ``N x 3 x D x H x W`` of ``N x 1 x D x H x W``.

    ``D, H, W`` must be multiples of 4 (two 2x downsamplings).
    """

    def __init__(self, width: int = 8, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(*_conv(1, w), *_conv(w, w))
        self.down1 = nn.Sequential(*_conv(w, 2 * w, kernel=2, stride=2))
        self.enc2 = nn.Sequential(*_conv(2 * w, 2 * w))
        self.down2 = nn.Sequential(*_conv(2 * w, 4 * w, kernel=2, stride=2))
        self.bottleneck = nn.Sequential(*_conv(4 * w, 4 * w))
        self.up2 = nn.ConvTranspose3d(4 * w, 2 * w, kernel_size=2, stride=2)
        self.dec2 = nn.Sequential(*_conv(4 * w, 2 * w))
        self.up1 = nn.ConvTranspose3d(2 * w, w, kernel_size=2, stride=2)
        self.dec1 = nn.Sequential(*_conv(2 * w, w))
        self.head = nn.Conv3d(w, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits per voxel."""
        if x.dim() != 5 or x.shape[1] != 1 or any(s % 4 for s in x.shape[2:]):
            raise ValueError(f"UNet3D expects N x 1 x D x H x W volumes with D, H, W multiples of 4, got {tuple(x.shape)}")
        s1 = self.enc1(x)
        s2 = self.enc2(self.down1(s1))
        b = self.bottleneck(self.down2(s2))
        d2 = self.dec2(torch.cat([self.up2(b), s2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], 1))
        return self.head(d1)


def weights_path() -> Path:
    """Where the shipped ``unet3d`` weights live."""
    return WEIGHTS_DIR / "unet3d.safetensors"


def build_model() -> nn.Module:
    """The trained :class:`UNet3D`, float32, eval mode."""
    from safetensors.torch import load_file

    path = weights_path()
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path} (train them with scripts/train_families.py --model unet3d)")
    model = UNet3D()
    model.load_state_dict(load_file(str(path)))
    return model.float().eval()


TASKS: list[Task] = [
    Task(
        name="unet3d",
        description="small 3-D U-Net (Conv3d down, ConvTranspose3d up) segmenting generated 16^3 volumes "
        "(organ + lesion); stand-in for the authors' KiTS19 3D U-Net; mean Dice of organ and lesion",
        build_model=build_model,
        load_data=load_test_data,
        metric=DICE,
        default_samples=8,
        default_batch_size=8,
    ),
]

EXTRA_METRICS: dict[str, list[Metric]] = {"unet3d": [ORGAN_DICE, LESION_DICE, VOXEL_AGREEMENT]}
