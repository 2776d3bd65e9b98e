"""Rule gather_dequant under torch.compile: matches, equivalence with eager, follow-up folds, near misses.

User functions are written as model / serving code writes them, not through the rule's search functions.
Each is compiled once with dynamic shapes and fed many hypothesis examples (the compile count is checked).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code

from conftest import DEVICES, matches
from dsa_inductor import testing
from dsa_inductor.lowerings.gather_dequant import quantize_e4m3

E8M0 = getattr(torch, "float8_e8m0fnu", None)
FP8 = torch.float8_e4m3fn
B, D = 4, 32  # page size and head dim of the paged caches below (constants, as in a model config)


def _notes():
    from dsa_inductor.report import _STATS

    st_ = _STATS.get("gather_dequant")
    return dict(st_.notes) if st_ else {}


# ---- user code ---------------------------------------------------------------------------------------------

def deepseek_slots(k_cache, k_scale, slots):
    # DeepSeek-V3.2 reference style: FP8 bytes [N, D] + fp32 scale [N], padding slots -1, bf16 out
    idx = slots.clamp(min=0)
    k = k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)
    k = torch.where((slots < 0).unsqueeze(-1), 0.0, k)
    return k.to(torch.bfloat16)


def vllm_inline_paged(kv_cache, slots):
    # vLLM indexer cache: per page B x D FP8 bytes, then B fp32 scales, read through a uint8 view
    pages = kv_cache.view(kv_cache.shape[0], -1)
    values = pages[:, : B * D].view(-1, B, D)
    scales = pages[:, B * D:].view(torch.float32)
    idx = slots.clamp(min=0)
    page, pos = idx // B, idx % B
    k = values.view(FP8)[page, pos].float() * scales[page, pos][:, None]
    return k.masked_fill(slots[:, None] < 0, 0)


def inline_scale_bytes(kv_cache, slots):
    # the same inline page layout, the scales kept as bytes until after the gather (each token's 4 bytes
    # viewed as fp32): what the lifted per-token loop of examples/serving_loops.py computes
    rows = kv_cache.view(-1, B * (D + 4))  # the row size from the layout's constants (4-byte aligned)
    values = rows[:, : B * D].unflatten(-1, (B, D))
    scale_bytes = rows[:, B * D:].unflatten(-1, (B, 4))
    idx = slots.clamp(min=0)
    page, pos = idx // B, idx % B
    k = values[page, pos].view(FP8).float() * scale_bytes[page, pos].view(torch.float32)
    return torch.where((slots >= 0)[:, None], k, 0.0)


def block_table_fp8(k_cache, k_scale, block_table, positions):
    # an FP8 cache tensor [P, B, D], addressed through a block table
    page = block_table[positions // B]
    pos = positions % B
    return k_cache[page, pos].float() * k_scale[page, pos].unsqueeze(-1)


def block_scales_ue8m0(k_cache, k_scale, idx):
    # per-128-element UE8M0 block scales [N, D // 128] as bytes
    k = k_cache[idx].view(FP8).float()
    s = k_scale[idx].view(E8M0).float()
    return (k.unflatten(-1, (s.shape[-1], 128)) * s.unsqueeze(-1)).flatten(-2)


def keep_where_bf16_scale(k_cache, k_scale, slots):
    # bf16 scale [N, 1] upcast, negative slots wrap in eager and are masked by a keep-form where
    k = k_cache.view(FP8)[slots].float() * k_scale[slots].float()
    return torch.where((slots >= 0)[:, None], k, 0.0)


def page_gather_index_select(k_cache, k_scale, pages, invalid):
    # whole pages [P, B, D] gathered with index_select, scale first in the product, a per-page drop mask
    k = k_scale.index_select(0, pages).unsqueeze(-1) * k_cache.index_select(0, pages).view(FP8).float()
    return k.masked_fill(invalid[:, None, None], 0.0)


CASES = {  # fn -> (variant, notes expected (substrings))
    deepseek_slots: ("u8_after:idx1:token:raw", ("zero_negative", "out_dtype")),
    vllm_inline_paged: ("u8_before:idx2:token:raw", ("slot addressing", "zero_negative")),
    inline_scale_bytes: ("u8_after:idx2:keepdim:f32_bytes", ("slot addressing", "zero_negative")),
    block_table_fp8: ("fp8:idx2:token:raw", ()),
    keep_where_bf16_scale: ("u8_before:idx1:keepdim:cast", ("zero_negative",)),
    page_gather_index_select: ("u8_after:idx1:token:raw", ("drop",)),
}


@st.composite
def inputs(draw, fn, device):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n = draw(st.integers(2, 40))
    p = draw(st.integers(2, 12))
    idt = draw(st.sampled_from([torch.int32, torch.int64]))

    def slots(count, hi, neg=True):
        s = torch.randint(-1 if neg else 0, hi, (count,), generator=g)
        return s.to(idt).to(device)

    if fn is deepseek_slots or fn is keep_where_bf16_scale:
        k = torch.randn(p * B, D, generator=g) * 4
        q, s = quantize_e4m3(k)
        if fn is keep_where_bf16_scale:
            return q.to(device), s.to(torch.bfloat16).to(device), slots(n, p * B)
        return q.to(device), s.squeeze(-1).to(device), slots(n, p * B)
    if fn is vllm_inline_paged or fn is inline_scale_bytes:
        k = torch.randn(p, B, D, generator=g)
        q, s = quantize_e4m3(k)
        cache = torch.cat([q.view(p, B * D), s.view(p, B).contiguous().view(torch.uint8)], dim=1)
        return cache.view(p, B, D + 4).to(device), slots(n, p * B)
    if fn is block_table_fp8:
        q, s = quantize_e4m3(torch.randn(p, B, D, generator=g))
        table = torch.randperm(p, generator=g).to(idt)
        return q.view(FP8).to(device), s.squeeze(-1).to(device), table.to(device), slots(n, p * B, neg=False)
    if fn is block_scales_ue8m0:
        q, s = quantize_e4m3(torch.randn(p, 256, generator=g), group=128, ue8m0=True)
        return q.to(device), s.to(device), slots(n, p, neg=False)
    q, s = quantize_e4m3(torch.randn(p, B, D, generator=g))
    pages = slots(n, p, neg=False)
    return q.to(device), s.squeeze(-1).to(device), pages, (torch.rand(n, generator=g) < 0.3).to(device)


def assert_same(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    testing.assert_exact(out, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", list(CASES), ids=lambda f: f.__name__)
def test_compiled_equals_eager(fresh, fn, device):
    if fn is block_scales_ue8m0 and E8M0 is None:
        pytest.skip("no float8_e8m0fnu in this torch")
    variant, notes = CASES[fn]
    # The fp32 scale-byte view needs the row size provably a multiple of 4: it is the layout's constant, so
    # only the page and token counts are dynamic (dynamic=True would make the row size a symbol too).
    rows_static = fn is inline_scale_bytes
    compiled = torch.compile(fn, dynamic=None if rows_static else True, fullgraph=True)
    torch._dynamo.utils.counters.clear()

    @settings(max_examples=25)
    @given(inputs(fn, device))
    def check(args):
        if rows_static:
            for a in args:
                torch._dynamo.mark_dynamic(a, 0)
        with torch.no_grad():
            assert_same(compiled(*args), fn(*args))

    check()
    assert matches("gather_dequant").get(variant, 0) >= 1, matches("gather_dequant")
    for note in notes:
        assert any(note in n for n in _notes()), _notes()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # static, then dynamic


@pytest.mark.skipif(E8M0 is None, reason="no float8_e8m0fnu in this torch")
@pytest.mark.parametrize("device", DEVICES)
def test_block_scales_ue8m0_static(fresh, device):
    # The block-scale form matches with static shapes only: under dynamic=True its unflatten/flatten sizes
    # are symbolic expressions the re-traced pattern does not reproduce (then stock Inductor runs it).
    compiled = torch.compile(block_scales_ue8m0, dynamic=False, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    q, s = quantize_e4m3(torch.randn(12, 256, generator=g) * 3, group=128, ue8m0=True)
    for _ in range(3):
        idx = torch.randint(0, 12, (9,), generator=g)
        with torch.no_grad():
            assert_same(compiled(q.to(device), s.to(device), idx.to(device)),
                        block_scales_ue8m0(q.to(device), s.to(device), idx.to(device)))
    assert matches("gather_dequant") == {"u8_after:idx1:group:e8m0": 1}, matches("gather_dequant")


def test_fused_op_in_generated_code(fresh):
    k = torch.randn(16, D)
    q, s = quantize_e4m3(k)
    slots = torch.tensor([3, -1, 15, 0])
    out, code = run_and_get_code(torch.compile(deepseek_slots), q, s.squeeze(-1), slots)
    src = "\n".join(code)
    assert "dsa_inductor.gather_dequant" in src
    # the mask, the clamp and the cast are folded into the op: one call, zero_negative, bf16 out
    call = next(line for line in src.splitlines() if "gather_dequant.default(" in line)
    assert "True, 'e4m3', torch.bfloat16" in call, call
    assert_same(out, deepseek_slots(q, s.squeeze(-1), slots))
    assert "u8_after:idx1:token:raw" in fresh.report()


@pytest.mark.parametrize("fn", [vllm_inline_paged, inline_scale_bytes], ids=lambda f: f.__name__)
def test_inline_scale_bytes_not_copied(fresh, fn):
    """The inline layout's fp32 scales are bytes inside the cache: the op takes them as bytes (``scale_bytes``)
    and views them itself, so the generated code neither copies the scale table nor calls ``view.dtype``."""
    p = 6
    q, s = quantize_e4m3(torch.randn(p, B, D, generator=torch.Generator().manual_seed(0)))
    cache = torch.cat([q.view(p, B * D), s.view(p, B).contiguous().view(torch.uint8)], dim=1).view(p, B, D + 4)
    slots = torch.tensor([5, -1, 23, 0, 9])
    out, code = run_and_get_code(torch.compile(fn), cache, slots)
    src = "\n".join(code)
    call = next(line for line in src.splitlines() if "gather_dequant.default(" in line)
    assert call.rstrip().endswith("True)"), call  # scale_bytes
    assert "view.dtype" not in src
    assert_same(out, fn(cache, slots))
    assert any("no copy of the scale table" in note for note in _notes()), _notes()


def test_scale_bytes_bad_input_names_the_argument():
    values = torch.zeros(4, B, D, dtype=torch.uint8)
    with pytest.raises(ValueError, match="`scales`"):
        torch.ops.dsa_inductor.gather_dequant(values, torch.ones(4, B, 1), torch.tensor([1]), None, B, None, False,
                                              "e4m3", torch.float32, True)
    with pytest.raises(ValueError, match="`scales`"):  # bytes whose offset is not 4-aligned: no fp32 view
        odd = torch.zeros(4, B * 4 + 1, dtype=torch.uint8)[:, 1:].view(4, B, 4)
        torch.ops.dsa_inductor.gather_dequant(values, odd, torch.tensor([1]), None, B, None, False, "e4m3",
                                              torch.float32, True)


# ---- near misses -------------------------------------------------------------------------------------------

def nm_scale_other_index(k_cache, k_scale, idx, idx2):
    return k_cache[idx].view(FP8).float() * k_scale[idx2].unsqueeze(-1)


def nm_per_channel_scale(k_cache, k_scale, idx, idx2):
    return k_cache[idx].view(FP8).float() * k_scale[: k_cache.shape[-1]]


def nm_scale_along_tokens(k_cache, k_scale, idx, idx2):
    # the gathered per-token scale laid along D (n == D here): it scales columns, not rows
    return k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(0)


def nm_bf16_arithmetic(k_cache, k_scale, idx, idx2):
    return k_cache[idx].view(FP8).to(torch.bfloat16) * k_scale[idx].to(torch.bfloat16).unsqueeze(-1)


def nm_e5m2(k_cache, k_scale, idx, idx2):
    return k_cache[idx].view(torch.float8_e5m2).float() * k_scale[idx].unsqueeze(-1)


def nm_not_gathered(k_cache, k_scale, idx, idx2):
    return k_cache.view(FP8).float() * k_scale.unsqueeze(-1)


def nm_scale_bytes_unaligned(k_cache, k_scale, idx, idx2):
    # each row: D FP8 bytes, 1 pad byte, the fp32 scale's 4 bytes, 3 pad bytes.  Eager views each gathered
    # (contiguous) 4-byte row as fp32; the table itself starts at an odd byte, so it has no fp32 view
    n = k_cache.shape[0]
    pad = torch.zeros(n, 1, dtype=torch.uint8, device=k_cache.device)
    rows = torch.cat([k_cache, pad, k_scale.view(torch.uint8).reshape(n, 4), pad, pad, pad], dim=1)
    values, scale_bytes = rows[:, : k_cache.shape[1]], rows[:, k_cache.shape[1] + 1: k_cache.shape[1] + 5]
    return values[idx].view(FP8).float() * scale_bytes[idx].view(torch.float32)


NEAR_MISSES = [nm_scale_bytes_unaligned, nm_scale_other_index, nm_per_channel_scale, nm_scale_along_tokens,
               nm_bf16_arithmetic, nm_e5m2, nm_not_gathered]


@pytest.mark.parametrize("fn", NEAR_MISSES, ids=lambda f: f.__name__)
def test_near_miss_not_rewritten(fresh, fn):
    g = torch.Generator().manual_seed(0)
    q, s = quantize_e4m3(torch.randn(40, D, generator=g))
    s = s.squeeze(-1)
    idx = torch.randint(0, 40, (D,), generator=g)  # n == D, so the along-tokens scale broadcasts
    idx2 = torch.randint(0, 40, (D,), generator=g)
    with torch.no_grad():
        out = torch.compile(fn)(q, s, idx, idx2)
        ref = fn(q, s, idx, idx2)
    assert matches("gather_dequant") == {}, matches("gather_dequant")
    torch.testing.assert_close(out, ref, equal_nan=True)  # stock Inductor: bf16 casts may round differently


@pytest.mark.parametrize("fn", [nm_scale_other_index, nm_scale_along_tokens, nm_bf16_arithmetic],
                         ids=lambda f: f.__name__)
def test_near_miss_reason_recorded(fresh, fn):
    q, s = quantize_e4m3(torch.randn(40, D))
    idx = torch.randint(0, 40, (D,))
    with torch.no_grad():
        torch.compile(fn)(q, s.squeeze(-1), idx, idx.flip(0))
    from dsa_inductor.report import _STATS

    assert sum(_STATS["gather_dequant"].rejections.values()) >= 1, fresh.report()


def fold_miss_nonzero_fill(k_cache, k_scale, slots):
    idx = slots.clamp(min=0)
    k = k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)
    return torch.where((slots < 0).unsqueeze(-1), 1.0, k)  # not a zero: stays a where


def fold_miss_mask_along_d(k_cache, k_scale, slots):
    idx = slots.clamp(min=0)
    k = k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)
    return k.masked_fill(k_cache[idx] == 0, 0.0)  # a per-element mask: stays a where


def fold_miss_used_twice(k_cache, k_scale, slots):
    idx = slots.clamp(min=0)
    k = k_cache[idx].view(FP8).float() * k_scale[idx].unsqueeze(-1)
    return k.to(torch.bfloat16), k.sum()  # the fp32 result has another consumer: no out_dtype fold


@pytest.mark.parametrize("fn", [fold_miss_nonzero_fill, fold_miss_mask_along_d, fold_miss_used_twice],
                         ids=lambda f: f.__name__)
def test_folds_only_when_exact(fresh, fn):
    g = torch.Generator().manual_seed(1)
    q, s = quantize_e4m3(torch.randn(24, D, generator=g))
    slots = torch.tensor([5, -1, 23, 0, -1, 7])
    with torch.no_grad():
        out = torch.compile(fn, dynamic=True)(q, s.squeeze(-1), slots)
        ref = fn(q, s.squeeze(-1), slots)
    for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        if o.dim() == 0:
            torch.testing.assert_close(o, r)
        else:
            assert_same(o, r)
    assert matches("gather_dequant") == {"u8_after:idx1:token:raw": 1}, matches("gather_dequant")
    assert not any(("zero_negative" in n or "drop" in n or "out_dtype" in n) for n in _notes()), _notes()
