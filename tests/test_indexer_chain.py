"""The lightning-indexer chain under torch.compile: index score -> range mask -> top-k.

When the fused top-k (``masked_topk`` with row bounds) is the index score's only user, the score gets the
bounds (``outside_undefined=True``): out-of-range key tiles are skipped and, when the top-k writes no
values, rows of at most k in-range positions are not scored at all.  With ``k == T`` (a short prefill,
``min(index_topk, T) == T``) a top-k that is only scattered into a mask becomes a constant fill and the
indexer is dead code.  Each function is compiled once with dynamic shapes and fed hypothesis examples;
the selected sets are checked against eager (same multiset of values, valid distinct indices).

Negative tests: scores with a second user keep ``-inf``-defined entries everywhere (no bounds passed).
"""

import collections

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICES, matches
from dsa_inductor.lowerings.masked_topk import topk_mismatch

NEG_INF = float("-inf")
K = 6
SCALE = 0.25


def _scores(q, k, w):
    # transformers' DeepseekV32Indexer spelling
    s = F.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * 0.25)
    return torch.matmul(w.unsqueeze(-2), s).squeeze(-2)


def _keep(t, starts, ends, device):
    pos = torch.arange(t, device=device)
    return (pos >= starts.unsqueeze(-1)) & (pos < ends.unsqueeze(-1))


# ---- user code ----------------------------------------------------------------------------------------------

def range_topk_scattered(q, k, w, starts, ends):
    """Indices only scattered (order unobservable): bounds and the short-row skip."""
    scores = _scores(q, k, w).masked_fill(~_keep(k.shape[1], starts, ends, q.device), NEG_INF)
    idx = scores.topk(K, dim=-1).indices
    return torch.ones(scores.shape, dtype=torch.bool, device=q.device).scatter(-1, idx, False)


def causal_topk_sorted_indices(q, k, w, starts, ends):
    """Sorted indices returned: bounds (tile skip), no short-row skip (the sort reads the values)."""
    pos = torch.arange(k.shape[1], device=q.device)
    scores = _scores(q, k, w).masked_fill(~(pos < ends.unsqueeze(-1)), NEG_INF)
    return scores.topk(K, dim=-1).indices.to(torch.int32)


def bool_mask_from_arange(q, k, w, starts, ends):
    """transformers' form: a bool causal mask built from aranges (mask -> bounds follow-up, then the chain)."""
    t = k.shape[1]
    kv = torch.arange(t, device=q.device)
    qpos = torch.arange(q.shape[1], device=q.device) + (t - q.shape[1])
    b, s = q.shape[:2]
    mask = (kv[None, None, None, :] <= qpos[None, None, :, None]).expand(b, 1, s, t)[:, 0]
    scores = _scores(q, k, w).masked_fill(~mask, NEG_INF)
    idx = scores.topk(K, dim=-1).indices.to(torch.int32)
    return torch.ones(scores.shape, dtype=torch.bool, device=q.device).scatter(-1, idx.long(), False)


CASES = {  # fn -> (short rows skipped?, mask kind)
    range_topk_scattered: (True, "range"),
    causal_topk_sorted_indices: (False, "ends"),
    bool_mask_from_arange: (True, "causal"),
}


def _eager_masked(fn, q, k, w, starts, ends):
    t, s = k.shape[1], q.shape[1]
    if fn is bool_mask_from_arange:
        ends = (torch.arange(s, device=q.device) + (t - s) + 1).expand(q.shape[0], s)
        starts = torch.zeros_like(ends)
    elif fn is causal_topk_sorted_indices:
        starts = torch.zeros_like(ends)
    return _scores(q, k, w).masked_fill(~_keep(t, starts, ends, q.device), NEG_INF)


@st.composite
def inputs(draw, device, dtype=torch.float32):
    b = draw(st.integers(1, 2))
    t = draw(st.integers(K, 24))
    s = draw(st.integers(2, t))  # queries are the last s of t tokens (a prefill chunk)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(b, s, 3, 16, generator=g).to(dtype)
    k = torch.randn(b, t, 16, generator=g).to(dtype)
    w = torch.randn(b, s, 3, generator=g)
    ends = (torch.arange(s) + (t - s) + 1).expand(b, s).clone()
    starts = torch.zeros(b, s, dtype=torch.long)
    if draw(st.booleans()):  # sliding windows / random ranges: some rows short, some empty
        starts = torch.randint(-2, t, (b, s), generator=g)
        ends = torch.minimum(ends, starts + torch.randint(0, t + 2, (b, s), generator=g))
    return tuple(x.to(device) for x in (q, k, w, starts, ends))


def _notes():
    from dsa_inductor.report import _STATS

    total = collections.Counter()
    for st_ in _STATS.values():
        total.update(st_.notes)
    return total


class _ScoreCalls:
    """Record the index_score nodes' arguments of every post-grad graph (after our pre pass)."""

    def __init__(self):
        self.calls = []

    def __call__(self, graph):
        for n in graph.nodes:
            if n.target is torch.ops.dsa_inductor.index_score.default:
                self.calls.append(list(n.args) + [None, -1, False][len(n.args) - 6:])


def _indices_of(fn, out):
    if fn is causal_topk_sorted_indices:
        return out.long()
    # mask False at selected positions: recover a [.., K] index set
    return (~out).float().topk(K, dim=-1).indices


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", list(CASES), ids=lambda f: f.__name__)
def test_chain_compiled_equals_eager(fresh, fn, device):
    skip_short, _ = CASES[fn]
    calls = _ScoreCalls()
    with torch._inductor.config.patch(post_grad_custom_post_pass=calls):
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        torch._dynamo.utils.counters.clear()

        @settings(max_examples=10)
        @given(inputs(device))
        def check(args):
            with torch.no_grad():
                out = compiled(*args)
                eager = fn(*args)
            assert out.shape == eager.shape
            masked = _eager_masked(fn, *args)
            if fn is causal_topk_sorted_indices:
                assert topk_mismatch(masked, K, None, out.long(), sorted=False, need_values=False) is None
            else:
                # each row selects exactly K positions, a valid top-K of the masked scores
                assert torch.all((~out).sum(-1) == K)
                assert topk_mismatch(masked, K, None, _indices_of(fn, out), sorted=False,
                                     need_values=False) is None

        check()
    assert matches("index_score") and matches("mask_topk"), (matches("index_score"), matches("mask_topk"))
    assert calls.calls, "no index_score node in the compiled graphs"
    for args in calls.calls:
        assert args[8] is True, args  # outside_undefined: only the fused top-k reads the scores
        assert args[5] is not None, args  # row_ends
        assert (args[7] != -1) == skip_short, args
    key = "bounds passed to the score kernel"
    assert any(key in n for n in _notes()), _notes()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


# ---- negative tests: the scores have another user -----------------------------------------------------------

def scores_also_returned(q, k, w, starts, ends):
    scores = _scores(q, k, w).masked_fill(~_keep(k.shape[1], starts, ends, q.device), NEG_INF)
    idx = scores.topk(K, dim=-1).indices
    return torch.ones(scores.shape, dtype=torch.bool, device=q.device).scatter(-1, idx, False), scores


def raw_scores_also_used(q, k, w, starts, ends):
    raw = _scores(q, k, w)
    scores = raw.masked_fill(~_keep(k.shape[1], starts, ends, q.device), NEG_INF)
    return scores.topk(K, dim=-1).indices, raw.amax(-1)


@pytest.mark.parametrize("fn", [scores_also_returned, raw_scores_also_used], ids=lambda f: f.__name__)
def test_scores_with_a_second_user_get_no_bounds(fresh, fn):
    calls = _ScoreCalls()
    with torch._inductor.config.patch(post_grad_custom_post_pass=calls):
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)

        @settings(max_examples=6)
        @given(inputs("cpu"))
        def check(args):
            with torch.no_grad():
                out, extra = compiled(*args)
                e_out, e_extra = fn(*args)
            # the second user sees every entry defined, equal to eager (no NaN from undefined entries)
            torch.testing.assert_close(extra, e_extra, rtol=1e-5, atol=1e-5)
            assert not extra.isnan().any()

        check()
    assert calls.calls
    for args in calls.calls:
        assert args[8] is False and args[5] is None and args[7] == -1, args
    assert not any("bounds passed" in n for n in _notes()), _notes()


# ---- the short-sequence shortcut: k == T --------------------------------------------------------------------

def short_prefill_mask(q, k, w, starts, ends):
    """transformers' eager/sdpa path at T <= index_topk: topk(min(index_topk, T)) == topk(T), scattered."""
    t = k.shape[1]
    kv = torch.arange(t, device=q.device)
    qpos = torch.arange(q.shape[1], device=q.device) + (t - q.shape[1])
    b, s = q.shape[:2]
    causal = (kv[None, None, None, :] <= qpos[None, None, :, None]).expand(b, 1, s, t)[:, 0]
    scores = _scores(q, k, w).masked_fill(~causal, NEG_INF)
    idx = scores.topk(min(64, t), dim=-1).indices.to(torch.int32)
    index_mask = torch.ones(scores.shape, dtype=torch.bool, device=q.device).scatter(-1, idx.long(), False)
    return causal & ~index_mask


@pytest.mark.parametrize("device", DEVICES)
def test_short_prefill_drops_the_indexer(fresh, device):
    calls = _ScoreCalls()
    with torch._inductor.config.patch(post_grad_custom_post_pass=calls):
        compiled = torch.compile(short_prefill_mask, dynamic=True, fullgraph=True)

        @settings(max_examples=6)
        @given(inputs(device))
        def check(args):
            with torch.no_grad():
                assert torch.equal(compiled(*args), short_prefill_mask(*args))

        check()
    assert matches("mask_topk"), matches("mask_topk")
    assert calls.calls == [], "the index score should be dead code when k == T"
    assert any("scatter -> full" in n for n in _notes()), _notes()
