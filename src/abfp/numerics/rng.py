"""Random bits for device noise, fast on the CPU.

``torch.Generator`` on the CPU is a Mersenne twister: one 64-bit draw costs a few
nanoseconds and runs on one thread, which makes noise the largest single cost of a noisy
simulation. :func:`random_bits` draws a large request as two streams (the first from the
caller's generator, the second from a generator seeded by one draw of the first) and fills
them concurrently on two threads when torch has two or more. The split depends only on the
request's size, never on the thread count, so results are the same on 1 or 16 threads.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

#: Requests of at least this many 64-bit words are split into two streams.
SPLIT_WORDS = 1 << 16

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _worker() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="abfp-rng")
        return _pool


def _fill(t: Tensor, generator: torch.Generator | None) -> Tensor:
    return t.random_(-(2**63), None, generator=generator)


def random_bits(words: int, generator: torch.Generator | None, out: Tensor | None = None) -> Tensor:
    """``words`` uniformly random int64 values (every bit uniform), on the CPU (written into
    ``out``, contiguous int64 of ``words`` elements, when given)."""
    bits = torch.empty(words, dtype=torch.int64) if out is None else out
    if words < SPLIT_WORDS:
        return _fill(bits, generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    second = torch.Generator().manual_seed(seed)
    half = words // 2
    if torch.get_num_threads() > 1:
        job: Future = _worker().submit(_fill, bits[half:], second)
        _fill(bits[:half], generator)
        job.result()
    else:
        _fill(bits[:half], generator)
        _fill(bits[half:], second)
    return bits
