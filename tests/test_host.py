"""Host-side helpers of the ops' launch code (``dsa_inductor.lowerings.host``)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsa_inductor.lowerings.host import broadcast_shapes, by_metadata, cdiv, next_pow2

shape = st.lists(st.integers(0, 3), max_size=4).map(tuple)


@given(st.lists(shape, max_size=4))
def test_broadcast_shapes_as_torch(shapes):
    try:
        expected = tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        expected = RuntimeError
    try:
        got = broadcast_shapes(*shapes)
    except RuntimeError:
        got = RuntimeError
    assert got == expected


@given(st.integers(0, 2**40), st.integers(1, 2**20))
def test_cdiv_as_triton(a, b):
    triton = pytest.importorskip("triton")
    assert cdiv(a, b) == triton.cdiv(a, b)


@given(st.integers(0, 2**40))
def test_next_pow2_as_triton(n):
    triton = pytest.importorskip("triton")
    assert next_pow2(n) == triton.next_power_of_2(n)


def test_by_metadata_remembers_per_argument_metadata():
    calls = []

    def check(x, k, flag=None):
        calls.append(1)
        if k < 0:
            raise ValueError("`k` must be >= 0")
        return (tuple(x.shape), k)

    a = torch.zeros(3, 4)
    assert by_metadata(check, a, 2) == ((3, 4), 2)
    assert by_metadata(check, torch.ones(3, 4), 2) == ((3, 4), 2)  # other values, same metadata: remembered
    assert len(calls) == 1
    by_metadata(check, a.to(torch.float64), 2)  # dtype
    by_metadata(check, torch.zeros(4, 3), 2)  # shape
    by_metadata(check, a, 3)  # a plain argument's value
    by_metadata(check, a, 2.0)  # ... and its type (2.0 == 2)
    assert len(calls) == 5
    for _ in range(2):  # a failing check is never remembered: it raises every time
        with pytest.raises(ValueError, match="`k`"):
            by_metadata(check, a, -1)
    assert len(calls) == 7
    by_metadata(check, a, 2, [1])  # unhashable: runs each time
    by_metadata(check, a, 2, [1])
    assert len(calls) == 9
