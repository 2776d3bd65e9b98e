"""Host-side helpers of the ops' launch code (``dsa_inductor.lowerings.host``)."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from dsa_inductor.lowerings.host import broadcast_shapes

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
