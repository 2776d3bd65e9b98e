"""Host-side helpers of the ops' launch code (``dsa_inductor.lowerings.host``)."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from dsa_inductor.lowerings.host import broadcast_shapes, cdiv, next_pow2

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
    triton = __import__("pytest").importorskip("triton")
    assert cdiv(a, b) == triton.cdiv(a, b)


@given(st.integers(0, 2**40))
def test_next_pow2_as_triton(n):
    triton = __import__("pytest").importorskip("triton")
    assert next_pow2(n) == triton.next_power_of_2(n)
