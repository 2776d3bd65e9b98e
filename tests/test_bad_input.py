"""Direct calls of the fused ops with bad input (issue 6, bar 7).

``BAD_INPUTS`` is one table: (op, case, bad-args factory, expected exception type, expected argument name).
Each factory starts from valid arguments (``test_valid_arguments_run`` calls them unchanged) and breaks one
thing: a rank, a dtype, a device, ``k < 0``, lengths that do not match.  The error must be of the stated
type and name the argument, written as in the docstrings: ```name```.  Ops are called as users call them,
``torch.ops.dsa_inductor.<op>(**kwargs)``.

"Another device" is ``meta`` on CPU-only machines (the dispatcher then runs the fake impl, which runs the
same checks) and ``cpu`` when the tensors are on CUDA.

Indices beyond the cache (``gather_dequant``): on CPU the op raises ``IndexError`` as eager indexing does
(``OUT_OF_RANGE``); on CUDA the kernel cannot raise without a host sync, so such a token is never read and
gives a zero row (``test_out_of_range_never_read_on_cuda``; ``compute-sanitizer`` on the GPU suite checks
that no access leaves the cache).  Row bounds beyond the row (``row_starts < 0``, ``row_ends > N``) are not
errors: they are clamped to the row, as eager's ``arange`` comparison is, and nothing outside is read
(``test_bounds_beyond_the_row_follow_eager``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

from conftest import DEVICES
from dsa_inductor.lowerings.gather_dequant import gather_dequant_reference, quantize_e4m3
from dsa_inductor.lowerings.index_score import index_score_reference, score_mismatch, tolerance
from dsa_inductor.lowerings.masked_topk import masked_topk_reference
from dsa_inductor.lowerings.windowed_softmax import windowed_softmax_reference
from dsa_inductor.testing import windowed_attention_mismatch

NEG_INF = float("-inf")
ops = torch.ops.dsa_inductor


def _other(dev):
    return "meta" if dev == "cpu" else "cpu"


# ---- valid arguments, by op (keyword names of the op schemas) ----------------------------------------------------

def topk_args(dev, **over):
    a = dict(logits=torch.randn(4, 16), k=3, row_starts=torch.zeros(4, dtype=torch.int64),
             row_ends=torch.full((4,), 10), mask=torch.rand(4, 16) > 0.2, mask_keeps=True, bias=torch.zeros(4, 16),
             fill=NEG_INF, sorted=True, index_dtype=torch.int64, need_values=True)
    a = {n: v.to(dev) if isinstance(v, torch.Tensor) else v for n, v in a.items()}
    a.update(over)
    return a


def gather_args(dev, **over):
    q, s = quantize_e4m3(torch.randn(6, 4, 32))  # [P, B, D] pages, scales [P, B, 1]
    a = dict(values=q, scales=s, index0=torch.tensor([0, 5, 2]), index1=torch.tensor([1, 3, 0]), block_size=0,
             drop=torch.tensor([False, True, False]), zero_negative=False, fmt="e4m3", out_dtype=torch.float32)
    a = {n: v.to(dev) if isinstance(v, torch.Tensor) else v for n, v in a.items()}
    a.update(over)
    return a


def softmax_args(dev, **over):
    a = dict(scores=torch.randn(4, 16), row_starts=torch.zeros(4, dtype=torch.int64), row_ends=torch.full((4,), 10),
             mask=torch.rand(4, 16) > 0.2, out_dtype=torch.float32)
    a = {n: v.to(dev) if isinstance(v, torch.Tensor) else v for n, v in a.items()}
    a.update(over)
    return a


def score_args(dev, **over):
    a = dict(q=torch.randn(2, 5, 3, 16), k=torch.randn(2, 7, 16), weights=torch.randn(2, 5, 3), scale=0.125,
             scale_after_relu=False, row_ends=torch.full((2, 5), 6))
    a = {n: v.to(dev) if isinstance(v, torch.Tensor) else v for n, v in a.items()}
    a.update(over)
    return a


def attention_args(dev, **over):
    a = dict(q=torch.randn(2, 3, 5, 16), k=torch.randn(2, 1, 7, 16), v=torch.randn(2, 1, 7, 8),
             row_starts=torch.zeros(5, dtype=torch.int64), row_ends=torch.full((5,), 6), scale=0.25,
             scores_dtype=torch.float32)
    a = {n: v.to(dev) if isinstance(v, torch.Tensor) else v for n, v in a.items()}
    a.update(over)
    return a


FACTORIES = {"masked_topk": topk_args, "gather_dequant": gather_args, "windowed_softmax": softmax_args,
             "index_score": score_args, "windowed_attention": attention_args}


@dataclasses.dataclass(frozen=True)
class Bad:
    op: str
    case: str
    args: Callable[[str], dict]  # device -> keyword arguments
    exc: type
    arg: str  # the argument the message must name


def _t(dev, *shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype, device=dev)


BAD_INPUTS = [
    # masked_topk(logits [..., N], k, row_starts/row_ends [...], mask/bias [..., N], ..., index_dtype)
    Bad("masked_topk", "logits_0d", lambda d: topk_args(d, logits=_t(d), row_starts=None, row_ends=None, mask=None,
                                                        bias=None, k=0), ValueError, "logits"),
    Bad("masked_topk", "logits_int", lambda d: topk_args(d, logits=_t(d, 4, 16, dtype=torch.int32)), TypeError,
        "logits"),
    Bad("masked_topk", "logits_float64", lambda d: topk_args(d, logits=_t(d, 4, 16, dtype=torch.float64)), TypeError,
        "logits"),
    Bad("masked_topk", "k_negative", lambda d: topk_args(d, k=-1), ValueError, "k"),
    Bad("masked_topk", "k_above_n", lambda d: topk_args(d, k=17), ValueError, "k"),
    Bad("masked_topk", "row_starts_float", lambda d: topk_args(d, row_starts=_t(d, 4)), TypeError, "row_starts"),
    Bad("masked_topk", "row_ends_device", lambda d: topk_args(d, row_ends=torch.full((4,), 10, device=_other(d))),
        ValueError, "row_ends"),
    Bad("masked_topk", "row_starts_length", lambda d: topk_args(d, row_starts=_t(d, 3, dtype=torch.int64)),
        ValueError, "row_starts"),
    Bad("masked_topk", "row_ends_2d", lambda d: topk_args(d, row_ends=_t(d, 4, 2, dtype=torch.int64)),
        ValueError, "row_ends"),  # [4, 2]: not the [4] rows (a per-position tensor would broadcast, as eager)
    Bad("masked_topk", "mask_uint8", lambda d: topk_args(d, mask=_t(d, 4, 16, dtype=torch.uint8)), TypeError,
        "mask"),
    Bad("masked_topk", "mask_0d", lambda d: topk_args(d, mask=_t(d, dtype=torch.bool)), ValueError, "mask"),
    Bad("masked_topk", "mask_device", lambda d: topk_args(d, mask=_t(_other(d), 4, 16, dtype=torch.bool)),
        ValueError, "mask"),
    Bad("masked_topk", "mask_length", lambda d: topk_args(d, mask=_t(d, 4, 15, dtype=torch.bool)), ValueError,
        "mask"),
    Bad("masked_topk", "mask_rows", lambda d: topk_args(d, mask=_t(d, 3, 16, dtype=torch.bool)), ValueError, "mask"),
    Bad("masked_topk", "bias_int", lambda d: topk_args(d, bias=_t(d, 4, 16, dtype=torch.int64)), TypeError, "bias"),
    Bad("masked_topk", "bias_device", lambda d: topk_args(d, bias=_t(_other(d), 4, 16)), ValueError, "bias"),
    Bad("masked_topk", "bias_length", lambda d: topk_args(d, bias=_t(d, 4, 9)), ValueError, "bias"),
    Bad("masked_topk", "index_dtype", lambda d: topk_args(d, index_dtype=torch.float32), TypeError, "index_dtype"),
    # gather_dequant(values [P, (B,) Dq], scales, index0, index1, block_size, drop, zero_negative, fmt, out_dtype)
    Bad("gather_dequant", "values_1d", lambda d: gather_args(d, values=_t(d, 32, dtype=torch.uint8), scales=None,
                                                             index1=None), ValueError, "values"),
    Bad("gather_dequant", "values_float32", lambda d: gather_args(d, values=_t(d, 6, 4, 32)), TypeError, "values"),
    Bad("gather_dequant", "fmt", lambda d: gather_args(d, fmt="e5m2"), ValueError, "fmt"),
    Bad("gather_dequant", "index0_float", lambda d: gather_args(d, index0=_t(d, 3)), TypeError, "index0"),
    Bad("gather_dequant", "index0_device", lambda d: gather_args(d, index0=_t(_other(d), 3, dtype=torch.int64)),
        ValueError, "index0"),
    Bad("gather_dequant", "index1_int16", lambda d: gather_args(d, index1=_t(d, 3, dtype=torch.int16)), TypeError,
        "index1"),
    Bad("gather_dequant", "index1_length", lambda d: gather_args(d, index1=_t(d, 2, dtype=torch.int64)), ValueError,
        "index1"),
    Bad("gather_dequant", "block_size_negative", lambda d: gather_args(d, index1=None, block_size=-4), ValueError,
        "block_size"),
    Bad("gather_dequant", "block_size_not_page", lambda d: gather_args(d, index1=None, block_size=8), ValueError,
        "block_size"),
    Bad("gather_dequant", "block_size_with_index1", lambda d: gather_args(d, block_size=4), ValueError,
        "block_size"),
    Bad("gather_dequant", "paged_values_2d", lambda d: gather_args(d, values=_t(d, 24, 32, dtype=torch.uint8),
                                                                   scales=None), ValueError, "values"),
    Bad("gather_dequant", "drop_int", lambda d: gather_args(d, drop=_t(d, 3, dtype=torch.int64)), TypeError,
        "drop"),
    Bad("gather_dequant", "drop_device", lambda d: gather_args(d, drop=_t(_other(d), 3, dtype=torch.bool)),
        ValueError, "drop"),
    Bad("gather_dequant", "drop_length", lambda d: gather_args(d, drop=_t(d, 4, dtype=torch.bool)), ValueError,
        "drop"),
    Bad("gather_dequant", "scales_int32", lambda d: gather_args(d, scales=_t(d, 6, 4, 1, dtype=torch.int32)),
        TypeError, "scales"),
    Bad("gather_dequant", "scales_device", lambda d: gather_args(d, scales=_t(_other(d), 6, 4, 1)), ValueError,
        "scales"),
    Bad("gather_dequant", "scales_rank", lambda d: gather_args(d, scales=_t(d, 6, 4)), ValueError, "scales"),
    Bad("gather_dequant", "scales_groups", lambda d: gather_args(d, scales=_t(d, 6, 4, 3)), ValueError, "scales"),
    Bad("gather_dequant", "out_dtype", lambda d: gather_args(d, out_dtype=torch.int32), TypeError, "out_dtype"),
    # windowed_softmax(scores [..., N], row_starts/row_ends [...], mask [..., N], out_dtype)
    Bad("windowed_softmax", "scores_0d", lambda d: softmax_args(d, scores=_t(d), row_starts=None, row_ends=None,
                                                                mask=None), ValueError, "scores"),
    Bad("windowed_softmax", "scores_int", lambda d: softmax_args(d, scores=_t(d, 4, 16, dtype=torch.int64)),
        TypeError, "scores"),
    Bad("windowed_softmax", "row_starts_float", lambda d: softmax_args(d, row_starts=_t(d, 4)), TypeError,
        "row_starts"),
    Bad("windowed_softmax", "row_ends_device", lambda d: softmax_args(d, row_ends=_t(_other(d), 4, dtype=torch.int32)),
        ValueError, "row_ends"),
    Bad("windowed_softmax", "row_starts_length", lambda d: softmax_args(d, row_starts=_t(d, 5, dtype=torch.int64)),
        ValueError, "row_starts"),
    Bad("windowed_softmax", "row_ends_2d", lambda d: softmax_args(d, row_ends=_t(d, 4, 3, dtype=torch.int64)),
        ValueError, "row_ends"),
    Bad("windowed_softmax", "mask_float", lambda d: softmax_args(d, mask=_t(d, 4, 16)), TypeError, "mask"),
    Bad("windowed_softmax", "mask_device", lambda d: softmax_args(d, mask=_t(_other(d), 4, 16, dtype=torch.bool)),
        ValueError, "mask"),
    Bad("windowed_softmax", "mask_length", lambda d: softmax_args(d, mask=_t(d, 4, 17, dtype=torch.bool)),
        ValueError, "mask"),
    Bad("windowed_softmax", "mask_rows", lambda d: softmax_args(d, mask=_t(d, 2, 16, dtype=torch.bool)), ValueError,
        "mask"),
    Bad("windowed_softmax", "out_dtype", lambda d: softmax_args(d, out_dtype=torch.int64), TypeError, "out_dtype"),
    # index_score(q [B, S, H, D], k [B, T, D], weights [B, S, H], scale, scale_after_relu, row_ends [B, S])
    Bad("index_score", "q_rank", lambda d: score_args(d, q=_t(d, 5, 3, 16)), ValueError, "q"),
    Bad("index_score", "q_int", lambda d: score_args(d, q=_t(d, 2, 5, 3, 16, dtype=torch.int32)), TypeError, "q"),
    Bad("index_score", "k_rank", lambda d: score_args(d, k=_t(d, 7, 16)), ValueError, "k"),
    Bad("index_score", "k_dtype", lambda d: score_args(d, k=_t(d, 2, 7, 16, dtype=torch.bfloat16)), TypeError, "k"),
    Bad("index_score", "k_device", lambda d: score_args(d, k=_t(_other(d), 2, 7, 16)), ValueError, "k"),
    Bad("index_score", "k_head_dim", lambda d: score_args(d, k=_t(d, 2, 7, 8)), ValueError, "k"),
    Bad("index_score", "k_batch", lambda d: score_args(d, k=_t(d, 3, 7, 16)), ValueError, "k"),
    Bad("index_score", "weights_rank", lambda d: score_args(d, weights=_t(d, 2, 5)), ValueError, "weights"),
    Bad("index_score", "weights_int", lambda d: score_args(d, weights=_t(d, 2, 5, 3, dtype=torch.int64)), TypeError,
        "weights"),
    Bad("index_score", "weights_heads", lambda d: score_args(d, weights=_t(d, 2, 5, 4)), ValueError, "weights"),
    Bad("index_score", "weights_device", lambda d: score_args(d, weights=_t(_other(d), 2, 5, 3)), ValueError,
        "weights"),
    Bad("index_score", "scale_nan", lambda d: score_args(d, scale=float("nan")), ValueError, "scale"),
    Bad("index_score", "row_ends_float", lambda d: score_args(d, row_ends=_t(d, 2, 5)), TypeError, "row_ends"),
    Bad("index_score", "row_ends_length", lambda d: score_args(d, row_ends=_t(d, 2, 4, dtype=torch.int64)),
        ValueError, "row_ends"),
    Bad("index_score", "row_ends_device", lambda d: score_args(d, row_ends=_t(_other(d), 2, 5, dtype=torch.int64)),
        ValueError, "row_ends"),
    # windowed_attention(q [..., S, D], k [..., T, D], v [..., T, Dv], row_starts/row_ends [..., S], scale,
    # scores_dtype)
    Bad("windowed_attention", "q_1d", lambda d: attention_args(d, q=_t(d, 16)), ValueError, "q"),
    Bad("windowed_attention", "q_int", lambda d: attention_args(d, q=_t(d, 2, 3, 5, 16, dtype=torch.int32)),
        TypeError, "q"),
    Bad("windowed_attention", "k_dtype", lambda d: attention_args(d, k=_t(d, 2, 1, 7, 16, dtype=torch.bfloat16)),
        TypeError, "k"),
    Bad("windowed_attention", "k_device", lambda d: attention_args(d, k=_t(_other(d), 2, 1, 7, 16)), ValueError,
        "k"),
    Bad("windowed_attention", "k_head_dim", lambda d: attention_args(d, k=_t(d, 2, 1, 7, 8)), ValueError, "k"),
    Bad("windowed_attention", "v_length", lambda d: attention_args(d, v=_t(d, 2, 1, 6, 8)), ValueError, "v"),
    Bad("windowed_attention", "v_heads", lambda d: attention_args(d, v=_t(d, 2, 2, 7, 8)), ValueError, "v"),
    Bad("windowed_attention", "v_int", lambda d: attention_args(d, v=_t(d, 2, 1, 7, 8, dtype=torch.int64)),
        TypeError, "v"),
    Bad("windowed_attention", "row_starts_float", lambda d: attention_args(d, row_starts=_t(d, 5)), TypeError,
        "row_starts"),
    Bad("windowed_attention", "row_ends_rows", lambda d: attention_args(d, row_ends=_t(d, 4, dtype=torch.int64)),
        ValueError, "row_ends"),
    Bad("windowed_attention", "row_ends_device",
        lambda d: attention_args(d, row_ends=_t(_other(d), 5, dtype=torch.int64)), ValueError, "row_ends"),
    Bad("windowed_attention", "scale_nan", lambda d: attention_args(d, scale=float("nan")), ValueError, "scale"),
    Bad("windowed_attention", "scores_dtype", lambda d: attention_args(d, scores_dtype=torch.float16), TypeError,
        "scores_dtype"),
]

assert len({(b.op, b.case) for b in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda b: f"{b.op}-{b.case}")
def test_bad_input_names_the_argument(bad, device):
    kwargs = bad.args(device)
    with pytest.raises(bad.exc) as info:
        getattr(ops, bad.op)(**kwargs)
    assert f"`{bad.arg}`" in str(info.value), str(info.value)
    assert bad.op in str(info.value), str(info.value)  # which op, too


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(FACTORIES))
def test_valid_arguments_run(op, device):
    """The factories' unchanged arguments are valid: each bad case fails for its one change."""
    out = getattr(ops, op)(**FACTORIES[op](device))
    assert all(t.device.type == device for t in (out if isinstance(out, (tuple, list)) else (out,)))


def test_table_covers_every_op_and_kind():
    for op in FACTORIES:
        cases = " ".join(b.case for b in BAD_INPUTS if b.op == op)
        assert "device" in cases and ("rank" in cases or "0d" in cases or "1d" in cases), (op, cases)
        assert any(b.op == op and b.exc is TypeError for b in BAD_INPUTS), op
        assert "length" in cases or "rows" in cases or "heads" in cases, (op, cases)


# ---- indices beyond the cache, bounds beyond the row -------------------------------------------------------------

OUT_OF_RANGE = {  # gather_dequant arguments with one token outside the cache (or the scale table)
    "slot_past_cache": dict(index0=torch.tensor([0, 6, 2]), index1=torch.tensor([1, 3, 0]), drop=None),
    "position_past_page": dict(index0=torch.tensor([0, 5, 2]), index1=torch.tensor([1, 4, 0]), drop=None),
    "negative_past_wrap": dict(index0=torch.tensor([0, -7, 2]), index1=torch.tensor([1, 3, 0]), drop=None),
    "slot_addressing_past_cache": dict(index0=torch.tensor([3, 24, 1]), index1=None, block_size=4, drop=None),
    "scale_table_shorter": dict(index0=torch.tensor([0, 5, 2]), index1=torch.tensor([1, 3, 0]), drop=None,
                                scales=torch.ones(5, 4, 1)),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_out_of_range_raises_on_cpu_as_eager(case):
    kwargs = gather_args("cpu", **OUT_OF_RANGE[case])
    with pytest.raises(IndexError):
        ops.gather_dequant(**kwargs)
    with pytest.raises(IndexError):
        gather_dequant_reference(**kwargs)  # the definition: eager indexing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel's out-of-range behaviour")
@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_out_of_range_never_read_on_cuda(case):
    kwargs = gather_args("cuda", **{n: v.cuda() if isinstance(v, torch.Tensor) else v
                                    for n, v in OUT_OF_RANGE[case].items()})
    out = ops.gather_dequant(**kwargs)
    torch.cuda.synchronize()
    assert bool((out[1] == 0).all())  # token 1 is outside: a zero row, not read (no device-side assert)
    keep = torch.tensor([0, 2], device="cuda")
    sub = dict(kwargs, index0=kwargs["index0"][keep],
               index1=kwargs["index1"][keep] if kwargs.get("index1") is not None else None)
    ref = gather_dequant_reference(**{n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in sub.items()})
    assert torch.equal(out[keep].cpu(), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_bounds_beyond_the_row_follow_eager(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, generator=g).to(device)
    starts = torch.tensor([-5, 0, 11, 3, -100]).to(device)
    ends = torch.tensor([4, 40, 100, 2, 12]).to(device)  # row 3 is empty (end < start)
    pos = torch.arange(12, device=device)
    keep = (pos >= starts[:, None]) & (pos < ends[:, None])
    masked = x.masked_fill(~keep, NEG_INF)
    v, _ = ops.masked_topk(x, 4, starts, ends, None, True, None, NEG_INF, True, torch.int64, True)
    torch.testing.assert_close(v, masked.topk(4).values)
    torch.testing.assert_close(v, masked_topk_reference(x, 4, starts, ends)[0])
    p = ops.windowed_softmax(x, starts, ends, None, torch.float32)
    torch.testing.assert_close(p, masked.softmax(-1), equal_nan=True)
    torch.testing.assert_close(p, windowed_softmax_reference(x, starts, ends), equal_nan=True)
    q, k, w = (torch.randn(1, 5, 2, 16, generator=g).to(device), torch.randn(1, 12, 16, generator=g).to(device),
               torch.randn(1, 5, 2, generator=g).to(device))
    row_ends = ends[None].clone()
    row_ends[0, 0] = -3  # before the row: all -inf
    s = ops.index_score(q, k, w, 0.5, False, row_ends)
    ref = index_score_reference(q, k, w, 0.5, False, None)
    ref = ref.masked_fill(pos >= row_ends[..., None], NEG_INF)
    assert score_mismatch(s, ref, tolerance(q, k, w, 0.5, row_ends)) is None
    q, k, v = (torch.randn(n, 16, generator=g).to(device) for n in (5, 12, 12))
    out = ops.windowed_attention(q, k, v, starts, ends, 0.25, torch.float32)
    ref = (q @ k.T * 0.25).masked_fill(~keep, NEG_INF).softmax(-1) @ v  # row 3 empty: NaN
    assert windowed_attention_mismatch(ref, out, q.dtype) is None and out[3].isnan().all()
