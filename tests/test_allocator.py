"""abfp.allocator: freed tensors' memory is reused instead of fresh kernel pages (glibc), and
ABFP_KEEP_MEMORY=0 leaves the allocator alone."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from abfp.allocator import keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# allocates, touches and frees a 48 MiB tensor 20 times; prints the minor page faults of the loop
SCRIPT = """
import resource, sys, torch
from abfp.allocator import keep_freed_memory
applied = keep_freed_memory()
torch.empty(12 << 20).fill_(1.0)  # the first one may fault in either setting
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    t = torch.empty(12 << 20)
    t.fill_(1.0)
    del t
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_value: str) -> tuple[bool, int]:
    import os

    env = {**os.environ, "ABFP_KEEP_MEMORY": env_value, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_switched_off_by_the_environment():
    assert keep_freed_memory({"ABFP_KEEP_MEMORY": "0"}) is False
    assert keep_freed_memory({"ABFP_KEEP_MEMORY": "off"}) is False


@pytest.mark.skipif(not GLIBC, reason="the setting exists only for glibc's malloc")
def test_freed_large_tensors_reuse_their_pages():
    kept, kept_faults = _faults("1")
    plain, plain_faults = _faults("0")
    assert kept and not plain
    # without the setting each 48 MiB tensor is a fresh mmap: about 12,000 page faults each time
    assert plain_faults > 20 * 6000, plain_faults
    assert kept_faults < plain_faults / 20, (kept_faults, plain_faults)
