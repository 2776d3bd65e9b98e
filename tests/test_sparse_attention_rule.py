"""Rule sparse_attention under torch.compile: matches, equivalence with eager, and near misses left alone.

Each user function is compiled once with dynamic shapes, then fed many hypothesis examples (random top-k
sets with -1 padding, selections that overlap the causal future, sinks, dynamic S / T / K); the compile
count is checked, so a test that silently recompiled per example would fail.
"""

import contextlib
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CUDA, DEVICES, matches
from dsa_inductor.lowerings.sparse_attention import attention_mismatch

NEG_INF = float("-inf")
DQK, DV, H = 24, 16, 4  # MLA-like: v = the first DV dims of the latent


# ---- user code, written as model code writes it ------------------------------------------------------------

def dense_mla_masked_fill(q, kv, topk_indices):
    """q [B, H, S, Dqk], kv [B, T, Dqk] latent shared by the heads; causal & ~index_mask; masked_fill."""
    b, h, s, d = q.shape
    t = kv.shape[1]
    index_mask = torch.ones(b, s, t, dtype=torch.bool, device=q.device).scatter(-1, topk_indices.long(), False)
    causal = torch.arange(t, device=q.device)[None, :] <= torch.arange(s, device=q.device)[:, None] + (t - s)
    keep = (causal[None] & ~index_mask).unsqueeze(1)
    k = kv.unsqueeze(1).expand(b, h, t, d)
    v = kv[..., :DV].unsqueeze(1).expand(b, h, t, DV)
    scores = torch.matmul(q, k.transpose(-1, -2)) * DQK ** -0.5
    p = torch.softmax(scores.masked_fill(~keep, NEG_INF), dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def dense_eager_finfo(q, k, v, topk_indices):
    """transformers' eager path: float causal mask (0 / finfo.min), index mask filled with finfo.min, added."""
    b, h, s, d = q.shape
    t = k.shape[2]
    causal = torch.arange(t, device=q.device)[None, :] <= torch.arange(s, device=q.device)[:, None] + (t - s)
    mask = torch.where(causal, 0.0, torch.finfo(q.dtype).min).to(q.dtype)[None, None].expand(b, 1, s, t)
    index_mask = torch.ones(b, s, t, dtype=torch.bool, device=q.device).scatter(-1, topk_indices.long(), False)
    mask = mask.masked_fill(index_mask.unsqueeze(1), torch.finfo(q.dtype).min)
    scores = torch.matmul(q, k.transpose(2, 3)) * 0.3 + mask
    p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def dense_sdpa(q, k, v, topk_indices):
    """transformers' sdpa path: bool mask causal & ~index_mask into scaled_dot_product_attention."""
    b, h, s, d = q.shape
    t = k.shape[2]
    causal = torch.arange(t, device=q.device)[None, :] <= torch.arange(s, device=q.device)[:, None] + (t - s)
    index_mask = torch.ones(b, s, t, dtype=torch.bool, device=q.device).scatter(-1, topk_indices.long(), False)
    keep = causal[None, None] & ~index_mask.unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)


def gather_einsum(q, kv, topk_indices):
    """q [B, S, H, Dqk], kv [B, T, Dqk]; -1 pads topk_indices."""
    sel = kv[torch.arange(q.shape[0], device=q.device)[:, None, None], topk_indices]
    scores = torch.einsum("bshd,bskd->bshk", q, sel) * 0.3
    scores = scores.masked_fill((topk_indices == -1).unsqueeze(2), NEG_INF)
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("bshk,bskd->bshd", p, sel[..., :DV])


def gather_unbatched_sink_cat(q, kv, topk_indices, attn_sink):
    """q [S, H, Dqk], kv [T, Dqk]; DeepSeek-V4 sink: cat, softmax, drop the sink column."""
    sel = kv[topk_indices]
    scores = torch.matmul(q, sel.transpose(-1, -2)) * 0.3
    scores = scores.masked_fill((topk_indices < 0).unsqueeze(-2), NEG_INF)
    sink = attn_sink.reshape(1, -1, 1).expand(*scores.shape[:-1], 1)
    p = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
    if q.dtype != torch.float32:
        p = p.to(q.dtype)
    return torch.matmul(p, sel[..., :DV])


def gather_sink_additive(q, kv, topk_indices, attn_sink):
    """The sink as an extra term of the softmax denominator (fp32)."""
    sel = kv[torch.arange(q.shape[0], device=q.device)[:, None, None], topk_indices]
    scores = torch.einsum("bshd,bskd->bshk", q, sel) * 0.3
    scores = scores.masked_fill((topk_indices == -1).unsqueeze(2), NEG_INF)
    s4 = attn_sink.reshape(1, 1, -1, 1)
    m = torch.maximum(scores.amax(dim=-1, keepdim=True), s4)
    e = torch.exp(scores - m)
    p = e / (e.sum(dim=-1, keepdim=True) + torch.exp(s4 - m))
    return torch.einsum("bshk,bskd->bshd", p, sel[..., :DV])


# fn -> (input kind, {dtype: expected variant})
CASES = {
    dense_mla_masked_fill: ("dense_mla", {torch.float32: "dense_mask:mla:nan", torch.bfloat16: "dense_mask:mla:nan"}),
    dense_eager_finfo: ("dense_heads", {torch.float32: "dense_mask:per_head_kv:finfo_min",
                                        torch.bfloat16: "dense_mask:per_head_kv:finfo_min"}),
    dense_sdpa: ("dense_heads", {torch.float32: "dense_mask:per_head_kv:safe_softmax"}),
    gather_einsum: ("gather", {torch.float32: "gather:einsum:eq:fp32", torch.bfloat16: "gather:einsum:eq:half"}),
    gather_unbatched_sink_cat: ("gather_unbatched_sink", {
        torch.float32: "gather_unbatched:matmul:lt:sink_cat:fp32",
        torch.bfloat16: "gather_unbatched:matmul:lt:sink_cat:half"}),
    gather_sink_additive: ("gather_sink", {torch.float32: "gather:einsum:eq:sink_additive:fp32"}),
}
PARAMS = [(fn, dt) for fn, (_, variants) in CASES.items() for dt in variants]


@st.composite
def inputs(draw, kind, dtype, device):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    b, s, t = 2, draw(st.integers(2, 9)), draw(st.integers(2, 14))
    s = min(s, t)
    k = draw(st.integers(2, t))
    # distinct keys per row (a top-k set), often reaching into the causal future, -1 padding for gathers
    idx = torch.rand(b, s, t, generator=g).argsort(-1)[..., :k]
    if kind.startswith("gather"):
        pad = torch.rand(b, s, k, generator=g) < draw(st.sampled_from([0.0, 0.3]))
        idx = idx.masked_fill(pad, -1)
        if draw(st.booleans()):
            idx[0, 0] = -1  # a query with no key: NaN as eager (0 with a sink)
    idx = idx.to(torch.int64 if kind.startswith("gather") else torch.int32)  # a dtype change recompiles

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    if kind == "dense_mla":
        return rnd(b, H, s, DQK), rnd(b, t, DQK), idx.to(device)
    if kind == "dense_heads":
        return rnd(b, H, s, DQK), rnd(b, H, t, DQK), rnd(b, H, t, DV), idx.to(device)
    sink = (torch.randn(H, generator=g) * 2).to(dtype).to(device)
    # The head count is static, as in any model: dynamic (and with ``fresh``'s duck sizing off) q's and the
    # sink's head dims would be two symbols, which the gather variants' exact re-trace does not match.
    torch._dynamo.mark_static(sink, 0)
    if kind == "gather_unbatched_sink":
        q = rnd(s, H, DQK)
        torch._dynamo.mark_static(q, 1)
        return q, rnd(t, DQK), idx[0].to(device), sink
    if kind == "gather_sink":
        q = rnd(b, s, H, DQK)
        torch._dynamo.mark_static(q, 2)
        return q, rnd(b, t, DQK), idx.to(device), sink
    return rnd(b, s, H, DQK), rnd(b, t, DQK), idx.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn,dtype", PARAMS, ids=lambda p: getattr(p, "__name__", str(p)))
def test_compiled_equals_eager(fresh, fn, dtype, device):
    kind, variants = CASES[fn]
    variant = variants[dtype]
    if device == "cuda" and fn is dense_sdpa:  # fp32 with a mask: CUDA SDPA's efficient kernel (cuDNN and
        variant = "dense_mask:per_head_kv:sdpa_efficient"  # flash take no fp32; tests/test_*_fused_sdpa.py)
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    if device == "cuda" and kind == "gather_unbatched_sink":
        # Inductor's pad_mm (joint graph, before our pass) may pad this case's odd-sized bf16 matmuls, and it
        # decides by timing both: the padded graph is not matched (test_padded_matmul_not_matched below), so
        # under a loaded GPU the match count was flaky.  The padding is turned off here to test the rest.
        stack = contextlib.ExitStack()
        stack.enter_context(torch._inductor.config.patch(shape_padding=False))
    else:
        stack = contextlib.nullcontext()

    @settings(max_examples=12)
    @given(inputs(kind, dtype, device))
    def check(args):
        with torch.no_grad():
            out, ref = compiled(*args), fn(*args)
        why = attention_mismatch(ref, out)
        assert why is None, why

    with stack:
        check()
    assert matches("sparse_attention").get(variant, 0) >= 1, (matches("sparse_attention"), fresh.report())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # static, then dynamic


@pytest.mark.skipif(not CUDA, reason="pad_mm pads matmuls on CUDA only")
@pytest.mark.xfail(strict=True, reason="known limitation: a gather-form graph whose matmuls Inductor's pad_mm padded "
                                       "(joint graph, before the post-grad pass) is not matched")
def test_padded_matmul_not_matched(fresh):
    compiled = torch.compile(gather_unbatched_sink_cat, dynamic=False, fullgraph=True)

    @settings(max_examples=1)
    @given(inputs("gather_unbatched_sink", torch.bfloat16, "cuda"))
    def run(args):
        with torch._inductor.config.patch(force_shape_pad=True), torch.no_grad():
            compiled(*args)

    run()
    assert matches("sparse_attention"), fresh.report()


def test_fused_op_in_generated_code(fresh):
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(2, H, 6, DQK, generator=g), torch.randn(2, 9, DQK, generator=g)
    idx = torch.rand(2, 6, 9, generator=g).argsort(-1)[..., :5]
    out, code = run_and_get_code(torch.compile(dense_mla_masked_fill), q, kv, idx)
    assert "dsa_inductor.sparse_attention" in "\n".join(code)
    assert attention_mismatch(dense_mla_masked_fill(q, kv, idx), out) is None
    assert "keep mask -> row_ends" in fresh.report()  # the causal mask became a per-row bound
    assert "dedup" in fresh.report()  # indices from outside: repeated indices counted once, as the dense mask


def test_repeated_indices_count_once_in_dense_form(fresh):
    g = torch.Generator().manual_seed(3)
    q, kv = torch.randn(2, H, 5, DQK, generator=g), torch.randn(2, 8, DQK, generator=g)
    idx = torch.randint(0, 8, (2, 5, 6), generator=g)
    idx[..., 1] = idx[..., 0]  # a repeated key
    with torch.no_grad():
        out = torch.compile(dense_mla_masked_fill)(q, kv, idx)
    assert matches("sparse_attention")
    assert attention_mismatch(dense_mla_masked_fill(q, kv, idx), out) is None


@pytest.mark.parametrize("fn,dtype,variant", [
    (gather_einsum, torch.float32, "gather_bs1:einsum:eq:fp32"),
    (gather_einsum, torch.bfloat16, "gather_bs1:einsum:eq:half"),
    (gather_sink_additive, torch.float32, "gather_bs1:einsum:eq:sink_additive:fp32"),
], ids=lambda p: getattr(p, "__name__", str(p)))
@pytest.mark.parametrize("dynamic", [False, True])
def test_gather_batch_one(fresh, fn, dtype, variant, dynamic):
    """Batch 1 (decode, a single prefill): Dynamo specializes B == 1, and einsum then folds the batch
    away, so the graph differs from the batched one (a variant of its own)."""
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(1, 6, H, DQK, generator=g).to(dtype), torch.randn(1, 9, DQK, generator=g).to(dtype)
    idx = torch.rand(1, 6, 9, generator=g).argsort(-1)[..., :5]
    idx[0, 1, 2] = -1
    args = (q, kv, idx) + ((torch.randn(H, generator=g).to(dtype),) if fn is gather_sink_additive else ())
    with torch.no_grad():
        out = torch.compile(fn, dynamic=dynamic, fullgraph=True)(*args)
    assert matches("sparse_attention") == {variant: 1}, (matches("sparse_attention"), fresh.report())
    assert attention_mismatch(fn(*args), out) is None


def test_gather_batch_one_gpu_mm_form(fresh, gpu_bmm_to_mm):
    """On a GPU Inductor rewrites the batch-1 bmm to mm before our pass; the pass undoes it while matching
    (here forced on for CPU graphs)."""
    g = torch.Generator().manual_seed(1)
    q, kv = torch.randn(1, 6, H, DQK, generator=g), torch.randn(1, 9, DQK, generator=g)
    idx = torch.rand(1, 6, 9, generator=g).argsort(-1)[..., :5]
    with torch.no_grad():
        out = torch.compile(gather_einsum, dynamic=False, fullgraph=True)(q, kv, idx)
    assert matches("sparse_attention") == {"gather_bs1:einsum:eq:fp32": 1}, fresh.report()
    assert attention_mismatch(gather_einsum(q, kv, idx), out) is None


SCALE = 0.3  # a global float: under dynamic=True Dynamo passes it as a 0-d tensor (specialize_float=False)


def gather_global_scale(q, kv, topk_indices):
    sel = kv[torch.arange(q.shape[0], device=q.device)[:, None, None], topk_indices]
    scores = torch.einsum("bshd,bskd->bshk", q, sel) * SCALE
    scores = scores.masked_fill((topk_indices == -1).unsqueeze(2), NEG_INF)
    return torch.einsum("bshk,bskd->bshd", torch.softmax(scores, dim=-1), sel[..., :DV])


def test_unspecialized_float_scale_is_left_alone(fresh):
    """A scale that reaches the graph as a tensor input is not a constant the op can take: rejected, with
    the reason, not passed on (the fused op's ``scale`` is a float)."""
    g = torch.Generator().manual_seed(2)
    q, kv = torch.randn(2, 6, H, DQK, generator=g), torch.randn(2, 9, DQK, generator=g)
    idx = torch.rand(2, 6, 9, generator=g).argsort(-1)[..., :5]
    with torch.no_grad():
        out = torch.compile(gather_global_scale, dynamic=True, fullgraph=True)(q, kv, idx)
    torch.testing.assert_close(out, gather_global_scale(q, kv, idx))
    assert matches("sparse_attention") == {}
    assert "`scale` is a graph input" in fresh.report(), fresh.report()


# ---- near misses: the rule must leave these alone -----------------------------------------------------------

def nm_scatter_true(q, kv, topk_indices):
    b, h, s, d = q.shape
    t = kv.shape[1]
    index_mask = torch.ones(b, s, t, dtype=torch.bool).scatter(-1, topk_indices, True)
    k = kv.unsqueeze(1).expand(b, h, t, d)
    scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill(index_mask.unsqueeze(1), NEG_INF)
    return torch.matmul(torch.softmax(scores, -1), k[..., :DV])


def nm_softmax_other_dim(q, kv, topk_indices):
    b, h, s, d = q.shape
    t = kv.shape[1]
    index_mask = torch.ones(b, s, t, dtype=torch.bool).scatter(-1, topk_indices, False)
    k = kv.unsqueeze(1).expand(b, h, t, d)
    scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill(index_mask.unsqueeze(1), NEG_INF)
    return torch.matmul(torch.softmax(scores, -2), k[..., :DV])


def nm_weights_reused(q, kv, topk_indices):
    b, h, s, d = q.shape
    t = kv.shape[1]
    index_mask = torch.ones(b, s, t, dtype=torch.bool).scatter(-1, topk_indices, False)
    k = kv.unsqueeze(1).expand(b, h, t, d)
    scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill(index_mask.unsqueeze(1), NEG_INF)
    p = torch.softmax(scores, -1)
    return torch.matmul(p, k[..., :DV]), p.sum(1)


def nm_gather_weights_reused(q, kv, topk_indices):
    sel = kv[torch.arange(q.shape[0])[:, None, None], topk_indices]
    scores = torch.einsum("bshd,bskd->bshk", q, sel).masked_fill((topk_indices == -1).unsqueeze(2), NEG_INF)
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bshk,bskd->bshd", p, sel[..., :DV]), p


def nm_gather_softmax_other_dim(q, kv, topk_indices):
    sel = kv[torch.arange(q.shape[0])[:, None, None], topk_indices]
    scores = torch.einsum("bshd,bskd->bshk", q, sel).masked_fill((topk_indices == -1).unsqueeze(2), NEG_INF)
    return torch.einsum("bshk,bskd->bshd", torch.softmax(scores, dim=-2), sel[..., :DV])


NEAR_MISSES = {  # fn -> (layout, the reason report() gives)
    nm_scatter_true: ("dense", "scattered with True"),
    nm_softmax_other_dim: ("dense", "softmax over the last dim"),
    nm_weights_reused: ("dense", "used elsewhere"),
    nm_gather_weights_reused: ("gather", "gather variant"),
    nm_gather_softmax_other_dim: ("gather", "gather variant"),
}


@pytest.mark.parametrize("fn", list(NEAR_MISSES), ids=lambda f: f.__name__)
def test_near_miss_not_rewritten(fresh, fn):
    layout, reason = NEAR_MISSES[fn]
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 9, DQK, generator=g)
    idx = torch.rand(2, 6, 9, generator=g).argsort(-1)[..., :5]
    q = torch.randn(2, H, 6, DQK, generator=g) if layout == "dense" else torch.randn(2, 6, H, DQK, generator=g)
    with torch.no_grad():
        out = torch.compile(fn)(q, kv, idx)
        ref = fn(q, kv, idx)
    assert matches("sparse_attention") == {}, matches("sparse_attention")
    torch.testing.assert_close(out, ref, equal_nan=True, atol=1e-4, rtol=1e-4)
    from dsa_inductor.report import _STATS

    reasons = _STATS["sparse_attention"].rejections
    assert any(reason in r for r in reasons), reasons
