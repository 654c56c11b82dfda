"""Fresh random crops of EfficientNet-Lite0's calibration photos (finetuning inputs): deterministic under a
seed, only calibration photos, the documented scales and mirroring, clear errors."""

from __future__ import annotations

import pytest
import torch

from abfp.zoo import efficientnet

MEAN = torch.tensor(efficientnet.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(efficientnet.IMAGENET_STD).view(3, 1, 1)


@pytest.fixture
def fake_photos(monkeypatch):
    """Photo ``i`` of the calibration list is a constant grey ``(i + 1) / 32`` in channel 0 with a
    left-to-right ramp in channel 1 (0 at the left edge, 1 at the right), 300 x 400 pixels; the
    evaluation photos raise. Records what was read."""
    read: list[str] = []
    monkeypatch.setattr(efficientnet, "_PHOTO_CACHE", {})

    def fake(name: str) -> torch.Tensor:
        if name not in efficientnet.CALIBRATION_PHOTOS:
            raise AssertionError(f"read a photo outside the calibration split: {name}")
        read.append(name)
        img = torch.zeros(3, 300, 400)
        img[0] = (efficientnet.CALIBRATION_PHOTOS.index(name) + 1) / 32
        img[1] = torch.linspace(0, 1, 400).view(1, 400)
        return img

    monkeypatch.setattr(efficientnet, "_photo", fake)
    return read


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def test_deterministic_under_a_seed(fake_photos) -> None:
    a = efficientnet.random_crops(6, torch.Generator().manual_seed(3))
    b = efficientnet.random_crops(6, torch.Generator().manual_seed(3))
    c = efficientnet.random_crops(6, torch.Generator().manual_seed(4))
    assert a.shape == (6, 3, 224, 224) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = torch.Generator().manual_seed(3)  # a stream: the next batch differs from the first
    first, second = efficientnet.random_crops(6, g), efficientnet.random_crops(6, g)
    assert torch.equal(first, a) and not torch.equal(first, second)


def test_only_calibration_photos_and_each_crop_from_one_photo(fake_photos) -> None:
    x = _unnormalise(efficientnet.random_crops(64, torch.Generator().manual_seed(0)))
    grey = x[:, 0]
    # channel 0 is constant over each crop and names its photo
    assert (grey.amax((1, 2)) - grey.amin((1, 2))).max() < 1e-5
    index = (grey[:, 0, 0] * 32 - 1).round().long()
    assert index.min() >= 0 and index.max() < len(efficientnet.CALIBRATION_PHOTOS)
    assert len(set(index.tolist())) >= 8  # uniform over 13 photos: 64 draws hit most of them
    assert set(fake_photos) <= set(efficientnet.CALIBRATION_PHOTOS)
    assert not set(fake_photos) & set(efficientnet.EVAL_PHOTOS)


def test_scales_and_mirroring(fake_photos) -> None:
    # channel 1 is the photo's horizontal position: a crop's ramp spans (its side) / 400 of it, and
    # runs right to left when mirrored. The resize and centre crop keep 224 / 256 of the side.
    n = 200
    x = _unnormalise(efficientnet.random_crops(n, torch.Generator().manual_seed(1)))
    ramp = x[:, 1, 112]  # the middle row, 224 positions
    span = (ramp[:, -3] - ramp[:, 2]) * 224 / 219  # from the interior (antialiased edges)
    side = span.abs() * 400 / 300 * 256 / 224  # in units of the shorter side (300)
    assert side.min() > 0.3 - 0.02 and side.max() < 1.0 + 0.02
    assert side.min() < 0.4 and side.max() > 0.9  # spread over the whole range
    mirrored = (span < 0).float().mean()
    assert 0.35 < mirrored < 0.65
    y = _unnormalise(efficientnet.random_crops(n, torch.Generator().manual_seed(1), mirror=False,
                                               min_scale=0.5, max_scale=0.5))
    span = y[:, 1, 112, -3] - y[:, 1, 112, 2]
    assert (span > 0).all()
    side = span * 224 / 219 * 400 / 300 * 256 / 224
    assert torch.allclose(side, torch.full_like(side, 0.5), atol=0.02)


def test_jitter_changes_only_brightness_and_contrast(fake_photos) -> None:
    g = torch.Generator().manual_seed(5)
    plain = efficientnet.random_crops(4, torch.Generator().manual_seed(5))
    jit = efficientnet.random_crops(4, g, jitter=0.2)
    assert not torch.equal(plain, jit)
    # same crops (the geometry is drawn before the jitter): the ramp stays monotone the same way
    d_plain = plain[:, 1, 112, -3] - plain[:, 1, 112, 2]
    d_jit = jit[:, 1, 112, -3] - jit[:, 1, 112, 2]
    assert torch.equal(torch.sign(d_plain), torch.sign(d_jit))


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "positive integer"),
    ({"n": True}, "positive integer"),
    ({"photos": ("china", "chelsea")}, "evaluation photos cannot be finetuning inputs: chelsea"),
    ({"photos": ("nope",)}, "unknown calibration photo"),
    ({"photos": ()}, "at least one photo"),
    ({"min_scale": 0.0}, "min_scale"),
    ({"min_scale": 0.8, "max_scale": 0.5}, "min_scale"),
    ({"max_scale": 1.5}, "max_scale"),
    ({"jitter": 1.0}, "jitter"),
    ({"jitter": -0.1}, "jitter"),
])
def test_bad_input(kwargs, match) -> None:
    n = kwargs.pop("n", 2)
    with pytest.raises(ValueError, match=match):
        efficientnet.random_crops(n, torch.Generator(), **kwargs)


def test_generator_required() -> None:
    with pytest.raises(TypeError, match="torch.Generator"):
        efficientnet.random_crops(2, 0)  # type: ignore[arg-type]
