"""The sparse attention kernels against the plain-torch definition (which the rule tests tie to eager).

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest) at small sizes with small tiles,
so several key tiles, head blocks, the DA + DB split of Dqk, skipped all-invalid tiles or packed valid
indices (``compact``), empty rows and sinks all run; on CUDA also at the DeepSeek-V3.2 shape (dqk 576 =
512 + 64, dv 512, 128 heads).
"""

import pytest
import torch
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from dsa_inductor.lowerings.sparse_attention import (attention_mismatch, sparse_attention,
                                                     sparse_attention_reference, sparse_attention_triton)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@st.composite
def problems(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    b, s, t = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 20))
    h = draw(st.sampled_from([1, 3, 4, 16] if not CUDA else [1, 4, 16, 128]))
    kk = draw(st.integers(1, 12))
    shared = draw(st.booleans())
    d = draw(st.sampled_from([16, 24, 40, 72]))
    mla = shared and draw(st.booleans())
    dv = draw(st.sampled_from([d // 2, 16, d] if mla else [8, 16, 24]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    q = torch.randn(b, s, h, d, generator=g)
    k = torch.randn(b, t, 1 if shared else h, d, generator=g)
    v = None if mla else torch.randn(b, t, k.shape[2], dv, generator=g)
    idx = torch.randint(-2, t + 2, (b, s, kk), generator=g)
    if draw(st.booleans()):
        idx[0, 0] = -1  # a row of padding only
    kw = dict(topk_indices=idx.to(draw(st.sampled_from([torch.int32, torch.int64]))))
    if draw(st.booleans()):
        kw["row_ends"] = torch.randint(0, t + 1, (b, s), generator=g)
    if draw(st.booleans()):
        kw["keep_mask"] = torch.rand(b, s, t, generator=g) < 0.7
    if draw(st.booleans()):
        kw["attn_sink"] = torch.randn(h, generator=g)
    kw["scale"] = draw(st.sampled_from([d ** -0.5, 1.3]))
    kw["empty_row"] = draw(st.integers(0, 2))
    kw["dedup"] = draw(st.booleans())
    tiles = dict(block_k=draw(st.sampled_from([16, 32])), block_h=draw(st.sampled_from([16, 32])),
                 num_warps=4, compact=draw(st.booleans()))
    return q.to(dtype), k.to(dtype), None if v is None else v.to(dtype), dv, kw, tiles


def _call(fn, q, k, v, dv, kw, **extra):
    kw = {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    return fn(q.to(DEVICE), k.to(DEVICE), None if v is None else v.to(DEVICE), kw["topk_indices"],
              kw.get("row_ends"), kw.get("keep_mask"), kw.get("attn_sink"), kw["scale"], dv, kw["empty_row"],
              kw["dedup"], q.dtype, **extra)


@settings(max_examples=examples(cuda=200, cpu=40))
@given(problems())
def test_kernel_equals_reference(problem):
    q, k, v, dv, kw, tiles = problem
    ref = _call(sparse_attention_reference, q, k, v, dv, kw)
    out = _call(sparse_attention_triton, q, k, v, dv, kw, **tiles)
    why = attention_mismatch(ref, out)
    assert why is None, why


@pytest.mark.skipif(not CUDA, reason="the DeepSeek-V3.2 shape needs a GPU")
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_at_deepseek_shape(causal, compact):
    g = torch.Generator(device="cuda").manual_seed(0)
    s, t, h, k = 256, 2048, 128, 2048
    q = torch.randn(1, s, h, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(1, t, 1, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.rand(1, s, t, device="cuda", generator=g).argsort(-1)[..., :k].to(torch.int32)
    ends = (torch.arange(s, device="cuda") + (t - s) + 1)[None] if causal else None
    args = (q, kv, None, idx, ends, None, None, 576 ** -0.5, 512, 0, False, torch.bfloat16)
    why = attention_mismatch(sparse_attention_reference(*args), sparse_attention_triton(*args, compact=compact))
    assert why is None, why


def test_op_matches_reference_and_opcheck():
    g = torch.Generator().manual_seed(1)
    q, kv = torch.randn(2, 3, 4, 24, generator=g), torch.randn(2, 7, 1, 24, generator=g)
    idx = torch.randint(-1, 7, (2, 3, 5), generator=g)
    args = (q.to(DEVICE), kv.to(DEVICE), None, idx.to(DEVICE), None, None, None, 0.2, 16, 0, False, torch.float32)
    out = sparse_attention(*args)
    assert attention_mismatch(sparse_attention_reference(*args), out) is None
    torch.library.opcheck(torch.ops.dsa_inductor.sparse_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("change,name", [
    (dict(q=torch.randn(3, 4, 24)), "`q`"),
    (dict(topk_indices=torch.zeros(2, 3, 5)), "`topk_indices`"),
    (dict(k=torch.randn(2, 7, 3, 24)), "`k`"),
    (dict(attn_sink=torch.randn(3)), "`attn_sink`"),
    (dict(dv=30), "`dv`"),
    (dict(empty_row=5), "`empty_row`"),
    (dict(row_ends=torch.zeros(2, 4, dtype=torch.int64)), "`row_ends`"),
])
def test_bad_arguments_name_the_argument(change, name):
    kw = dict(q=torch.randn(2, 3, 4, 24), k=torch.randn(2, 7, 1, 24), v=None,
              topk_indices=torch.zeros(2, 3, 5, dtype=torch.int64), row_ends=None, keep_mask=None, attn_sink=None,
              scale=0.2, dv=16, empty_row=0, dedup=False, out_dtype=torch.float32)
    kw.update(change)
    with pytest.raises((ValueError, TypeError), match=name):
        torch.ops.dsa_inductor.sparse_attention(*kw.values())
