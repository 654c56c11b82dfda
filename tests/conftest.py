"""Every test starts from the same global RNG state: a failure reproduces exactly.

Hypothesis runs under one of two profiles:

- ``ci`` (the default, what ``python3 -m pytest -q`` runs): derandomised, so every run draws
  the same examples and a failure reproduces on any machine; no deadline (the machines are
  shared and loaded); a failure prints its ``@reproduce_failure`` blob.
- ``explore`` (``--hypothesis-profile explore``): random seeds (``--hypothesis-seed N`` repeats
  one) and ten times each test's own ``max_examples`` (``ABFP_EXPLORE_FACTOR=3``: three times, for
  the slow files), to look for what the fixed examples miss.
  A failure found this way is fixed and kept as an ``@example``.
"""

import os

import pytest
import torch
from hypothesis import is_hypothesis_test, settings

EXPLORE_FACTOR = int(os.environ.get("ABFP_EXPLORE_FACTOR", "10"))
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True)
settings.load_profile("ci")  # the hypothesis plugin loads --hypothesis-profile after this


def pytest_collection_modifyitems(items):
    """Under ``explore``, each hypothesis test runs ``EXPLORE_FACTOR`` times its own ``max_examples``; its other
    settings (deadline, health checks) stay. A test parametrised by pytest is one function: scaled once."""
    if settings.get_current_profile_name() != "explore":
        return
    seen = set()
    for item in items:
        fn = getattr(item, "obj", None)
        if fn is None or not is_hypothesis_test(fn) or id(fn) in seen:
            continue
        seen.add(id(fn))
        own = fn._hypothesis_internal_use_settings
        fn._hypothesis_internal_use_settings = settings(own, max_examples=own.max_examples * EXPLORE_FACTOR,
                                                        derandomize=False)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)
    yield
