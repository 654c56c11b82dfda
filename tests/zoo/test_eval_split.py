"""The evaluation sets and their calibration splits: split by photo / by sentence, never leaking."""

from __future__ import annotations

import pytest
import torch

from abfp import zoo
from abfp.zoo import efficientnet, minilm
from abfp.zoo.base import AGREEMENT, COSINE, KL

pytestmark = pytest.mark.slow


def test_photo_split_is_disjoint_and_large_enough() -> None:
    ev, cal = set(efficientnet.EVAL_PHOTOS), set(efficientnet.CALIBRATION_PHOTOS)
    assert not ev & cal
    assert len(ev) >= 12 and len(ev) * efficientnet.CROPS_PER_PHOTO >= 300
    plan = efficientnet.crop_plan()
    assert len(plan) == len(set(plan)) == efficientnet.CROPS_PER_PHOTO
    assert all(0.0 <= a <= 1.0 and 0.0 <= b <= 1.0 and 0.4 <= c <= 0.95 for a, b, c, _ in plan[len(efficientnet.CROPS):])


def test_no_calibration_crop_comes_from_an_evaluation_photo() -> None:
    # pixel-level check, independent of the names: no two photos of the two splits are the same
    # image (skimage's "cat" is "chelsea", so it must not be in the calibration split), and the
    # crops of each split come only from that split's photos (compared at a common small size)
    def thumb(name: str) -> torch.Tensor:
        img = efficientnet._photo(name)
        return torch.nn.functional.interpolate(img[None], size=(32, 32), mode="area")[0]

    ev = torch.stack([thumb(n) for n in efficientnet.EVAL_PHOTOS])
    cal = torch.stack([thumb(n) for n in efficientnet.CALIBRATION_PHOTOS])
    dist = (ev[:, None] - cal[None]).abs().flatten(2).mean(-1)
    assert dist.min() > 0.02, dist.min()


def test_each_split_reads_only_its_own_photos(monkeypatch) -> None:
    read: list[str] = []

    def fake_photo(name: str) -> torch.Tensor:  # records which photos a split reads
        read.append(name)
        return torch.full((3, 40, 48), 0.5)

    monkeypatch.setattr(efficientnet, "_photo", fake_photo)
    monkeypatch.setattr(efficientnet, "preprocess", lambda crop: torch.zeros(3, 224, 224))
    task = zoo.get("efficientnet-lite0")
    assert task.load_calibration is not None
    x_ev = task.load_data().inputs[0]
    assert set(read) == set(efficientnet.EVAL_PHOTOS) and len(read) == len(efficientnet.EVAL_PHOTOS)
    read.clear()
    x_cal = task.load_calibration().inputs[0]
    assert set(read) == set(efficientnet.CALIBRATION_PHOTOS)
    assert x_ev.shape == (len(efficientnet.EVAL_PHOTOS) * efficientnet.CROPS_PER_PHOTO, 3, 224, 224)
    assert x_cal.shape == (len(efficientnet.CALIBRATION_PHOTOS) * efficientnet.CROPS_PER_PHOTO, 3, 224, 224)
    read.clear()
    from abfp.finetune.data import unlabelled_data

    assert unlabelled_data("efficientnet-lite0", 30).targets is None
    assert set(read) == set(efficientnet.CALIBRATION_PHOTOS)  # finetuning inputs: the calibration split


def test_sentence_split_is_disjoint() -> None:
    ev, cal = minilm.sentences(), minilm.calibration_sentences()
    assert len(ev) == 256 and len(cal) >= 256
    assert len(set(cal)) == len(cal)
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    assert not {norm(s) for s in ev} & {norm(s) for s in cal}
    assert zoo.get("minilm-l6").load_calibration is minilm.load_calibration


def test_standard_errors_against_float64() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(200, 10, generator=g)
    out = ref + 0.7 * torch.randn(200, 10, generator=g)
    agree = (out.argmax(-1) == ref.argmax(-1)).double()
    p = agree.mean().item()
    assert AGREEMENT.stderr(out, None, ref) == pytest.approx(100 * (p * (1 - p) / 199) ** 0.5, rel=1e-9)
    lr, lo = torch.log_softmax(ref.double(), -1), torch.log_softmax(out.double(), -1)
    kl = (lr.exp() * (lr - lo)).sum(-1)
    mean = kl.mean().item()
    sd = (sum((v - mean) ** 2 for v in kl.tolist()) / 199) ** 0.5
    assert KL.stderr(out, None, ref) == pytest.approx(sd / 200**0.5, rel=1e-9)
    cos = torch.nn.functional.cosine_similarity(out.double(), ref.double(), dim=-1)
    assert COSINE.stderr(out, None, ref) == pytest.approx(cos.std().item() / 200**0.5, rel=1e-9)
    assert COSINE.stderr(out[:1], None, ref[:1]) is None
