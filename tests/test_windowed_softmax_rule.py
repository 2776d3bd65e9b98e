"""Rule windowed_softmax under torch.compile: matches, equivalence with eager, and near misses left alone.

Each user function is compiled once with dynamic shapes, then fed many hypothesis examples; the
compile count is checked, so a test that silently recompiled per example would fail.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code

from conftest import DEVICES, matches
from dsa_inductor.testing import softmax_mismatch

NEG_INF = float("-inf")
W = 4  # sliding window (DeepSeek-V4 uses 128; small here so that the window matters at test sizes)


# ---- user code, written as model code writes it (not through the rule's own search functions) -------------

def range_masked_fill(scores, ks, ke):
    pos = torch.arange(scores.shape[-1], device=scores.device)
    keep = (pos[None, :] >= ks[:, None]) & (pos[None, :] < ke[:, None])
    return scores.masked_fill(~keep, NEG_INF).softmax(dim=-1)


def range_where_float(scores, ks, ke):
    pos = torch.arange(scores.shape[-1], device=scores.device)
    keep = (pos >= ks.unsqueeze(-1)) & (pos < ke.unsqueeze(-1))
    return torch.softmax(torch.where(keep, scores, NEG_INF).float(), dim=-1)


def causal_dtype_arg(scores, ks, ke):
    pos = torch.arange(scores.shape[-1], device=scores.device)
    masked = scores.masked_fill(~(pos.unsqueeze(0) < ke.unsqueeze(1)), NEG_INF)
    return torch.softmax(masked, dim=-1, dtype=torch.float32)


def sliding_window_attention(scores):
    # [B, H, S, T] attention scores; queries are the last S of T positions, each sees the last W keys
    s, t = scores.shape[-2], scores.shape[-1]
    q = torch.arange(s, device=scores.device) + (t - s)
    kv = torch.arange(t, device=scores.device)
    keep = (kv[None, :] > q[:, None] - W) & (kv[None, :] <= q[:, None])
    return torch.softmax(scores.masked_fill(~keep, NEG_INF), dim=-1, dtype=torch.float32)


def transformers_causal_mask(scores):
    # transformers builds a [B, 1, S, T] bool mask from `kv_idx <= q_idx` and expands it over the batch
    b, s, t = scores.shape[0], scores.shape[-2], scores.shape[-1]
    q = torch.arange(s, device=scores.device)
    kv = torch.arange(t, device=scores.device)
    mask = (kv[None, None, None, :] <= q[None, None, :, None]).expand(b, 1, s, t)
    return scores.float().masked_fill(~mask, NEG_INF).softmax(-1)


def transformers_sliding_and_chain(scores):
    # transformers' sliding-window mask functions and-ed onto a constant True (as DeepSeek-V4's graph holds it):
    # (True & (kv > q - W)) & (kv <= q)
    s, t = scores.shape[-2], scores.shape[-1]
    q = torch.arange(s, device=scores.device)[:, None] + (t - s)
    kv = torch.arange(t, device=scores.device)[None, :]
    keep = (torch.full((), True, device=scores.device) & (kv > q - W)) & (kv <= q)
    return torch.softmax(scores.masked_fill(~keep, NEG_INF), dim=-1, dtype=torch.float32)


def sliding_drop_mask(scores):
    # the mask marks dropped positions: future keys, and keys W or more behind
    q = torch.arange(scores.shape[-2], device=scores.device)
    kv = torch.arange(scores.shape[-1], device=scores.device)
    drop = (kv[None, :] > q[:, None]) | (kv[None, :] <= q[:, None] - W)
    return scores.masked_fill(drop, NEG_INF).softmax(dim=-1)


def le_bound(scores, ks, ke):
    # `<=` on the end: the rule must not read it as `<` (it becomes row_ends = ke + 1)
    pos = torch.arange(scores.shape[-1], device=scores.device)
    keep = (pos >= ks[:, None]) & (pos <= ke[:, None])
    return torch.where(keep, scores, NEG_INF).softmax(-1)


def _keep(fn, args):
    x = args[0]
    t = x.shape[-1]
    pos = torch.arange(t, device=x.device)
    if fn in (range_masked_fill, range_where_float):
        return (pos >= args[1][:, None]) & (pos < args[2][:, None])
    if fn is causal_dtype_arg:
        return pos < args[2][:, None]
    if fn is le_bound:
        return (pos >= args[1][:, None]) & (pos <= args[2][:, None])
    q = torch.arange(x.shape[-2], device=x.device)
    if fn in (sliding_window_attention, transformers_sliding_and_chain):
        q = q + (t - x.shape[-2])
        return (pos > q[:, None] - W) & (pos <= q[:, None])
    if fn is sliding_drop_mask:
        return ~((pos > q[:, None]) | (pos <= q[:, None] - W))
    return pos <= q[:, None]


# fn -> (expected variant by dtype, input kind).  softmax(dtype=float32) is the graph of softmax(x.float()).
CASES = {
    range_masked_fill: ({torch.float32: "range:fp32", torch.bfloat16: "range:half"}, "rows"),
    range_where_float: ({torch.bfloat16: "range_where:float"}, "rows"),
    causal_dtype_arg: ({torch.float16: "causal:float"}, "rows"),
    sliding_window_attention: ({torch.bfloat16: "keep_mask:float", torch.float32: "keep_mask:fp32"}, "attn"),
    transformers_causal_mask: ({torch.float16: "keep_mask:float_first"}, "attn"),
    le_bound: ({torch.float32: "keep_mask_where:fp32"}, "rows"),
    sliding_drop_mask: ({torch.float32: "drop_mask:fp32"}, "attn"),
    transformers_sliding_and_chain: ({torch.float32: "keep_mask:fp32"}, "attn"),
}
PARAMS = [(fn, dt) for fn, (variants, _) in CASES.items() for dt in variants]


@st.composite
def inputs(draw, kind, dtype, device):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = draw(st.integers(3, 40))
    if kind == "attn":  # sizes >= 2: a size-1 dim is specialized and would recompile
        b, h, s = draw(st.integers(2, 3)), draw(st.integers(2, 3)), draw(st.integers(2, t))
        return (torch.randn(b, h, s, t, generator=g).to(dtype).to(device),)
    rows = draw(st.integers(2, 9))
    x = (torch.randn(rows, t, generator=g) * 4).to(dtype)
    s = torch.randint(-2, t + 2, (rows,), generator=g)
    e = torch.randint(-2, t + 2, (rows,), generator=g)
    if draw(st.booleans()):
        e[0] = s[0]  # an empty row: NaN, as eager
    idt = draw(st.sampled_from([torch.int32, torch.int64]))
    return x.to(device), s.to(idt).to(device), e.to(idt).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn,dtype", PARAMS, ids=lambda p: getattr(p, "__name__", str(p)))
def test_compiled_equals_eager(fresh, fn, dtype, device):
    variants, kind = CASES[fn]
    variant = variants[dtype]
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    torch._dynamo.utils.counters.clear()

    @settings(max_examples=25)
    @given(inputs(kind, dtype, device))
    def check(args):
        with torch.no_grad():
            out, ref = compiled(*args), fn(*args)
        why = softmax_mismatch(ref, out, _keep(fn, args))
        assert why is None, why

    check()
    assert matches("windowed_softmax").get(variant, 0) >= 1, matches("windowed_softmax")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # static, then dynamic
    if kind == "attn" or fn is le_bound:  # the bool mask became row bounds
        assert "no mask read" in fresh.report()


def test_fused_op_in_generated_code(fresh):
    x = torch.randn(2, 2, 8, 24)
    out, code = run_and_get_code(torch.compile(sliding_window_attention), x)
    code = "\n".join(code)
    assert "dsa_inductor.windowed_softmax" in code
    assert softmax_mismatch(sliding_window_attention(x), out) is None
    assert "keep_mask:fp32" in fresh.report()


# ---- near misses: no rule may rewrite these ----------------------------------------------------------------

def _keep_range(x, s, e):
    pos = torch.arange(x.shape[-1])
    return (pos >= s[:, None]) & (pos < e[:, None])


def nm_other_dim(x, s, e):
    return x.masked_fill(~_keep_range(x, s, e), NEG_INF).softmax(dim=0)


def nm_log_softmax(x, s, e):
    return x.masked_fill(~_keep_range(x, s, e), NEG_INF).log_softmax(dim=-1)


def nm_reused_masked_scores(x, s, e):
    masked = x.masked_fill(~_keep_range(x, s, e), NEG_INF)
    return masked.softmax(-1), masked.amax(-1)


def nm_finite_fill(x, s, e):
    return x.masked_fill(~_keep_range(x, s, e), -1e9).softmax(-1)


def nm_materialized_mask(x, s, e):
    return x.masked_fill(x > 0.5, NEG_INF).softmax(-1)


def nm_offset_arange(x, s, e):
    pos = torch.arange(1, x.shape[-1] + 1)
    return x.masked_fill(~((pos >= s[:, None]) & (pos < e[:, None])), NEG_INF).softmax(-1)


NEAR_MISSES = {  # fn -> the reason report() gives
    nm_other_dim: "not the last dim", nm_log_softmax: "log_softmax", nm_reused_masked_scores: "another consumer",
    nm_finite_fill: "not -inf", nm_materialized_mask: "the drop mask is not an arange comparison",
    nm_offset_arange: "not an arange comparison",  # as a keep mask (~m), then as a drop mask (m = ~keep)
}


@pytest.mark.parametrize("fn", list(NEAR_MISSES), ids=lambda f: f.__name__)
def test_near_miss_not_rewritten(fresh, fn):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 30, generator=g)
    s = torch.randint(0, 10, (12,), generator=g)
    e = s + torch.randint(4, 20, (12,), generator=g)
    with torch.no_grad():
        out = torch.compile(fn)(x, s, e)
        ref = fn(x, s, e)
    assert matches("windowed_softmax") == {}, matches("windowed_softmax")
    torch.testing.assert_close(out, ref, equal_nan=True)
    from dsa_inductor.report import _STATS

    reasons = _STATS["windowed_softmax"].rejections
    assert any(NEAR_MISSES[fn] in r for r in reasons), reasons  # seen, and the right reason recorded
