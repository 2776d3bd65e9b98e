"""Negative corpus: near-miss programs that no rule may rewrite (issue 6, bar 2).

One table, ``CORPUS``: each entry is a small eager function that looks like a DSA idiom but differs from it
in a way the fused op cannot express (another dim, fill, dtype, scale, index, an extra consumer ...), with
an example-input factory, the rule it nearly matches and why it must be left alone.  One parametrized test
compiles each entry once (static shapes, every rule registered, caches off) and asserts

* zero matches and zero follow-up rewrites across *all* rules (``dsa_inductor.report._STATS``, the numbers
  behind ``dsa_inductor.report()``), and no ``dsa_inductor`` op in the generated code; except, for an entry
  with ``allowed`` rules, that those may rewrite the part of the program that is theirs (``windowed_attention``
  near misses: ``windowed_softmax`` rightly fuses the softmax), and only the near-missed rule's op is absent;
* that the rule it nearly matches did examine it (a candidate, with a recorded rejection), where the
  program reaches that rule's anchor at all (``seen``), so the entry exercises the rule's checks;
* compiled output == eager (integer outputs exactly; floats within ``TOL`` by dtype, NaN where eager has NaN).

Entries marked "(was a bug)" were rewritten before this corpus existed: the rewrite crashed the compile or
changed the result; the rules' checks were fixed alongside.

``sparse_attention`` entries are near misses of the indexer-selected attention (transformers'
``DeepseekV32Attention``: the top-k indices scattered as ``False`` into an all-``True`` drop mask, then a
masked softmax): no rule rewrites that idiom yet, and these must stay unmatched once one does.

``FOLD_NEAR_MISSES`` (gather_dequant): programs whose core gather-dequant is rightly fused, but whose
padding-slot handling must not be folded into ``zero_negative`` (a clamp to another bound, another test).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from dsa_inductor.lowerings.gather_dequant import quantize_e4m3
from test_gather_dequant_rule import (nm_bf16_arithmetic, nm_e5m2, nm_not_gathered, nm_per_channel_scale,
                                      nm_scale_along_tokens, nm_scale_bytes_unaligned, nm_scale_other_index)
from test_index_score_rule import (nm_bf16_scores, nm_broadcast_weights, nm_gelu, nm_per_head_scale,
                                   nm_scores_reused, nm_sum_over_rows)
from test_mask_topk_rule import (nm_drop_and, nm_drop_gt_bound, nm_largest_false, nm_le_bound, nm_masked_after_topk,
                                 nm_other_dim, nm_reused_masked_logits, nm_unmasked)
from test_mask_topk_rule import nm_offset_arange as mt_nm_offset_arange
import test_windowed_attention_rule as wa
from test_windowed_softmax_rule import nm_finite_fill, nm_log_softmax, nm_materialized_mask
from test_windowed_softmax_rule import nm_offset_arange as ws_nm_offset_arange
from test_windowed_softmax_rule import nm_other_dim as ws_nm_other_dim
from test_windowed_softmax_rule import nm_reused_masked_scores

NEG_INF = float("-inf")
FP8 = torch.float8_e4m3fn
# Stock Inductor vs eager, by output dtype: fused reductions sum in another order, and bf16/fp16 arithmetic is
# done in fp32 and rounded once where eager rounds each op.  Integer outputs (indices) must be equal.
TOL = {torch.float64: (1e-7, 1e-7), torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 1e-5),
       torch.float16: (1e-3, 1e-5)}


# ---- example inputs (fixed seeds, small shapes) ----------------------------------------------------------------

def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rows():
    """logits / scores [12, 30] and per-row bounds [row_starts, row_ends) (int64)."""
    g = _gen()
    x = torch.randn(12, 30, generator=g)
    s = torch.randint(0, 10, (12,), generator=g)
    return x, s, s + torch.randint(4, 20, (12,), generator=g)


def square_rows():
    """Square scores [16, 16], so a window laid along the wrong dim still broadcasts."""
    g = _gen(1)
    x = torch.randn(16, 16, generator=g)
    s = torch.randint(0, 6, (16,), generator=g)
    return x, s, s + torch.randint(3, 9, (16,), generator=g)


def masked():
    """logits [8, 24] and a bool keep mask."""
    g = _gen(2)
    return torch.randn(8, 24, generator=g), torch.rand(8, 24, generator=g) > 0.3


def biased():
    """logits [8, 24] and a float tensor of the same shape (a bias / penalty)."""
    g = _gen(3)
    return torch.randn(8, 24, generator=g), torch.randn(8, 24, generator=g)


def int_biased():
    g = _gen(4)
    return torch.randn(8, 24, generator=g), torch.randint(-3, 3, (8, 24), generator=g)


def additive_masked():
    """scores [8, 24] and an additive 0 / -inf mask (every row keeps at least one position)."""
    g = _gen(5)
    x = torch.randn(8, 24, generator=g)
    bias = torch.where(torch.rand(8, 24, generator=g) < 0.5, 0.0, NEG_INF)
    bias[:, 0] = 0.0
    return x, bias


def scalar_bound():
    g = _gen(6)
    return torch.randn(8, 24, generator=g), torch.tensor(9)


def position_ids():
    """scores [8, 24], the kv positions (a permutation, not an arange) and the query positions."""
    g = _gen(7)
    return torch.randn(8, 24, generator=g), torch.randperm(24, generator=g), torch.arange(8) + 16


def indexer():
    """q [B, S, H, D], k [B, T, D], weights [B, S, H] (fp32), as the rule tests use."""
    g = _gen()
    return torch.randn(2, 6, 3, 16, generator=g), torch.randn(2, 9, 16, generator=g), torch.randn(2, 6, 3,
                                                                                                      generator=g)


def indexer_heads_first():
    q, k, w = indexer()
    return q.permute(0, 2, 1, 3).contiguous(), k, w  # q [B, H, S, D]


def indexer_key_weights():
    q, k, _ = indexer()
    return q, k, torch.randn(2, 6, 9, generator=_gen(8))  # weights per key [B, S, T], not per head


def cache():
    """FP8 bytes [40, 32] (uint8), per-token fp32 scale [40], two index tensors of length 32 (== D)."""
    g = _gen()
    q, s = quantize_e4m3(torch.randn(40, 32, generator=g))
    return q, s.squeeze(-1), torch.randint(0, 39, (32,), generator=g), torch.randint(0, 40, (32,), generator=g)


def cache_4d():
    """FP8 bytes [P, B, H, D] = [6, 4, 2, 16] with a scale per (page, position, head), page indices."""
    g = _gen(9)
    q, s = quantize_e4m3(torch.randn(6, 4, 2, 16, generator=g))
    return q, s.squeeze(-1), torch.randint(0, 6, (5,), generator=g)


def attention():
    """q [S, D], k [T, D], v [T, D], and topk_indices [S, K] (distinct per row), plus index scores [S, T]."""
    g = _gen(10)
    s, t, d, k = 6, 20, 16, 5
    idx = torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(s)])
    return (torch.randn(s, d, generator=g), torch.randn(t, d, generator=g), torch.randn(t, d, generator=g), idx,
            torch.randn(s, t, generator=g))


# ---- mask_topk near misses -------------------------------------------------------------------------------------

def mt_fill_per_row_tensor(x, m):
    return torch.where(m, x, x.amin(-1, keepdim=True)).topk(4)


def mt_arange_len1(x, s, e):
    pos = torch.arange(1)  # broadcasts over the row: masks whole rows, not a window
    keep = (pos >= s[:, None]) & (pos < e[:, None])
    return x.masked_fill(~keep, NEG_INF).topk(4).indices


def mt_window_along_rows(x, s, e):
    pos = torch.arange(x.shape[-1])
    keep = (pos[:, None] >= s[None, :]) & (pos[:, None] < e[None, :])  # window over the rows of each column
    return x.masked_fill(~keep, NEG_INF).topk(4).indices


def mt_inverted_range(x, s, e):
    pos = torch.arange(x.shape[-1])
    keep = (pos >= s[:, None]) & (pos < e[:, None])
    return torch.where(keep, NEG_INF, x).topk(4).indices  # drops the window instead


def mt_sub_penalty(x, b):
    return (x - b).topk(4)


def mt_multiplicative_mask(x, m):
    return (x * m.float()).topk(4)


def mt_op_between(x, m):
    return x.masked_fill(~m, NEG_INF).mul(2.0).topk(4)


def mt_additive_scalar(x, m):
    return (x + 1.5).topk(4)


def mt_additive_alpha(x, b):
    return torch.add(x, b, alpha=-2.0).topk(4)


def mt_additive_int(x, ib):
    return (x + ib).topk(4)


def mt_additive_bool(x, m):
    return (x + m).topk(4)


def mt_float64(x, m):
    return x.double().masked_fill(~m, NEG_INF).topk(4)


# ---- index_score near misses -----------------------------------------------------------------------------------

def _scores(q, k, scale=0.125):
    return torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * scale


def is_relu_after_head_sum(q, k, w):
    return torch.matmul(w.unsqueeze(-2), _scores(q, k)).squeeze(-2).relu()


def is_per_row_scale(q, k, w):
    row_scale = torch.linspace(0.5, 1.5, q.shape[1])[:, None, None]  # [S, 1, 1]
    scores = F.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * row_scale)
    return torch.matmul(w.unsqueeze(-2), scores).squeeze(-2)


def is_heads_first(q, k, w):
    scores = F.relu(torch.einsum("bhsd,btd->bhst", q.float(), k.float()) * 0.125)
    return (scores * w.permute(0, 2, 1)[..., None]).sum(1)


def is_sum_over_keys(q, k, w):
    scores = F.relu(torch.einsum("bshd,btd->bsht", q.float(), k.float()) * 0.125)
    return (scores * w[..., None]).sum(-1)


def is_bias_after_relu(q, k, w):
    scores = F.relu(_scores(q, k)) + 0.25
    return torch.matmul(w.unsqueeze(-2), scores).squeeze(-2)


def is_weights_over_keys(q, k, w_keys):
    scores = F.relu(torch.einsum("bshd,btd->bsht", q.float(), k.float()) * 0.125)
    return (scores * w_keys[:, :, None, :]).sum(2)


def is_squared_relu(q, k, w):
    return torch.matmul(w.unsqueeze(-2), F.relu(_scores(q, k)) ** 2).squeeze(-2)


def is_inf_scale(q, k, w):
    scores = F.relu(torch.einsum("bshd,btd->bsht", q.float(), k.float()) * float("inf"))
    return (scores * w[..., None]).sum(2)


# ---- gather_dequant near misses --------------------------------------------------------------------------------

def gd_float16_view(k_cache, k_scale, idx, idx2):
    return k_cache[idx].view(torch.float16).float() * k_scale[idx].unsqueeze(-1)


def gd_fp64_scale(k_cache, k_scale, idx, idx2):
    return k_cache[idx].view(FP8).float() * k_scale.double()[idx].unsqueeze(-1)


def gd_rank4_cache(k_cache, k_scale, pages):
    return k_cache[pages].view(FP8).float() * k_scale[pages].unsqueeze(-1)


def gd_times_full_tensor(k_cache, k_scale, idx, idx2):
    other = k_scale[:32, None] * torch.linspace(0.5, 2.0, k_cache.shape[-1])  # [32, D], not per-row
    return k_cache[idx].view(FP8).float() * other


def gd_scale_next_slot(k_cache, k_scale, idx, idx2):
    return k_cache[idx].view(FP8).float() * k_scale[idx + 1].unsqueeze(-1)


def gd_int8_cache(k_cache, k_scale, idx, idx2):
    return k_cache.view(torch.int8)[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)


# ---- windowed_softmax near misses ------------------------------------------------------------------------------

def ws_arange_len1(x, s, e):
    pos = torch.arange(1)
    keep = (pos >= s[:, None]) & (pos < e[:, None])
    return x.masked_fill(~keep, NEG_INF).softmax(-1)


def ws_window_along_rows(x, s, e):
    pos = torch.arange(x.shape[-1])
    keep = (pos[:, None] >= s[None, :]) & (pos[:, None] < e[None, :])
    return x.masked_fill(~keep, NEG_INF).softmax(-1)


def _range_masked(x, s, e):
    pos = torch.arange(x.shape[-1])
    return x.masked_fill(~((pos >= s[:, None]) & (pos < e[:, None])), NEG_INF)


def ws_max_of_unmasked(x, s, e):
    ex = (_range_masked(x, s, e) - x.amax(-1, keepdim=True)).exp()
    return ex / ex.sum(-1, keepdim=True)


def ws_sum_other_dim(x, s, e):
    m = _range_masked(x, s, e)
    ex = (m - m.amax(-1, keepdim=True)).exp()
    return ex / ex.sum(0, keepdim=True)


def ws_sub_alpha(x, s, e):
    m = _range_masked(x, s, e)
    ex = torch.sub(m, m.amax(-1, keepdim=True), alpha=2).exp()
    return ex / ex.sum(-1, keepdim=True)


def ws_additive_mask(x, bias):
    return (x + bias).softmax(-1)


def ws_op_between(x, s, e):
    return (_range_masked(x, s, e) / 0.5).softmax(-1)


def ws_position_ids(x, kv_pos, q_pos):
    keep = kv_pos[None, :] <= q_pos[:, None]
    return x.masked_fill(~keep, NEG_INF).softmax(-1)


def ws_scalar_bound(x, end):
    pos = torch.arange(x.shape[-1])
    return x.masked_fill(~(pos < end), NEG_INF).softmax(-1)


# ---- sparse attention near misses (indexer-selected attention, no rule yet) ------------------------------------

def _attn_scores(q, k):
    return q @ k.T * 0.25


def sa_scatter_true(q, k, v, idx, index_scores):
    drop = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool).scatter(-1, idx, True)  # drops the selection
    return _attn_scores(q, k).masked_fill(drop, NEG_INF).softmax(-1) @ v


def sa_softmax_other_dim(q, k, v, idx, index_scores):
    drop = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).scatter(-1, idx, False)
    return _attn_scores(q, k).masked_fill(drop, NEG_INF).softmax(0).nan_to_num() @ v


def sa_weights_reused(q, k, v, idx, index_scores):
    drop = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).scatter(-1, idx, False)
    probs = _attn_scores(q, k).masked_fill(drop, NEG_INF).softmax(-1)
    return probs @ v, probs.sum(0)  # the attention weights also feed a statistic


def sa_finite_fill(q, k, v, idx, index_scores):
    drop = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).scatter(-1, idx, False)
    return _attn_scores(q, k).masked_fill(drop, -1e4).softmax(-1) @ v


def sa_unmasked_indexer(q, k, v, idx, index_scores):
    sel = index_scores.topk(5).indices  # the indexer's top-k without its causal mask
    drop = torch.ones_like(index_scores, dtype=torch.bool).scatter(-1, sel, False)
    return _attn_scores(q, k).masked_fill(drop, NEG_INF).softmax(-1) @ v


# ---- the table -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NearMiss:
    name: str
    fn: Callable
    inputs: Callable[[], tuple]
    rule: str  # the rule it nearly matches ("sparse_attention": the idiom no rule takes yet)
    why: str  # why a rewrite would be wrong (or cannot express it)
    seen: bool = True  # the program reaches the rule's anchor: it must be a candidate, rejected with a reason
    allowed: tuple = ()  # rules that rightly rewrite part of the program (the near-missed rule's op stays out)
    skip: str = ""  # why this torch version has no such near miss (see wa.ROUNDING_DROPPED)
    setup: Callable = contextlib.nullcontext  # a context the compile and both runs need (CPU stand-in kernels)


CORPUS = [
    # mask_topk
    NearMiss("mt_largest_false", nm_largest_false, rows, "mask_topk",
             "topk(largest=False) selects the smallest entries; the op selects the largest"),
    NearMiss("mt_topk_other_dim", nm_other_dim, rows, "mask_topk",
             "topk over dim 0 (across rows), the mask is per row along the last dim"),
    NearMiss("mt_le_bound", nm_le_bound, rows, "mask_topk",
             "arange <= row_ends keeps one more position than the op's [row_starts, row_ends)"),
    NearMiss("mt_offset_arange", mt_nm_offset_arange, rows, "mask_topk",
             "arange(1, N + 1): every bound is shifted by one position"),
    NearMiss("mt_masked_logits_reused", nm_reused_masked_logits, rows, "mask_topk",
             "the masked logits also feed a softmax: the op never materializes them"),
    NearMiss("mt_unmasked", nm_unmasked, rows, "mask_topk", "plain topk: nothing is masked"),
    NearMiss("mt_drop_gt_bound", nm_drop_gt_bound, rows, "mask_topk",
             "masked_fill(arange > row_ends) keeps position row_ends too; the drop forms take >="),
    NearMiss("mt_drop_and", nm_drop_and, rows, "mask_topk",
             "(arange < row_starts) & (arange >= row_ends) drops nothing of a non-empty range; the drop form is |"),
    NearMiss("mt_masked_after_topk", nm_masked_after_topk, rows, "mask_topk",
             "the mask is applied to topk's values after the selection, not before"),
    NearMiss("mt_fill_per_row_tensor", mt_fill_per_row_tensor, masked, "mask_topk",
             "the fill is a per-row tensor (the row minimum), the op takes one number"),
    NearMiss("mt_arange_len1", mt_arange_len1, rows, "mask_topk",
             "arange(1) broadcasts: each row is kept or dropped whole, not a window"),
    NearMiss("mt_window_along_rows", mt_window_along_rows, square_rows, "mask_topk",
             "the window is laid along dim 0 (pos[:, None] vs bounds[None, :]), topk runs along dim -1"),
    NearMiss("mt_inverted_range", mt_inverted_range, rows, "mask_topk",
             "where(keep, -inf, x) drops the window instead of keeping it"),
    NearMiss("mt_sub_penalty", mt_sub_penalty, biased, "mask_topk",
             "logits - penalty: a subtraction, the additive form adds"),
    NearMiss("mt_multiplicative_mask", mt_multiplicative_mask, masked, "mask_topk",
             "logits * mask: masked positions become 0, not -inf"),
    NearMiss("mt_op_between", mt_op_between, masked, "mask_topk",
             "a scale between the mask and topk: the values returned are scaled"),
    NearMiss("mt_additive_scalar", mt_additive_scalar, masked, "mask_topk",
             "logits + 1.5: a number, not a mask tensor (was a bug: the compile crashed)"),
    NearMiss("mt_additive_alpha", mt_additive_alpha, biased, "mask_topk",
             "torch.add(x, b, alpha=-2) adds -2 * b (was a bug: alpha was ignored, wrong values)"),
    NearMiss("mt_additive_int", mt_additive_int, int_biased, "mask_topk",
             "an int tensor added: promotes, but is no float mask (was a bug: the compile crashed)"),
    NearMiss("mt_additive_bool", mt_additive_bool, masked, "mask_topk",
             "a bool tensor added adds 1 where True (was a bug: the compile crashed)"),
    NearMiss("mt_float64", mt_float64, masked, "mask_topk", "float64 logits: the op takes fp32/bf16/fp16"),
    # index_score
    NearMiss("is_gelu", nm_gelu, indexer, "index_score", "gelu instead of relu", seen=False),
    NearMiss("is_sum_over_rows", nm_sum_over_rows, indexer, "index_score",
             "the weighted sum runs over S (dim 1), not the heads"),
    NearMiss("is_per_head_scale", nm_per_head_scale, indexer, "index_score",
             "a tensor scale varying per head, the op takes one number"),
    NearMiss("is_bf16_scores", nm_bf16_scores, indexer, "index_score",
             "per-head scores rounded to bf16; the op computes them in fp32"),
    NearMiss("is_scores_reused", nm_scores_reused, indexer, "index_score",
             "the [B, S, H, T] scores also feed an amax: the op never materializes them"),
    NearMiss("is_broadcast_weights", nm_broadcast_weights, indexer, "index_score",
             "one weight per head for every row ([H] broadcast), not [B, S, H]"),
    NearMiss("is_relu_after_head_sum", is_relu_after_head_sum, indexer, "index_score",
             "relu of the head sum, not of each head's score", seen=False),
    NearMiss("is_per_row_scale", is_per_row_scale, indexer, "index_score",
             "a tensor scale varying per query row ([S, 1, 1])"),
    NearMiss("is_heads_first", is_heads_first, indexer_heads_first, "index_score",
             "q is [B, H, S, D] (heads before rows): read as [B, S, H, D] it would mix rows and heads"),
    NearMiss("is_sum_over_keys", is_sum_over_keys, indexer, "index_score",
             "the reduction runs over the keys (T), giving [B, S, H]"),
    NearMiss("is_bias_after_relu", is_bias_after_relu, indexer, "index_score",
             "relu(x) + 0.25 before the head sum: a term the op does not add"),
    NearMiss("is_weights_over_keys", is_weights_over_keys, indexer_key_weights, "index_score",
             "weights vary along the keys [B, S, T], summed over heads: not one weight per head"),
    NearMiss("is_squared_relu", is_squared_relu, indexer, "index_score", "relu(x) ** 2 before the head sum"),
    NearMiss("is_inf_scale", is_inf_scale, indexer, "index_score",
             "a non-finite scale (NaN at x == 0) the op refuses (was a bug: the compile crashed)"),
    # gather_dequant
    NearMiss("gd_scale_other_index", nm_scale_other_index, cache, "gather_dequant",
             "the scale is gathered with another index tensor than the values"),
    NearMiss("gd_scale_bytes_unaligned", nm_scale_bytes_unaligned, cache, "gather_dequant",
             "fp32 scale bytes at an odd byte offset: the table has no fp32 view (eager views each copy)"),
    NearMiss("gd_per_channel_scale", nm_per_channel_scale, cache, "gather_dequant",
             "a per-channel scale [D] (not gathered): multiply by a non-broadcast tensor"),
    NearMiss("gd_scale_along_tokens", nm_scale_along_tokens, cache, "gather_dequant",
             "the gathered per-token scale laid along D: it scales columns, not rows"),
    NearMiss("gd_bf16_arithmetic", nm_bf16_arithmetic, cache, "gather_dequant",
             "upcast to bf16 and multiplied in bf16: the op computes in fp32"),
    NearMiss("gd_e5m2", nm_e5m2, cache, "gather_dequant", "float8_e5m2 bytes, the op decodes e4m3",
             seen=False),
    NearMiss("gd_not_gathered", nm_not_gathered, cache, "gather_dequant",
             "the whole cache is dequantized, nothing is gathered"),
    NearMiss("gd_float16_view", gd_float16_view, cache, "gather_dequant",
             "the bytes viewed as float16 (two bytes per element), not FP8", seen=False),
    NearMiss("gd_fp64_scale", gd_fp64_scale, cache, "gather_dequant",
             "a float64 scale: the product is float64, the op's is fp32"),
    NearMiss("gd_rank4_cache", gd_rank4_cache, cache_4d, "gather_dequant",
             "a [P, B, H, D] cache: the op takes [P, D] or [P, B, D]"),
    NearMiss("gd_times_full_tensor", gd_times_full_tensor, cache, "gather_dequant",
             "multiplied by a full [N, D] tensor, not a per-row scale"),
    NearMiss("gd_scale_next_slot", gd_scale_next_slot, cache, "gather_dequant",
             "the scale is read one slot later (idx + 1) than the values"),
    NearMiss("gd_int8_cache", gd_int8_cache, cache, "gather_dequant",
             "the cache is viewed as int8 before the gather: the op takes uint8 / float8 bytes"),
    # windowed_softmax
    NearMiss("ws_softmax_other_dim", ws_nm_other_dim, rows, "windowed_softmax",
             "softmax over dim 0, the window is per row along dim -1"),
    NearMiss("ws_log_softmax", nm_log_softmax, rows, "windowed_softmax", "log_softmax, not softmax"),
    NearMiss("ws_masked_scores_reused", nm_reused_masked_scores, rows, "windowed_softmax",
             "the masked scores also feed an amax: the op never materializes them"),
    NearMiss("ws_finite_fill", nm_finite_fill, rows, "windowed_softmax",
             "fill -1e9, not -inf: an empty row is uniform, not NaN"),
    NearMiss("ws_materialized_mask", nm_materialized_mask, rows, "windowed_softmax",
             "a data-dependent mask (x > 0.5), not a window of positions"),
    NearMiss("ws_offset_arange", ws_nm_offset_arange, rows, "windowed_softmax",
             "arange(1, N + 1): every bound is shifted by one position"),
    NearMiss("ws_arange_len1", ws_arange_len1, rows, "windowed_softmax",
             "arange(1) broadcasts: whole rows kept or dropped, not a window of the softmax row (was a bug: "
             "read as the window [row_starts, row_ends) of the row)"),
    NearMiss("ws_window_along_rows", ws_window_along_rows, square_rows, "windowed_softmax",
             "the window is laid along dim 0, the softmax runs along dim -1"),
    NearMiss("ws_max_of_unmasked", ws_max_of_unmasked, rows, "windowed_softmax",
             "the max subtracted is over the unmasked scores: exp underflows differently"),
    NearMiss("ws_sum_other_dim", ws_sum_other_dim, rows, "windowed_softmax",
             "normalized by a sum over dim 0, not the row"),
    NearMiss("ws_sub_alpha", ws_sub_alpha, rows, "windowed_softmax",
             "exp(x - 2 * max): under/overflows unlike softmax (was a bug: alpha was ignored)"),
    NearMiss("ws_additive_mask", ws_additive_mask, additive_masked, "windowed_softmax",
             "an additive mask: +inf + -inf outside the window is NaN in eager"),
    NearMiss("ws_op_between", ws_op_between, rows, "windowed_softmax",
             "a temperature between the mask and the softmax"),
    NearMiss("ws_position_ids", ws_position_ids, position_ids, "windowed_softmax",
             "kv positions from a tensor (position ids), not an arange: no window of columns"),
    NearMiss("ws_scalar_bound", ws_scalar_bound, scalar_bound, "windowed_softmax",
             "arange < a 0-d end: one bound for all rows (was a bug: the compile crashed in the check)"),
    # windowed_attention: windowed_softmax rightly fuses the softmax, the chain around it must not be folded
    *[NearMiss(f"wa_{fn.__name__[3:]}", fn, wa.near_miss_inputs, "windowed_attention", why,
               allowed=("windowed_softmax",)) for fn, why in [
        (wa.nm_probs_reused, "the attention weights are also returned summed: they must be materialized"),
        (wa.nm_scores_reused, "the scaled scores also feed an amax: they must be materialized"),
        (wa.nm_softmax_over_queries, "the scores transposed: the window and softmax run over the queries"),
        (wa.nm_probs_on_the_right, "v^T @ probs: the weights are the right operand"),
        (wa.nm_bias_added, "a bias added to the scaled scores, which the op does not add"),
        (wa.nm_two_scales, "two scale factors, each product rounded: the op applies one"),
    ]],
    NearMiss("wa_probs_rounded_then_upcast", wa.nm_probs_rounded_then_upcast,
             lambda: wa.near_miss_inputs(torch.bfloat16), "windowed_attention",
             "weights rounded to bf16, multiplied with fp32 v: the op rounds them to v's dtype only",
             allowed=("windowed_softmax",), skip=wa.ROUNDING_DROPPED),
    NearMiss("wa_non_window_mask", wa.nm_non_window_mask, wa.near_miss_inputs, "windowed_attention",
             "a data-dependent mask (scores > 1): no window, no windowed softmax to fold", seen=False),
    # sparse attention (no rule yet: these must stay unmatched when one is added)
    NearMiss("sa_scatter_true", sa_scatter_true, attention, "sparse_attention",
             "True scattered into a zero mask used as drop mask: the selected keys are dropped",
             seen=False),
    NearMiss("sa_softmax_other_dim", sa_softmax_other_dim, attention, "sparse_attention",
             "softmax over the queries (dim 0), not the selected keys",
             seen=False),
    NearMiss("sa_weights_reused", sa_weights_reused, attention, "sparse_attention",
             "the attention weights are also returned summed: they must be materialized",
             seen=False),
    NearMiss("sa_finite_fill", sa_finite_fill, attention, "sparse_attention",
             "unselected keys filled with -1e4: they keep a small weight",
             seen=False),
    NearMiss("sa_unmasked_indexer", sa_unmasked_indexer, attention, "sparse_attention",
             "the indexer's top-k runs on unmasked scores (no causal mask): future keys selectable",
             seen=False),
]

# causal_sdpa: fused SDPA calls whose bias is not the plain causal mask (tests/test_causal_sdpa_rule.py), run on
# CPU through stand-in kernels of the fused ops
import test_causal_sdpa_rule as cs  # noqa: E402
from sdpa_standin import fused_sdpa_on_cpu  # noqa: E402

CORPUS += [NearMiss(f"cs_{name}", fn, make, "causal_sdpa", why, setup=fused_sdpa_on_cpu)
           for name, (fn, make, _, why) in cs.NEAR_MISSES.items()]

# reroll: its own near misses (tests/test_reroll_rule.py), unrolled chains that must not be folded
from test_reroll_rule import NEGATIVES as _REROLL_NEGATIVES  # noqa: E402

CORPUS += [NearMiss(f"reroll_{name.replace(' ', '_').replace('[', '').replace(']', '').replace('-', '_')}", fn, make,
                    "reroll", why, seen=True)
           for name, (fn, make, why) in _REROLL_NEGATIVES.items()]

assert len({c.name for c in CORPUS}) == len(CORPUS)


def _outputs(x):
    return x if isinstance(x, (tuple, list)) else (x,)


def assert_same_as_eager(out, ref):
    out, ref = _outputs(out), _outputs(ref)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype, (o.shape, o.dtype, r.shape, r.dtype)
        if r.dtype.is_floating_point:
            rtol, atol = TOL[r.dtype]
            torch.testing.assert_close(o, r, rtol=rtol, atol=atol, equal_nan=True)
        else:
            assert torch.equal(o, r)


def _all_rewrites():
    from dsa_inductor.report import _STATS

    return {name: (dict(st.matches), dict(st.notes)) for name, st in _STATS.items() if st.matches or st.notes}


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_near_miss_not_rewritten(fresh, case):
    from dsa_inductor.report import _STATS

    if case.skip:
        pytest.skip(case.skip)
    args = case.inputs()
    with torch.no_grad(), case.setup():
        out, code = run_and_get_code(torch.compile(case.fn, dynamic=False, fullgraph=True), *args)
        ref = case.fn(*args)
    assert set(_all_rewrites()) <= set(case.allowed), f"{case.name} ({case.why}) was rewritten:\n{fresh.report()}"
    if case.allowed:  # part of the program is rightly fused: only the near-missed rule's op must be absent
        assert fresh.RULES[case.rule].op.replace("::", ".") not in "\n".join(code)
    else:
        assert "torch.ops.dsa_inductor" not in "\n".join(code)
    if case.seen:
        st = _STATS.get(case.rule)
        assert st is not None and st.candidates >= 1 and sum(st.rejections.values()) >= 1, fresh.report()
    assert_same_as_eager(out, ref)


def test_corpus_covers_every_rule():
    import dsa_inductor

    per_rule = {r: sum(c.rule == r for c in CORPUS) for r in (*dsa_inductor.RULES, "sparse_attention")}
    assert len(CORPUS) >= 40 and all(n >= 5 for n in per_rule.values()), per_rule


# ---- gather_dequant: the core is fused, the padding-slot handling must not become zero_negative ----------------

B_FOLD = 4


def fold_clamp_min_one(k_cache, k_scale, slots):
    idx = slots.clamp(min=1)  # padding reads slot 1, then is zeroed: zero_negative would read nothing
    k = k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)
    return torch.where((slots < 0).unsqueeze(-1), 0.0, k)


def fold_test_below_one(k_cache, k_scale, slots):
    idx = slots.clamp(min=0)
    k = k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)
    return torch.where((slots < 1).unsqueeze(-1), 0.0, k)  # slot 0 is zeroed too: not a negative-slot test


def fold_clamp_both(k_cache, k_scale, slots):
    idx = slots.clamp(0, k_cache.shape[0] - 2)  # the last slot is read as the one before it
    k = k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)
    return torch.where((slots < 0).unsqueeze(-1), 0.0, k)


def fold_paged_clamp_min_one(k_cache, k_scale, slots):
    idx = slots.clamp(min=1)
    page, pos = idx // B_FOLD, idx % B_FOLD
    k = k_cache[page, pos].view(FP8).float() * k_scale[page, pos].unsqueeze(-1)
    return k.masked_fill(slots[:, None] < 0, 0.0)


FOLD_NEAR_MISSES = [fold_clamp_min_one, fold_test_below_one, fold_clamp_both, fold_paged_clamp_min_one]


@pytest.mark.parametrize("fn", FOLD_NEAR_MISSES, ids=lambda f: f.__name__)
def test_padding_fold_only_when_exact(fresh, fn):
    from dsa_inductor.report import _STATS

    g = _gen(11)
    q, s = quantize_e4m3(torch.randn(6 * B_FOLD, 32, generator=g))
    s = s.squeeze(-1)
    if fn is fold_paged_clamp_min_one:
        q, s = q.view(6, B_FOLD, 32), s.view(6, B_FOLD)
    slots = torch.tensor([5, -1, 23, 0, 1, -1, 22, 7])
    with torch.no_grad():
        out = torch.compile(fn, dynamic=False, fullgraph=True)(q, s, slots)
        ref = fn(q, s, slots)
    assert torch.equal(out, ref)
    st = _STATS["gather_dequant"]
    assert sum(st.matches.values()) == 1, fresh.report()  # the core is rightly fused ...
    assert not any("zero_negative" in n for n in st.notes), fresh.report()  # ... its padding mask kept as is


# ---- mask_topk: a whole-row mask is fused as a mask, never read as row bounds ------------------------------------

def mt_row_mask_from_aranges(x):
    # kv = arange(1): the comparison is [S, 1] and keeps or drops whole rows (here: keeps q >= 0, i.e. all,
    # and drops the rows whose q is negative); as bounds it would read row_ends = q + 1 of a [S, T] row.
    q = (torch.arange(x.shape[0]) - 3)[:, None]
    kv = torch.arange(1)[None, :]
    return x.masked_fill(~(kv <= q), NEG_INF).topk(4, sorted=False).indices


def test_whole_row_mask_is_not_converted_to_bounds(fresh):
    from dsa_inductor.lowerings.masked_topk import topk_mismatch
    from dsa_inductor.report import _STATS

    x = torch.randn(10, 24, generator=_gen(12))
    with torch.no_grad():
        out = torch.compile(mt_row_mask_from_aranges, dynamic=False, fullgraph=True)(x)
    keep = torch.arange(1)[None, :] <= (torch.arange(10) - 3)[:, None]
    assert topk_mismatch(x.masked_fill(~keep, NEG_INF), 4, None, out, False, False) is None
    notes = _STATS["mask_topk"].notes
    assert not any("row_ends" in n or "row_starts" in n for n in notes), notes
