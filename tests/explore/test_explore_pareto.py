"""The Pareto frontier of (energy, metric) against a brute-force definition of dominance."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from abfp.explore.pareto import pareto_front


def brute_front(points, higher):
    """Every point that no other point dominates (energy <= and metric better-or-equal, one strictly)."""
    def better_eq(a, b):
        return a >= b if higher else a <= b

    out = []
    for i, (e, v) in enumerate(points):
        dominated = any(
            e2 <= e and better_eq(v2, v) and (e2 < e or v2 != v) for j, (e2, v2) in enumerate(points) if j != i)
        if not dominated:
            out.append(i)
    return sorted(out)


coord = st.integers(0, 6).map(float)  # few distinct values: ties are common


@settings(max_examples=120, deadline=None)
@given(points=st.lists(st.tuples(coord, coord), max_size=25), higher=st.booleans())
def test_front_matches_brute_force(points, higher):
    assert sorted(pareto_front(points, higher)) == brute_front(points, higher)


def test_front_on_random_continuous_points_is_monotone():
    rng = random.Random(0)
    pts = [(rng.lognormvariate(0, 1), rng.uniform(50, 100)) for _ in range(200)]
    front = pareto_front(pts, True)
    assert sorted(front) == brute_front(pts, True)
    es = [pts[i][0] for i in front]
    vs = [pts[i][1] for i in front]
    assert es == sorted(es) and vs == sorted(vs)  # cheaper designs on the frontier are worse


def test_non_finite_points_are_never_on_the_front():
    nan = float("nan")
    assert pareto_front([(1.0, nan), (2.0, 1.0), (float("inf"), 5.0)]) == [1]


@pytest.mark.parametrize("higher", [True, False])
def test_lower_is_better_flips_the_metric(higher):
    pts = [(1.0, 0.5), (2.0, 0.1)]
    assert pareto_front(pts, higher) == ([0] if higher else [0, 1])
