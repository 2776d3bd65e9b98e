"""Property suite: compiled == eager for every rule, on the inputs that break kernels.

For each rule, user functions written as model code writes them are compiled ONCE per input class with
``dynamic=True, fullgraph=True`` and fed hypothesis examples.  What cannot reach an already-compiled
function without a recompile gets its own class (compiled once, not per example):

* the dtype of the scores / cache (bf16, fp16, fp32) and of the index tensors (int32, int64): a dtype
  guard;
* the layout (contiguous, transposed, sliced): Dynamo guards on the stride order of each input;
* T = 0 and T = 1: Dynamo specializes sizes 0 and 1, so a class that draws them compiles at most three
  graphs (T >= 2 dynamic, T = 0, T = 1) and reuses each.

Inside a class every example varies the dynamic sizes (batch >= 2, rows, T), and injects the edge values:
NaN, +inf and -inf scores, ties, rows with nothing kept (all masked), ``k > T`` (``topk(min(k, T))``),
negative / padding slots.  After each class: the number of graphs Inductor compiled is bounded, and the
rule matched in EVERY compiled graph (match count == graph count, counted with caches off by ``fresh``),
so an example that silently ran a graph without the fused op could not pass.

Comparisons go through ``dsa_inductor.testing`` (the per-dtype tolerances and the top-k multiset
contract).  ``EXAMPLES`` below are the examples per class; the sum per rule is >= 200 per CI run.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import matches
from dsa_inductor import testing
from dsa_inductor.lowerings.gather_dequant import quantize_e4m3

NEG_INF = float("-inf")
K = 8  # index_topk of the user code: T < K gives topk(min(K, T)) = topk(T), "k > N"
FP8 = torch.float8_e4m3fn
B_PAGE, D_HEAD = 4, 32  # page size and head dim of the paged cache (model constants)

RAN: dict = {}  # rule -> examples actually run in this session (checked per class below)


def _run_class(rule, fn, strategy, check, examples, max_graphs, unmatched=0, setup=contextlib.nullcontext,
               oracle=None):
    """Compile ``fn`` once, feed ``examples`` hypothesis examples, bound graphs, require a match per graph
    (but for ``unmatched`` graphs the rule is known to leave alone).  ``setup``: a context the compiled and
    the eager call need (the CPU stand-ins of CUDA's fused SDPA kernels).  ``oracle(fn)``: what the compiled
    function is compared with (default: ``fn`` itself, eager)."""
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    reference = oracle(fn) if oracle else fn
    torch._dynamo.utils.counters.clear()
    ran = [0]

    @settings(max_examples=examples)
    @given(strategy)
    def prop(args):
        with torch.no_grad(), setup():
            out = compiled(*args)
            ref = reference(*args)
        check(args, out, ref)
        ran[0] += 1

    prop()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= max_graphs, f"{graphs} graphs compiled, at most {max_graphs} expected"
    assert sum(matches(rule).values()) == graphs - unmatched, (matches(rule), graphs)  # fired in every graph
    assert ran[0] >= examples, ran[0]
    RAN[rule] = RAN.get(rule, 0) + ran[0]


def _seed(draw):
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


def _sizes(draw, edge_t):
    """(batch >= 2, rows >= 2, T): T in {0, 1} for an edge class (a third of the examples), else 2..40."""
    b, r = draw(st.integers(2, 3)), draw(st.integers(2, 6))
    t = draw(st.sampled_from([0, 1]) | st.integers(2, 40)) if edge_t else draw(st.integers(2, 40))
    return b, r, t


def _specials(draw, x, g):
    """Ties, and NaN / +inf / -inf at random places (each with some probability)."""
    if draw(st.booleans()):
        x = x.round()
    if x.numel() and draw(st.booleans()):
        flat = x.view(-1)
        n = draw(st.integers(1, 4))
        where = torch.randint(0, flat.numel(), (n,), generator=g)
        flat[where] = torch.tensor([float("nan"), float("inf"), NEG_INF, float("nan")][:n], dtype=x.dtype)
    return x


def _layout(x, layout):
    """The same values as ``x`` ([..., R, T]) in another memory layout: transposed or a strided slice."""
    if layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def _bounds(b, r, t, g, idt):
    """Per-row [ks, ke) with out-of-range bounds and empty rows (ks >= ke: everything masked)."""
    ks = torch.randint(-2, t + 3, (b, r), generator=g)
    ke = torch.randint(-2, t + 3, (b, r), generator=g)
    ke[0, 0] = ks[0, 0]  # an all-masked row in every example
    return ks.to(idt), ke.to(idt)


# ================================================================================================ mask_topk

def topk_range(logits, ks, ke):
    # DSA indexer prefill: keep [ks, ke) per query row, values and indices, sorted
    pos = torch.arange(logits.shape[-1], device=logits.device)
    keep = (pos >= ks[..., None]) & (pos < ke[..., None])
    return torch.topk(logits.masked_fill(~keep, NEG_INF), min(K, logits.shape[-1]))


def topk_keep_mask_int32(index_scores, attention_mask):
    # transformers DeepseekV32Indexer.forward, bool branch
    index_scores = index_scores.masked_fill(~attention_mask, NEG_INF)
    return index_scores.topk(min(K, index_scores.shape[-1]), dim=-1).indices.to(torch.int32)


def topk_additive_unsorted(index_scores, bias):
    # additive 0 / -inf mask, order of the selection unused
    return (index_scores + bias).topk(min(K, index_scores.shape[-1]), dim=-1, sorted=False).indices


def _topk_masked(fn, args):
    x = args[0]
    if fn is topk_range:
        pos = torch.arange(x.shape[-1])
        return x.masked_fill(~((pos >= args[1][..., None]) & (pos < args[2][..., None])), NEG_INF)
    if fn is topk_keep_mask_int32:
        return x.masked_fill(~args[1], NEG_INF)
    return x + args[1]


@st.composite
def topk_inputs(draw, fn, dtype, idt, layout, edge_t):
    g = _seed(draw)
    b, r, t = _sizes(draw, edge_t)
    x = _layout(_specials(draw, torch.randn(b, r, t, generator=g).to(dtype), g), layout)
    if fn is topk_range:
        return (x, *_bounds(b, r, t, g, idt))
    if fn is topk_keep_mask_int32:
        keep = torch.rand(b, r, t, generator=g) < draw(st.sampled_from([0.1, 0.5, 0.9]))
        keep[0, 0] = False  # all masked
        return x, keep
    fill = draw(st.sampled_from([NEG_INF, torch.finfo(dtype).min]))
    bias = torch.where(torch.rand(b, r, t, generator=g) < 0.5, 0.0, fill).to(dtype)
    bias[0, 0] = fill
    return x, bias


def _topk_check(fn):
    def check(args, out, ref):
        masked = _topk_masked(fn, args)
        k = min(K, masked.shape[-1])
        if fn is topk_range:
            testing.assert_topk(masked, k, out.values, out.indices, sorted=True)
            testing.assert_exact(out.values, ref.values, "sorted values")
        else:
            assert out.dtype == ref.dtype
            testing.assert_topk(masked, k, None, out, sorted=fn is topk_keep_mask_int32, need_values=False)

    return check


TOPK_CLASSES = {  # id -> (fn, dtype, index dtype, layout, T in {0, 1} too, examples, max graphs)
    "range-fp32-int64-contiguous-T01": (topk_range, torch.float32, torch.int64, "contiguous", True, 90, 3),
    "range-fp16-int32-sliced": (topk_range, torch.float16, torch.int32, "sliced", False, 40, 1),
    "keep_mask-bf16-transposed": (topk_keep_mask_int32, torch.bfloat16, None, "transposed", False, 40, 1),
    "additive-fp32-contiguous": (topk_additive_unsorted, torch.float32, None, "contiguous", False, 40, 1),
}


@pytest.mark.parametrize("cls", list(TOPK_CLASSES))
def test_mask_topk_properties(fresh, cls):
    fn, dtype, idt, layout, edge_t, n, graphs = TOPK_CLASSES[cls]
    _run_class("mask_topk", fn, topk_inputs(fn, dtype, idt, layout, edge_t), _topk_check(fn), n, graphs)


# ========================================================================================= windowed_softmax

def softmax_range(scores, ks, ke):
    pos = torch.arange(scores.shape[-1], device=scores.device)
    keep = (pos >= ks[..., None]) & (pos < ke[..., None])
    return scores.masked_fill(~keep, NEG_INF).softmax(dim=-1)


def softmax_causal_where_float(scores, ks, ke):
    pos = torch.arange(scores.shape[-1], device=scores.device)
    return torch.softmax(torch.where(pos < ke[..., None], scores, NEG_INF).float(), dim=-1)


def softmax_sliding_window(scores):
    # [B, R, T] scores; the R queries are the last R of T positions, each sees the last 4 keys
    s, t = scores.shape[-2], scores.shape[-1]
    q = torch.arange(s, device=scores.device) + (t - s)
    kv = torch.arange(t, device=scores.device)
    keep = (kv[None, :] > q[:, None] - 4) & (kv[None, :] <= q[:, None])
    return torch.softmax(scores.masked_fill(~keep, NEG_INF), dim=-1, dtype=torch.float32)


def _softmax_keep(fn, args):
    x = args[0]
    t = x.shape[-1]
    pos = torch.arange(t)
    if fn is softmax_range:
        return (pos >= args[1][..., None]) & (pos < args[2][..., None])
    if fn is softmax_causal_where_float:
        return pos < args[2][..., None]
    q = torch.arange(x.shape[-2]) + (t - x.shape[-2])
    return (pos[None, :] > q[:, None] - 4) & (pos[None, :] <= q[:, None])


@st.composite
def softmax_inputs(draw, fn, dtype, idt, layout, edge_t):
    g = _seed(draw)
    b, r, t = _sizes(draw, edge_t)
    if fn is softmax_sliding_window:
        r = draw(st.integers(2, max(2, t)))  # queries are the last r of t positions
    x = _layout(_specials(draw, (torch.randn(b, r, t, generator=g) * 4).to(dtype), g), layout)
    if fn is softmax_sliding_window:
        return (x,)
    return (x, *_bounds(b, r, t, g, idt))


def _softmax_check(fn):
    def check(args, out, ref):
        testing.assert_softmax(ref, out, _softmax_keep(fn, args))

    return check


SOFTMAX_CLASSES = {
    "range-fp32-int64-contiguous-T01": (softmax_range, torch.float32, torch.int64, "contiguous", True, 90, 3),
    "causal_where_float-bf16-int32-transposed": (softmax_causal_where_float, torch.bfloat16, torch.int32,
                                                 "transposed", False, 40, 1),
    "range-fp16-int32-sliced": (softmax_range, torch.float16, torch.int32, "sliced", False, 40, 1),
    "sliding_window-fp32-transposed": (softmax_sliding_window, torch.float32, None, "transposed", False, 40, 1),
}


@pytest.mark.parametrize("cls", list(SOFTMAX_CLASSES))
def test_windowed_softmax_properties(fresh, cls):
    fn, dtype, idt, layout, edge_t, n, graphs = SOFTMAX_CLASSES[cls]
    # T = 0: the post-grad graph of a softmax over an empty dim is not softmax's decomposition (the rule
    # reports "amax is not the max of a softmax" and leaves it to Inductor; there is nothing to compute).
    _run_class("windowed_softmax", fn, softmax_inputs(fn, dtype, idt, layout, edge_t), _softmax_check(fn), n,
               graphs, unmatched=1 if edge_t else 0)


# ============================================================================================== index_score

H, D_IDX = 3, 16  # indexer heads and head dim (model constants)


def index_matmul(q, k, weights):
    # transformers 5.23 DeepseekV32Indexer.forward
    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * 0.125
    scores = F.relu(scores)
    return torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)


def index_einsum(q, k, weights):
    scores = torch.einsum("bshd,btd->bsht", q.float(), k.float()).relu() * 0.5
    return (scores * weights[..., None]).sum(dim=-2)


@st.composite
def index_inputs(draw, dtype, layout, edge_t):
    g = _seed(draw)
    b, s, t = _sizes(draw, edge_t)
    q = _specials(draw, torch.randn(b, s, H, D_IDX, generator=g).to(dtype), g)
    k = _specials(draw, torch.randn(b, t, D_IDX, generator=g).to(dtype), g)
    w = _specials(draw, torch.randn(b, s, H, generator=g), g)
    if layout == "transposed":  # k stored [B, D, T] and q heads-major [B, H, S, D], both read transposed
        # (DeepSeek-V4's indexer q; the matmul then decomposes with a contiguity copy of q, which the rule
        # drops before matching: IndexScoreRule.apply)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":  # q and k are the first half of wider projections
        q = torch.cat([q, torch.zeros_like(q)], -1)[..., :D_IDX]
        k = torch.cat([k, torch.zeros_like(k)], -1)[..., :D_IDX]
    return q, k, w


def _index_check(scale):
    def check(args, out, ref):
        testing.assert_index_score(out, ref, *args, scale=scale)

    return check


INDEX_CLASSES = {
    "matmul-fp32-contiguous-T01": (index_matmul, 0.125, torch.float32, "contiguous", True, 90, 3),
    "matmul-bf16-transposed": (index_matmul, 0.125, torch.bfloat16, "transposed", False, 40, 1),
    "einsum-fp16-sliced": (index_einsum, 0.5, torch.float16, "sliced", False, 40, 1),
    "einsum-fp32-transposed": (index_einsum, 0.5, torch.float32, "transposed", False, 40, 1),
}


@pytest.mark.parametrize("cls", list(INDEX_CLASSES))
def test_index_score_properties(fresh, cls):
    fn, scale, dtype, layout, edge_t, n, graphs = INDEX_CLASSES[cls]
    # T = 1 (one key): Dynamo specializes the size and the matmul decomposes without the batched-matmul
    # form the variants have; the rule leaves that graph to Inductor (compiled == eager still checked).
    _run_class("index_score", fn, index_inputs(dtype, layout, edge_t), _index_check(scale), n, graphs,
               unmatched=1 if edge_t else 0)


def test_index_score_heads_major_q_matches(fresh):
    """q read transposed from [B, H, S, D] (DeepSeek-V4's indexer): its contiguity clone is dropped, the rule
    fires, and the result equals eager."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, H, 5, D_IDX, generator=g).transpose(1, 2)
    k, w = torch.randn(2, 7, D_IDX, generator=g), torch.randn(2, 5, H, generator=g)
    with torch.no_grad():
        out = torch.compile(index_matmul, dynamic=True)(q, k, w)
    testing.assert_index_score(out, index_matmul(q, k, w), q, k, w, scale=0.125)
    assert sum(matches("index_score").values()) == 1, fresh.report()


# =========================================================================================== gather_dequant

def gather_slots(k_cache, k_scale, slots):
    # DeepSeek-V3.2 reference style: FP8 bytes [N, D] + fp32 scale [N], padding slots -1, bf16 out
    idx = slots.clamp(min=0)
    k = k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)
    k = torch.where((slots < 0).unsqueeze(-1), 0.0, k)
    return k.to(torch.bfloat16)


def gather_paged(k_cache, k_scale, block_table, positions):
    # an FP8 cache [P, B, D] addressed through a block table, fp16 out
    page = block_table[positions // B_PAGE]
    pos = positions % B_PAGE
    return (k_cache[page, pos].float() * k_scale[page, pos].unsqueeze(-1)).to(torch.float16)


def gather_rows_fp32(k_cache, k_scale, idx):
    return k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)


def _nan_bytes(draw, q, g):
    """FP8 e4m3fn NaN bytes (0x7F / 0xFF) at random places, and inf / NaN scales."""
    if draw(st.booleans()):
        flat = q.view(-1)
        flat[torch.randint(0, flat.numel(), (3,), generator=g)] = torch.tensor([0x7F, 0xFF, 0x7F],
                                                                               dtype=torch.uint8)
    return q


@st.composite
def gather_inputs(draw, fn, idt, layout, edge_t):
    g = _seed(draw)
    n = draw(st.sampled_from([0, 1]) | st.integers(2, 40)) if edge_t else draw(st.integers(2, 40))
    p = draw(st.integers(2, 8))
    if fn is gather_paged:
        q, s = quantize_e4m3(torch.randn(p, B_PAGE, D_HEAD, generator=g))
        q = _nan_bytes(draw, q, g).view(FP8)
        s = s.squeeze(-1)
        table = torch.randperm(p, generator=g).to(idt)
        positions = torch.randint(0, p * B_PAGE, (n,), generator=g).to(idt)
        return q, s, table, positions
    q, s = quantize_e4m3(torch.randn(p * B_PAGE, D_HEAD, generator=g) * 4)
    q, s = _nan_bytes(draw, q, g), s.squeeze(-1)
    if draw(st.booleans()):
        s[torch.randint(0, s.numel(), (2,), generator=g)] = torch.tensor([float("inf"), float("nan")])
    lo = -1 if fn is gather_slots else 0
    slots = torch.randint(lo, p * B_PAGE, (n,), generator=g).to(idt)
    if layout == "sliced":  # the cache is the left half of wider rows; the scales a strided column
        q = torch.cat([q, torch.zeros_like(q)], -1)[:, :D_HEAD]
        s = torch.stack([s, torch.zeros_like(s)], -1)[:, 0]
        slots = torch.stack([slots, slots], -1)[:, 0]  # non-contiguous slot_mapping
    return q, s, slots


def _exact_check(args, out, ref):
    testing.assert_exact(out, ref)  # gather_dequant's and reroll's: the same values read and scaled, bit for bit


GATHER_CLASSES = {
    "slots-bf16out-int64-contiguous-T01": (gather_slots, torch.int64, "contiguous", True, 90, 3),
    "slots-bf16out-int32-sliced": (gather_slots, torch.int32, "sliced", False, 40, 1),
    "paged-fp16out-int32": (gather_paged, torch.int32, "contiguous", False, 40, 1),
    "rows-fp32out-int64-sliced": (gather_rows_fp32, torch.int64, "sliced", False, 40, 1),
}


@pytest.mark.parametrize("cls", list(GATHER_CLASSES))
def test_gather_dequant_properties(fresh, cls):
    fn, idt, layout, edge_t, n, graphs = GATHER_CLASSES[cls]
    _run_class("gather_dequant", fn, gather_inputs(fn, idt, layout, edge_t), _exact_check, n, graphs)


# ======================================================================================== sparse_attention

from test_sparse_attention_rule import (DQK as SA_DQK, H as SA_H, dense_mla_masked_fill,  # noqa: E402
                                        gather_einsum, gather_unbatched_sink_cat)


@st.composite
def sparse_inputs(draw, fn, dtype, idt, layout):
    """Top-k sets of any size (k from 2 to T), often reaching into the causal future; for gathers -1
    padding (some rows entirely), NaN / inf in q; batch 2..3, S and T dynamic."""
    g = _seed(draw)
    b, s, t = draw(st.integers(2, 3)), draw(st.integers(2, 8)), draw(st.integers(2, 24))
    s = min(s, t)
    k = draw(st.integers(2, t))  # (S = 1 and k = 1 would each add a graph that Dynamo specializes)
    idx = torch.rand(b, s, t, generator=g).argsort(-1)[..., :k]
    if fn is not dense_mla_masked_fill:
        idx = idx.masked_fill(torch.rand(b, s, k, generator=g) < draw(st.sampled_from([0.0, 0.3])), -1)
        idx[0, 0] = -1  # a query with no key: NaN as eager (or the sink alone)
    idx = idx.to(idt)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if fn is dense_mla_masked_fill:
        q = _specials(draw, rnd(b, SA_H, s, SA_DQK), g)
        if layout == "transposed":  # [B, S, H, D] storage, as a model's q.transpose(1, 2)
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
        return q, rnd(b, t, SA_DQK), idx
    if fn is gather_unbatched_sink_cat:
        q, sink = _specials(draw, rnd(s, SA_H, SA_DQK), g), (torch.randn(SA_H, generator=g) * 2).to(dtype)
        # The head count is a model constant (static in any real compile).  Left dynamic, with duck sizing off
        # (``fresh``), q's and the sink's head dims are two symbols the shape env merely proves equal, and the
        # rule's exact re-trace (one symbol for both) does not match that graph: a known gap.
        torch._dynamo.mark_static(q, 1)
        torch._dynamo.mark_static(sink, 0)
        return q, rnd(t, SA_DQK), idx[0], sink
    return _specials(draw, rnd(b, s, SA_H, SA_DQK), g), rnd(b, t, SA_DQK), idx


def _sparse_check(args, out, ref):
    testing.assert_attention(ref, out)


SPARSE_CLASSES = {  # id -> (fn, dtype, index dtype, layout, examples); at most 2 graphs for transposed
    "dense_mla-fp32-int32-contiguous": (dense_mla_masked_fill, torch.float32, torch.int32, "contiguous", 60),
    # (transposed: Dynamo's stride guards on the [B, S, H, D]-stored q compile a second graph)
    "dense_mla-bf16-int64-transposed": (dense_mla_masked_fill, torch.bfloat16, torch.int64, "transposed", 50),
    "gather-fp32-int64": (gather_einsum, torch.float32, torch.int64, "contiguous", 50),
    "gather_sink-bf16-int32": (gather_unbatched_sink_cat, torch.bfloat16, torch.int32, "contiguous", 50),
}


@pytest.mark.parametrize("cls", list(SPARSE_CLASSES))
def test_sparse_attention_properties(fresh, cls):
    fn, dtype, idt, layout, n = SPARSE_CLASSES[cls]
    _run_class("sparse_attention", fn, sparse_inputs(fn, dtype, idt, layout), _sparse_check, n,
               2 if layout == "transposed" else 1)


# ============================================================================================== causal_sdpa

def _causal_sdpa_user(fn):
    """q, k, v split from one fused projection ``x`` [B, H, S, 2 Dqk + Dv] (one length symbol: S == T)."""
    from test_causal_sdpa_rule import DQK

    def from_fused_projection(x):
        return fn(x[..., :DQK], x[..., DQK:2 * DQK], x[..., 2 * DQK:])

    return from_fused_projection


@st.composite
def causal_sdpa_inputs(draw, dtype, layout):
    """x with T in {0, 1} for a third of the examples, else 2..40; ties; whole NaN query rows (a NaN in the q of
    row i makes its kept logits NaN in both forms).  Non-finite logits at masked (future) positions are outside
    the contract (patterns/causal_sdpa.py: eager's additive mask turns them into NaN, is_causal never reads
    them), so k and v stay finite.  Layouts: contiguous, stored [B, S, H, E] (transposed), a strided slice."""
    from test_causal_sdpa_rule import DQK, DV, H

    g = _seed(draw)
    b, _, s = _sizes(draw, edge_t=True)
    e = 2 * DQK + DV
    x = torch.randn(b, s, H, e, generator=g)
    if draw(st.booleans()):
        x = x.round()
    if s and draw(st.booleans()):
        x[draw(st.integers(0, b - 1)), draw(st.integers(0, s - 1)), draw(st.integers(0, H - 1)), :DQK] = float("nan")
    x = x.to(dtype).transpose(1, 2)
    x = x.contiguous() if layout == "contiguous" else x if layout == "transposed" else _layout(x.contiguous(),
                                                                                                 "sliced")
    torch._dynamo.mark_static(x, 1)
    torch._dynamo.mark_static(x, 3)
    return (x,)


def _causal_sdpa_check(args, out, ref):
    outs, refs = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        testing.assert_attention(r, o)


def _causal_sdpa_classes():
    from test_causal_sdpa_rule import cudnn_short_prefill, efficient_older_spelling, efficient_short_prefill

    return {  # id -> (fn, dtype, layout, examples); graphs: T >= 2, T = 0, T = 1, one more for a strided layout
        "cudnn-bf16-contiguous": (cudnn_short_prefill, torch.bfloat16, "contiguous", 70),
        "efficient-fp32-transposed": (efficient_short_prefill, torch.float32, "transposed", 70),
        "efficient_lse-fp16-sliced": (efficient_older_spelling, torch.float16, "sliced", 60),
    }


@pytest.mark.parametrize("cls", list(_causal_sdpa_classes()))
def test_causal_sdpa_properties(fresh, cls):
    from sdpa_standin import fused_sdpa_on_cpu

    fn, dtype, layout, n = _causal_sdpa_classes()[cls]
    _run_class("causal_sdpa", _causal_sdpa_user(fn), causal_sdpa_inputs(dtype, layout), _causal_sdpa_check, n,
               3 if layout == "contiguous" else 4, setup=fused_sdpa_on_cpu)


# ====================================================================================== windowed_attention

from test_windowed_attention_rule import prefill_ks_ke, sliding_window_attention  # noqa: E402


@st.composite
def windowed_attention_inputs(draw, fn, dtype, idt, layout, edge_t):
    """``sliding_window_attention``: q [B, H, S, D] in the class's layout, k / v [B, H, T, *], a window of 1 to
    beyond T.  ``prefill_ks_ke``: 2-d q [S, D], k / v [T, *] and per-query ``[ks, ke)`` with out-of-range
    bounds and an empty row (NaN, as eager).  Ties, NaN and +/-inf in q and k (a NaN or inf key in a window
    turns its rows NaN, in eager too)."""
    g = _seed(draw)
    b, s, t = _sizes(draw, edge_t)
    d, dv = draw(st.integers(2, 16)), draw(st.integers(2, 12))

    def rand(*shape, special=True):
        x = torch.randn(*shape, generator=g).to(dtype)
        return _specials(draw, x, g) if special else x

    if fn is sliding_window_attention:
        h = draw(st.integers(2, 3))
        q = _layout(rand(b, h, s, d), layout)
        return q, rand(b, h, t, d), rand(b, h, t, dv, special=False), draw(st.integers(2, t + 3))
    ks = torch.randint(-2, t + 3, (s,), generator=g)
    ke = torch.randint(-2, t + 3, (s,), generator=g)
    ke[0] = ks[0]
    q = _layout(rand(s, d), layout)
    return q, rand(t, d), rand(t, dv, special=False), ks.to(idt), ke.to(idt)


def _windowed_attention_check(args, out, ref):
    why = testing.windowed_attention_mismatch(ref, out, args[0].dtype)
    assert why is None, why


WINDOWED_ATTENTION_CLASSES = {  # id -> (fn, dtype, index dtype, layout, T in {0, 1} too, examples, max graphs)
    "ks_ke-fp32-int64-contiguous-T01": (prefill_ks_ke, torch.float32, torch.int64, "contiguous", True, 90, 3),
    "ks_ke-bf16-int32-transposed": (prefill_ks_ke, torch.bfloat16, torch.int32, "transposed", False, 40, 1),
    "sliding-fp16-sliced": (sliding_window_attention, torch.float16, None, "sliced", False, 40, 1),
    "sliding-fp32-transposed": (sliding_window_attention, torch.float32, None, "transposed", False, 40, 1),
}


@pytest.mark.parametrize("cls", list(WINDOWED_ATTENTION_CLASSES))
def test_windowed_attention_properties(fresh, cls):
    fn, dtype, idt, layout, edge_t, n, graphs = WINDOWED_ATTENTION_CLASSES[cls]
    # T = 0 and T = 1: Dynamo specializes the size.  At T = 0 the softmax over no key is not softmax's
    # decomposition (windowed_softmax: "amax is not the max of a softmax"); at T = 1 the windowed softmax matches
    # but ``probs @ v`` over one key is a broadcast multiply, not a matmul (this rule: "the attention weights feed
    # aten.mul.Tensor").  Inductor computes those two graphs; compiled == eager is still checked.
    _run_class("windowed_attention", fn, windowed_attention_inputs(fn, dtype, idt, layout, edge_t),
               _windowed_attention_check, n, graphs, unmatched=2 if edge_t else 0)


# =================================================================================================== reroll

from test_reroll_rule import reroll_columns, reroll_stack, reroll_tuple_new_out  # noqa: E402


@st.composite
def reroll_inputs(draw, fn, dtype, layout, edge_t):
    """A cache [N, D] (N >= 20: the loops read constant slots up to 19; D in {0, 1} for an edge class) with
    ties, NaN and +/-inf, in the class's layout, and its per-slot scale [N, 1].  ``reroll_columns`` reads
    columns 0..6 of a [N, D >= 7] cache instead."""
    g = _seed(draw)
    if fn is reroll_columns:
        n, d = draw(st.integers(2, 40)), draw(st.integers(7, 40))
    else:
        n = draw(st.integers(20, 40))
        d = draw(st.sampled_from([0, 1]) | st.integers(2, 40)) if edge_t else draw(st.integers(2, 40))
    cache = _layout(_specials(draw, torch.randn(n, d, generator=g).to(dtype), g), layout)
    if fn is reroll_columns:
        return (cache,)
    return cache, _specials(draw, torch.randn(n, 1, generator=g).to(dtype), g)


def _stock_compiled(fn):
    """``fn`` compiled by stock torch.compile (dsa_inductor's post-grad pass out of its slot while it compiles).

    The oracle of the 16-bit reroll classes.  Inductor computes a 16-bit pointwise chain in fp32 and rounds only
    what it stores, so stock torch.compile differs from eager there already (bf16 ``(cache[s] * scale[s])``
    by one ulp of the product; ``cache[s] * scale[s] + 1.0`` in fp16 by 1% after the cancellation).  What the
    rule must not do is change what Inductor computes: the rerolled graph equals the stock one bit for bit.
    (With ``emulate_precision_casts`` torch 2.13 also rounds the chain where eager does, and the rerolled graph
    then equals eager: the rule carries Inductor's ``low_precision_pointwise_barrier`` marks.)"""
    def stock_fn(*args):  # another code object: Dynamo's cache on ``fn``'s own would serve the rule's graph
        return fn(*args)

    compiled = torch.compile(stock_fn, dynamic=True, fullgraph=True)

    def run(*args):
        with torch._inductor.config.patch(post_grad_custom_pre_pass=None):
            return compiled(*args)

    return run


REROLL_CLASSES = {  # id -> (fn, dtype, layout, D in {0, 1} too, examples, max graphs)
    "stack-fp32-contiguous-D01": (reroll_stack, torch.float32, "contiguous", True, 90, 3),
    "stack-bf16-transposed": (reroll_stack, torch.bfloat16, "transposed", False, 40, 1),
    "stack-fp16-sliced": (reroll_stack, torch.float16, "sliced", False, 40, 1),
    "tuple_new_out-fp32-sliced": (reroll_tuple_new_out, torch.float32, "sliced", False, 40, 1),
    # bf16 values written into the fp32 ``out``: functionalization's converting copy per write
    "tuple_new_out-bf16-transposed": (reroll_tuple_new_out, torch.bfloat16, "transposed", False, 40, 1),
    "columns-fp32-transposed": (reroll_columns, torch.float32, "transposed", False, 40, 1),
}


@pytest.mark.parametrize("cls", list(REROLL_CLASSES))
def test_reroll_properties(fresh, cls):
    fn, dtype, layout, edge_t, n, graphs = REROLL_CLASSES[cls]
    if dtype == torch.float32:  # eager is the oracle, bit for bit
        _run_class("reroll", fn, reroll_inputs(fn, dtype, layout, edge_t), _exact_check, n, graphs)
    else:  # the stock compile is (its graph is the one the rule leaves alone: one more graph, one unmatched)
        _run_class("reroll", fn, reroll_inputs(fn, dtype, layout, edge_t), _exact_check, n, graphs + 1,
                   unmatched=1, oracle=_stock_compiled)


# ======================================================================================== k > N without min

def test_topk_k_above_n_raises_like_eager(fresh):
    """``topk(k)`` with k > T is an error in eager; compiled (rule on) must raise too, not return padding."""
    def fixed_k(logits, ks, ke):
        pos = torch.arange(logits.shape[-1])
        keep = (pos >= ks[:, None]) & (pos < ke[:, None])
        return logits.masked_fill(~keep, NEG_INF).topk(K).indices

    x, ks, ke = torch.randn(4, 5), torch.zeros(4, dtype=torch.int64), torch.full((4,), 3)
    with pytest.raises(RuntimeError):
        fixed_k(x, ks, ke)
    with pytest.raises(Exception, match=r"(?i)k|range|selected"), torch.no_grad():
        torch.compile(fixed_k, fullgraph=True)(x, ks, ke)
