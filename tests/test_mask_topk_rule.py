"""Rule mask_topk under torch.compile: matches, equivalence with eager, and near misses left alone.

Each user function is compiled once with dynamic shapes, then fed many hypothesis examples; the
compile count is checked, so a test that silently recompiled per example would fail.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code

from conftest import DEVICES, matches
from dsa_inductor import testing
from dsa_inductor.testing import topk_mismatch

NEG_INF = float("-inf")
K = 8


# ---- user code, written as model code writes it (not through the rule's own search functions) -------------

def range_masked_fill(logits, row_starts, row_ends):
    pos = torch.arange(logits.shape[-1], device=logits.device)
    keep = (pos[None, :] >= row_starts[:, None]) & (pos[None, :] < row_ends[:, None])
    return torch.topk(logits.masked_fill(~keep, NEG_INF), min(K, logits.shape[-1]))


def range_where_unsorted(logits, row_starts, row_ends):
    pos = torch.arange(logits.shape[-1], device=logits.device)
    keep = (pos >= row_starts.unsqueeze(-1)) & (pos < row_ends.unsqueeze(-1))
    return torch.where(keep, logits, NEG_INF).topk(min(K, logits.shape[-1]), sorted=False).indices


def causal_int32(logits, row_starts, row_ends):
    pos = torch.arange(logits.shape[-1], device=logits.device)
    masked = logits.masked_fill(~(pos.unsqueeze(0) < row_ends.unsqueeze(1)), NEG_INF)
    return masked.topk(min(K, masked.shape[-1]), dim=-1).indices.to(torch.int32)


def transformers_bool_mask(index_scores, attention_mask):
    # transformers DeepseekV32Indexer.forward, bool branch
    index_scores = index_scores.masked_fill(~attention_mask, NEG_INF)
    topk = min(K, index_scores.shape[-1])
    return index_scores.topk(topk, dim=-1).indices.to(torch.int32)


def drop_mask_values(logits, drop):
    return logits.masked_fill(drop, NEG_INF).topk(min(K, logits.shape[-1]))[0]


def transformers_additive(index_scores, attention_mask):
    # transformers DeepseekV32Indexer.forward, additive branch
    index_scores = index_scores + attention_mask
    topk = min(K, index_scores.shape[-1])
    return index_scores.topk(topk, dim=-1).indices.to(torch.int32)


def v4_causal_drop(logits, row_starts, row_ends):
    # DeepSeek-V4's indexer (transformers DeepseekV4Indexer): the dropped positions, arange viewed [1, N]
    future = torch.arange(logits.shape[-1], device=logits.device).view(1, -1) >= row_ends.unsqueeze(-1)
    return logits.masked_fill(future, NEG_INF).topk(min(K, logits.shape[-1]), dim=-1).indices


def range_drop_values(logits, row_starts, row_ends):
    pos = torch.arange(logits.shape[-1], device=logits.device)
    drop = (pos < row_starts[:, None]) | (pos >= row_ends[:, None])
    return torch.topk(logits.masked_fill(drop, NEG_INF), min(K, logits.shape[-1]))


def _masked(fn, args):
    """The tensor eager runs topk on, for the equivalence check."""
    if fn in (range_masked_fill, range_where_unsorted, causal_int32, v4_causal_drop, range_drop_values):
        logits, s, e = args
        pos = torch.arange(logits.shape[-1], device=logits.device)
        keep = pos < e[:, None]
        if fn not in (causal_int32, v4_causal_drop):
            keep = keep & (pos >= s[:, None])
        return logits.masked_fill(~keep, NEG_INF)
    if fn is transformers_bool_mask:
        return args[0].masked_fill(~args[1], NEG_INF)
    if fn is drop_mask_values:
        return args[0].masked_fill(args[1], NEG_INF)
    return args[0] + args[1]


CASES = {  # fn -> (expected variant prefix, sorted?, values?, inputs kind)
    range_masked_fill: ("range:sorted:values_indices", True, True, "range"),
    range_where_unsorted: ("range_where:unsorted:indices", False, False, "range"),
    causal_int32: ("causal:sorted:indices_int32", True, False, "range"),
    v4_causal_drop: ("causal_drop:sorted:indices", True, False, "range"),
    range_drop_values: ("range_drop:sorted:values_indices", True, True, "range"),
    transformers_bool_mask: ("keep_mask:sorted:indices_int32", True, False, "mask3d"),
    drop_mask_values: ("drop_mask:sorted:values", True, True, "mask"),
    transformers_additive: ("additive:sorted:indices_int32", True, False, "additive"),
}


@st.composite
def inputs(draw, kind, dtype, device, index_dtype):
    rows = draw(st.integers(2, 9))
    n = draw(st.integers(2, 80))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(rows, n, generator=g)
    if draw(st.booleans()):
        x = x.round()  # ties
    x = x.to(dtype)
    if kind == "range":
        s = torch.randint(-2, n + 2, (rows,), generator=g)
        e = torch.randint(-2, n + 2, (rows,), generator=g)
        if draw(st.booleans()):
            e[0] = s[0]  # an empty row
        return x.to(device), s.to(index_dtype).to(device), e.to(index_dtype).to(device)
    if kind == "mask3d":
        b = draw(st.integers(2, 3))
        x = torch.randn(b, rows, n, generator=g).to(dtype)
        mask = torch.rand(b, rows, n, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.9]))
        return x.to(device), mask.to(device)
    if kind == "mask":
        return x.to(device), (torch.rand(rows, n, generator=g) < 0.4).to(device)
    fill = draw(st.sampled_from([NEG_INF, torch.finfo(dtype).min]))
    bias = torch.where(torch.rand(rows, n, generator=g) < 0.5, 0.0, fill).to(dtype)
    return x.to(device), bias.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn", list(CASES), ids=lambda f: f.__name__)
def test_compiled_equals_eager(fresh, fn, dtype, device):
    variant, sorted_, has_values, kind = CASES[fn]
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    index_dtype = torch.int32 if dtype == torch.float16 else torch.int64  # both bound dtypes covered

    @settings(max_examples=50)
    @given(inputs(kind, dtype, device, index_dtype))
    def check(args):
        with torch.no_grad():
            out = compiled(*args)
            eager = fn(*args)
        masked = _masked(fn, args)
        if isinstance(out, tuple):
            values, indices = out
        elif has_values:
            values, indices = out, _indices_of(masked, out)
        else:
            values, indices = None, out
        k = min(K, masked.shape[-1])
        assert topk_mismatch(masked, k, values, indices, sorted_, values is not None) is None
        if sorted_ and values is not None:
            ref = eager[0] if isinstance(eager, tuple) else eager
            testing.assert_exact(values, ref)

    check()
    assert matches().get(variant, 0) >= 1, matches()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # static, then dynamic


def _indices_of(masked, values):
    """For a values-only output: positions holding those values (any, one per value) -- via topk itself."""
    return torch.topk(masked, values.shape[-1]).indices


def test_fused_op_in_generated_code(fresh):
    x = torch.randn(16, 40)
    s = torch.zeros(16, dtype=torch.int64)
    e = torch.randint(1, 41, (16,))
    _, code = run_and_get_code(torch.compile(range_masked_fill), x, s, e)
    assert "dsa_inductor.masked_topk" in "\n".join(code)
    assert "range:sorted:values_indices" in fresh.report()


# ---- near misses: no rule may rewrite these ----------------------------------------------------------------

def nm_largest_false(logits, s, e):
    pos = torch.arange(logits.shape[-1])
    keep = (pos >= s[:, None]) & (pos < e[:, None])
    return logits.masked_fill(~keep, NEG_INF).topk(4, largest=False).indices


def nm_other_dim(logits, s, e):
    pos = torch.arange(logits.shape[-1])
    keep = (pos >= s[:, None]) & (pos < e[:, None])
    return logits.masked_fill(~keep, NEG_INF).topk(4, dim=0).indices


def nm_le_bound(logits, s, e):
    pos = torch.arange(logits.shape[-1])
    keep = (pos >= s[:, None]) & (pos <= e[:, None])  # the range form takes `<`
    return logits.masked_fill(~keep, NEG_INF).topk(4).indices


def nm_offset_arange(logits, s, e):
    pos = torch.arange(1, logits.shape[-1] + 1)
    keep = (pos >= s[:, None]) & (pos < e[:, None])
    return logits.masked_fill(~keep, NEG_INF).topk(4).indices


def nm_reused_masked_logits(logits, s, e):
    pos = torch.arange(logits.shape[-1])
    masked = logits.masked_fill(~((pos >= s[:, None]) & (pos < e[:, None])), NEG_INF)
    return masked.topk(4).indices, masked.softmax(-1)


def nm_unmasked(logits, s, e):
    return logits.topk(4).indices


def nm_masked_after_topk(logits, s, e):
    v, i = logits.topk(4)
    return v.masked_fill(i >= e[:, None], NEG_INF)


def nm_drop_gt_bound(logits, s, e):
    drop = torch.arange(logits.shape[-1]) > e[:, None]  # the drop forms take `>=`: this keeps position e too
    return logits.masked_fill(drop, NEG_INF).topk(4).indices


def nm_drop_and(logits, s, e):
    pos = torch.arange(logits.shape[-1])
    drop = (pos < s[:, None]) & (pos >= e[:, None])  # `&`: drops nothing of a non-empty range
    return logits.masked_fill(drop, NEG_INF).topk(4).indices


NEAR_MISSES = [nm_largest_false, nm_other_dim, nm_le_bound, nm_offset_arange, nm_reused_masked_logits,
               nm_unmasked, nm_masked_after_topk, nm_drop_gt_bound, nm_drop_and]


@pytest.mark.parametrize("fn", NEAR_MISSES, ids=lambda f: f.__name__)
def test_near_miss_not_rewritten(fresh, fn):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 30, generator=g)
    s = torch.randint(0, 10, (12,), generator=g)
    e = s + torch.randint(4, 20, (12,), generator=g)
    with torch.no_grad():
        out = torch.compile(fn)(x, s, e)
        ref = fn(x, s, e)
    assert matches() == {}, matches()
    torch.testing.assert_close(out, ref)
    from dsa_inductor.report import _STATS

    assert sum(_STATS["mask_topk"].rejections.values()) >= 1  # seen, and the reason recorded


def scatter_selection(index_scores, attention_mask):
    # transformers DeepseekV32Attention: indexer top-k turned into a mask with scatter(False)
    topk = index_scores.masked_fill(~attention_mask, NEG_INF).topk(min(K, index_scores.shape[-1])).indices
    topk = topk.to(torch.int32)
    return torch.ones_like(attention_mask).scatter(-1, topk.long(), False)


def scatter_but_order_returned(index_scores, attention_mask):
    topk = index_scores.masked_fill(~attention_mask, NEG_INF).topk(min(K, index_scores.shape[-1])).indices
    return torch.ones_like(attention_mask).scatter(-1, topk, False), topk  # order observable


def v4_block_bias(index_scores, attention_mask):
    # DeepSeek-V4's CSA compressor: picks past each row's end become -1, then T, then a 0 / -inf block bias
    b, s, t = index_scores.shape
    ends = attention_mask.sum(-1)  # [B, S] per-row ends
    future = torch.arange(t).view(1, 1, -1) >= ends.unsqueeze(-1)
    idx = index_scores.masked_fill(future, NEG_INF).topk(min(K, t)).indices
    idx = torch.where(idx >= ends.unsqueeze(-1), torch.full_like(idx, -1), idx)
    safe = torch.where(idx >= 0, idx, torch.full_like(idx, t))
    bias = index_scores.new_full((b, 1, s, t + 1), NEG_INF)
    bias.scatter_(-1, safe.unsqueeze(1), 0.0)
    return bias[..., :t]


def v4_but_order_returned(index_scores, attention_mask):
    ends = attention_mask.sum(-1)
    future = torch.arange(index_scores.shape[-1]).view(1, 1, -1) >= ends.unsqueeze(-1)
    idx = index_scores.masked_fill(future, NEG_INF).topk(min(K, index_scores.shape[-1])).indices
    return torch.where(idx >= ends.unsqueeze(-1), torch.full_like(idx, -1), idx)  # order observable


def v4_but_broadcast_along_k(index_scores, attention_mask):
    # the picks compared with a per-position tensor: position j's result depends on j, order observable
    ends = attention_mask.sum(-1)
    future = torch.arange(index_scores.shape[-1]).view(1, 1, -1) >= ends.unsqueeze(-1)
    idx = index_scores.masked_fill(future, NEG_INF).topk(min(K, index_scores.shape[-1])).indices
    idx = torch.where(idx >= torch.arange(idx.shape[-1]), idx, torch.full_like(idx, 0))
    return index_scores.new_zeros(index_scores.shape).scatter(-1, idx, 1.0)


@pytest.mark.parametrize("fn,relaxed", [(scatter_selection, True), (scatter_but_order_returned, False),
                                        (v4_block_bias, True), (v4_but_order_returned, False),
                                        (v4_but_broadcast_along_k, False)])
def test_sorted_relaxed_only_when_order_unobservable(fresh, fn, relaxed):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 30, generator=g)
    m = torch.rand(2, 6, 30, generator=g) > 0.3
    _, code = run_and_get_code(torch.compile(fn), x, m)
    with torch.no_grad():
        out, ref = torch.compile(fn)(x, m), fn(x, m)
    torch.testing.assert_close(out, ref)
    assert any(v.startswith(("keep_mask:sorted", "causal_drop:sorted")) for v in matches()), matches()
    from dsa_inductor.report import _STATS

    assert bool(_STATS["mask_topk"].notes) == relaxed, _STATS["mask_topk"].notes
    assert ("sorted -> unsorted" in fresh.report()) == relaxed


def iota_causal_mask(index_scores, past):
    # transformers' sdpa mask: kv_idx <= q_idx (+ past), expanded over batch and heads, head 0 selected
    b, s, t = index_scores.shape
    q_idx = torch.arange(s, device=index_scores.device) + past
    kv_idx = torch.arange(t, device=index_scores.device)
    mask = (kv_idx[None, None, None, :] <= q_idx[None, None, :, None]).expand(b, 1, s, t)[:, 0]
    return index_scores.masked_fill(~mask, NEG_INF).topk(min(K, t)).indices


def iota_causal_strict_ge(index_scores, past):
    b, s, t = index_scores.shape
    q_idx = torch.arange(s, device=index_scores.device) + past
    kv_idx = torch.arange(t, device=index_scores.device) + 1
    mask = q_idx[:, None] > kv_idx[None, :]  # kv + 1 < q + past  (strict, offset arange)
    return torch.where(mask, index_scores, NEG_INF).topk(min(K, t), sorted=False).indices


@pytest.mark.parametrize("fn", [iota_causal_mask, iota_causal_strict_ge], ids=lambda f: f.__name__)
def test_arange_comparison_mask_becomes_row_ends(fresh, fn):
    from dsa_inductor.report import _STATS

    compiled = torch.compile(fn, dynamic=True)
    for s, t, past in [(5, 9, 4), (12, 12, 0), (7, 30, 23), (16, 20, 4)]:
        x = torch.randn(2, s, t)
        x[:, :, ::3] = 0.0  # ties
        with torch.no_grad():
            out = compiled(x, past)
        q = torch.arange(s)[:, None] + past
        kv = torch.arange(t)[None, :]
        keep = kv <= q if fn is iota_causal_mask else kv + 1 < q
        masked = x.masked_fill(~keep, NEG_INF)
        assert topk_mismatch(masked, min(K, t), None, out, fn is iota_causal_mask, False) is None
    assert any("row_ends" in n for n in _STATS["mask_topk"].notes), _STATS["mask_topk"].notes


def _comparison_mask_fn(op_name, kv_left, kv_offset):
    """keep[b, s, t] = (t + kv_offset) OP (s + past), spelled with the kv side left or right."""
    op = getattr(torch, op_name)

    def fn(index_scores, past):
        b, s, t = index_scores.shape
        q = (torch.arange(s, device=index_scores.device) + past)[:, None]
        kv = (torch.arange(t, device=index_scores.device) + kv_offset)[None, :]
        keep = op(kv, q) if kv_left else op(q, kv)
        return index_scores.masked_fill(~keep, NEG_INF).topk(min(K, t), sorted=False).indices

    fn.__name__ = f"{op_name}_{'kv_left' if kv_left else 'kv_right'}_{kv_offset}"
    return fn


@pytest.mark.parametrize("op_name,kv_left", [("le", True), ("lt", True), ("ge", False), ("gt", False),
                                             ("ge", True), ("lt", False)])
def test_comparison_masks_equal_eager(fresh, op_name, kv_left):
    """Every arange comparison form, converted to row_ends or left as a mask, gives eager's selection."""
    fn = _comparison_mask_fn(op_name, kv_left, kv_offset=1)
    compiled = torch.compile(fn, dynamic=True)

    @settings(max_examples=25)
    @given(st.integers(2, 12), st.integers(2, 40), st.integers(0, 30), st.integers(0, 2**31 - 1))
    def check(s, t, past, seed):
        x = torch.randn(2, s, t, generator=torch.Generator().manual_seed(seed)).round()  # ties
        with torch.no_grad():
            out = compiled(x, past)
        q = torch.arange(s)[:, None] + past
        kv = torch.arange(t)[None, :] + 1
        keep = getattr(torch, op_name)(kv, q) if kv_left else getattr(torch, op_name)(q, kv)
        assert topk_mismatch(x.masked_fill(~keep, NEG_INF), min(K, t), None, out, False, False) is None

    check()
    from dsa_inductor.report import _STATS

    upper = (op_name, kv_left) in {("le", True), ("lt", True), ("ge", False), ("gt", False)}
    notes = " ".join(_STATS["mask_topk"].notes)
    assert ("bool mask -> row_ends" in notes) == upper and ("bool mask -> row_starts" in notes) != upper, notes


def window_mask(index_scores, past, window: int = 3):
    # a sliding window of `window` keys ending at the query's position: (kv > q - window) & (kv <= q)
    b, s, t = index_scores.shape
    q = (torch.arange(s) + past)[:, None]
    kv = torch.arange(t)[None, :]
    keep = (kv > q - window) & (kv <= q)
    return index_scores.masked_fill(~keep, NEG_INF).topk(min(K, t)).indices


def test_window_mask_becomes_row_starts_and_ends(fresh):
    from dsa_inductor.report import _STATS

    compiled = torch.compile(window_mask, dynamic=True)
    for s, t, past in [(4, 9, 2), (10, 30, 15), (6, 6, 0)]:
        x = torch.randn(2, s, t)
        with torch.no_grad():
            out = compiled(x, past)
        q = torch.arange(s)[:, None] + past
        kv = torch.arange(t)[None, :]
        masked = x.masked_fill(~((kv > q - 3) & (kv <= q)), NEG_INF)
        assert topk_mismatch(masked, min(K, t), None, out, True, False) is None
    assert any("row_ends and row_starts" in n for n in _STATS["mask_topk"].notes), _STATS["mask_topk"].notes


def low_rank_bound(index_scores, past):
    # the comparison's result is [1, S, T] but its per-row side only [S, 1]; a select then drops dim 0
    s, t = index_scores.shape
    q = (torch.arange(s) + past)[:, None]
    kv = torch.arange(t)[None, None, :]
    keep = (kv <= q)[0]
    return index_scores.masked_fill(~keep, NEG_INF).topk(min(K, t), sorted=False).indices


def test_bound_conversion_aligns_rank_of_per_row_side(fresh):
    from dsa_inductor.report import _STATS

    compiled = torch.compile(low_rank_bound, dynamic=True)
    for s, t, past in [(6, 10, 2), (9, 30, 0)]:
        x = torch.randn(s, t)
        with torch.no_grad():
            out = compiled(x, past)
        keep = torch.arange(t)[None, :] <= torch.arange(s)[:, None] + past
        assert topk_mismatch(x.masked_fill(~keep, NEG_INF), min(K, t), None, out, False, False) is None
    assert any("row_ends" in n for n in _STATS["mask_topk"].notes), _STATS["mask_topk"].notes
