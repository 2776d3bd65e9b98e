"""Rule causal_sdpa (dsa_inductor/patterns/causal_sdpa.py): a fused SDPA call whose bias is the plain causal mask
-> the same kernel with ``is_causal=True`` and no bias (issue 4's short-sequence shortcut, S <= index_topk).

CPU: the user functions spell out what ATen's SDPA composite emits on CUDA for transformers' bool mask
(``tests/test_sparse_attention_fused_sdpa.py`` does the same for the top-k form) and call the fused op directly;
``sdpa_standin.fused_sdpa_on_cpu`` gives that op a CPU kernel with PyTorch's ``is_causal`` semantics, so the
rewritten graph and the eager original both run and are compared.  CUDA (skipped without a GPU):
``F.scaled_dot_product_attention`` and transformers' ``DeepseekV32Attention`` at S <= index_topk, compiled
vs eager on the real kernels.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import CUDA, matches
from dsa_inductor.testing import attention_mismatch
from sdpa_standin import fused_sdpa_on_cpu

aten = torch.ops.aten
NEG_INF = float("-inf")
CUDNN = aten._scaled_dot_product_cudnn_attention
EFFICIENT = aten._scaled_dot_product_efficient_attention
H, DQK, DV = 2, 24, 16


# ---- what ATen emits on CUDA for transformers' mask, spelled out -----------------------------------------------

def causal(q, k, q_offset=0):
    """transformers' ``create_causal_mask``: ``kv_idx <= q_idx`` from aranges, expanded over the batch: [B, 1, S, T]."""
    b, _, s, _ = q.shape
    t = k.shape[2]
    q_idx = torch.arange(s, device=q.device) + q_offset
    kv_idx = torch.arange(t, device=q.device)
    return (kv_idx[None, None, None, :] <= q_idx[None, None, :, None]).expand(b, 1, s, t)


def short_prefill_keep(q, k):
    """``causal & ~index_mask`` once the top-k takes every key: the index mask is a constant False."""
    b, _, s, _ = q.shape
    index_mask = torch.zeros(b, s, k.shape[2], dtype=torch.bool, device=q.device)
    return causal(q, k) & ~index_mask[:, None]


def cudnn_bias(keep, dtype):
    return torch.where(keep, torch.zeros((), dtype=dtype, device=keep.device), -65504.0)  # convert_boolean_attn_mask_cudnn


def efficient_bias(keep, q, k):
    """-inf fill, padded to a multiple of 8 keys, sliced back, expanded over the heads (preprocess_mask)."""
    bias = torch.where(keep, torch.zeros((), dtype=q.dtype, device=q.device), NEG_INF)
    t = bias.shape[-1]
    bias = torch.constant_pad_nd(bias, [0, 8 - t % 8])[..., :t]
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def cudnn_short_prefill(q, k, v):
    return CUDNN(q, k, v, cudnn_bias(short_prefill_keep(q, k), q.dtype), False, 0.0, False, False, scale=0.3)[0]


def efficient_short_prefill(q, k, v):
    return EFFICIENT(q, k, v, efficient_bias(short_prefill_keep(q, k), q, k), False)[0]


def efficient_older_spelling(q, k, v):
    """``where(~mask, -inf, 0)`` (older torch), an aligned bias, the logsumexp computed and returned too."""
    bias = torch.where(~causal(q, k), NEG_INF, torch.zeros((), dtype=q.dtype))
    out, lse = EFFICIENT(q, k, v, bias.expand(q.shape[0], q.shape[1], -1, -1), True, scale=0.3)[:2]
    return out, lse[..., :q.shape[2]]


def cudnn_mirrored_comparison(q, k, v):
    """``q_idx >= kv_idx``: the comparison written the other way round; the logsumexp is returned too."""
    s, t = q.shape[2], k.shape[2]
    keep = (torch.arange(s)[:, None] >= torch.arange(t)[None, :])[None, None].expand(q.shape[0], 1, s, t)
    return CUDNN(q, k, v, cudnn_bias(keep, q.dtype), True, 0.0, False, False, scale=0.3)[:2]


def cudnn_lt_plus_one(q, k, v):
    """``kv_idx < q_idx + 1``: the same mask with a strict bound."""
    s, t = q.shape[2], k.shape[2]
    keep = (torch.arange(t)[None, :] < torch.arange(s)[:, None] + 1)[None, None]
    return CUDNN(q, k, v, cudnn_bias(keep, q.dtype), False, 0.0, False, False, scale=0.3)[0]


POSITIVE = {  # fn -> (dtypes, variant)
    cudnn_short_prefill: ((torch.bfloat16, torch.float16), "sdpa_cudnn:causal_bias"),
    efficient_short_prefill: ((torch.float32, torch.bfloat16), "sdpa_efficient:causal_bias"),
    efficient_older_spelling: ((torch.float32,), "sdpa_efficient:causal_bias"),
    cudnn_mirrored_comparison: ((torch.bfloat16,), "sdpa_cudnn:causal_bias"),
    cudnn_lt_plus_one: ((torch.bfloat16,), "sdpa_cudnn:causal_bias"),
}
PARAMS = [(fn, dt) for fn, (dts, _) in POSITIVE.items() for dt in dts]


def qkv(b, s, dtype, seed=0, t=None):
    g = torch.Generator().manual_seed(seed)
    t = s if t is None else t
    q = torch.randn(b, H, s, DQK, generator=g).to(dtype)
    k = torch.randn(b, H, t, DQK, generator=g).to(dtype)
    v = torch.randn(b, H, t, DV, generator=g).to(dtype)
    return q, k, v


def _outs(x):
    return x if isinstance(x, (tuple, list)) else (x,)


@pytest.mark.parametrize("fn,dtype", PARAMS, ids=lambda p: getattr(p, "__name__", str(p)))
def test_compiled_equals_eager(fresh, fn, dtype):
    """One dynamic compile, many batch sizes and lengths, compiled == eager on the stand-in kernels.  q, k and v
    come from one fused projection ``x`` as in a model, so their length is one symbol (S == T provably)."""

    def from_fused_projection(x):
        return fn(x[..., :DQK], x[..., DQK:2 * DQK], x[..., 2 * DQK:])

    compiled = torch.compile(from_fused_projection, dynamic=True, fullgraph=True)
    torch._dynamo.utils.counters.clear()

    @settings(max_examples=12)
    @given(st.integers(1, 3), st.integers(2, 40), st.integers(0, 2 ** 16))
    def check(b, s, seed):
        x = torch.cat(qkv(b, s, dtype, seed), dim=-1)
        torch._dynamo.mark_static(x, 1)
        torch._dynamo.mark_static(x, 3)
        with torch.no_grad(), fused_sdpa_on_cpu():
            out, ref = compiled(x), from_fused_projection(x)
        for o, r in zip(_outs(out), _outs(ref)):
            why = attention_mismatch(r, o)
            assert why is None, f"B={b} S={s}: {why}"

    check()
    variant = POSITIVE[fn][1]
    assert set(matches("causal_sdpa")) == {variant}, fresh.report()
    # static (or batch 1), then dynamic; the efficient kernel's meta adds a guard on S % 32 == 0 when the first
    # dynamic example's S is a multiple of 32 (stock torch.compile compiles the same third graph)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2 + variant.startswith("sdpa_efficient")


def _rewritten_graph(fn, args):
    """Compile and run ``fn`` (stand-in kernels); return the post-grad graph as our pass left it."""
    seen = []
    with torch._inductor.config.patch(post_grad_custom_post_pass=lambda g: seen.append(g)):
        with torch.no_grad(), fused_sdpa_on_cpu():
            torch.compile(fn, fullgraph=True)(*args)
    return seen[-1]


@pytest.mark.parametrize("fn", [cudnn_short_prefill, efficient_short_prefill], ids=lambda f: f.__name__)
def test_bias_gone_is_causal_set(fresh, fn):
    """The op keeps its kernel, loses the bias (no [S, T] tensor, no mask arithmetic) and sets is_causal."""
    graph = _rewritten_graph(fn, qkv(2, 9, torch.bfloat16))
    ops = [n for n in graph.nodes if n.target in (CUDNN.default, EFFICIENT.default)]
    assert len(ops) == 1, graph
    schema = {a.name: i for i, a in enumerate(ops[0].target._schema.arguments)}
    args = {name: (ops[0].args[i] if i < len(ops[0].args) else ops[0].kwargs.get(name))
            for name, i in schema.items()}
    assert args["attn_bias"] is None and args["is_causal"] is True, ops[0]
    assert not any(n.target in (aten.where.self, aten.le.Tensor, aten.constant_pad_nd.default) for n in graph.nodes)
    assert ("finite mask fill" in fresh.report()) == (fn is cudnn_short_prefill)


# ---- near misses: the bias stays, with the reason in the report -------------------------------------------------

def nm_offset(q, k, v):
    """``kv <= q + 1``: every query also sees the next key (not causal)."""
    return CUDNN(q, k, v, cudnn_bias(causal(q, k, q_offset=1), q.dtype), False, 0.0, False, False, scale=0.3)[0]


def nm_sliding_window(q, k, v):
    """causal and at most 4 keys back (DeepSeek-V4's sliding window): a window, not is_causal."""
    s, t = q.shape[2], k.shape[2]
    q_idx, kv_idx = torch.arange(s)[:, None], torch.arange(t)[None, :]
    keep = ((kv_idx <= q_idx) & (kv_idx > q_idx - 4))[None, None]
    return CUDNN(q, k, v, cudnn_bias(keep, q.dtype), False, 0.0, False, False, scale=0.3)[0]


def nm_anti_causal(q, k, v):
    """``kv >= q``: the future keys."""
    s, t = q.shape[2], k.shape[2]
    keep = (torch.arange(t)[None, :] >= torch.arange(s)[:, None])[None, None]
    return CUDNN(q, k, v, cudnn_bias(keep, q.dtype), False, 0.0, False, False, scale=0.3)[0]


def nm_bottom_right(q, k, v):
    """Chunked prefill with a cache: S < T, query i at position T - S + i (bottom-right), is_causal is top-left."""
    return CUDNN(q, k, v, cudnn_bias(causal(q, k, q_offset=k.shape[2] - q.shape[2]), q.dtype), False, 0.0, False,
                 False, scale=0.3)[0]


def nm_padding_mask(q, k, v, pad):
    """causal & a padding mask (left padding): the padding part is data, not is_causal."""
    return CUDNN(q, k, v, cudnn_bias(causal(q, k) & pad[:, None, None, :], q.dtype), False, 0.0, False, False,
                 scale=0.3)[0]


def nm_given_mask(q, k, v, keep):
    return CUDNN(q, k, v, cudnn_bias(keep, q.dtype), False, 0.0, False, False, scale=0.3)[0]


def nm_position_ids(q, k, v, pos):
    """query positions read from a tensor (position_ids), not an arange: their order is data."""
    keep = (torch.arange(k.shape[2])[None, None, None, :] <= pos[None, None, :, None])
    return CUDNN(q, k, v, cudnn_bias(keep, q.dtype), False, 0.0, False, False, scale=0.3)[0]


def nm_small_fill(q, k, v):
    bias = torch.where(causal(q, k), torch.zeros((), dtype=q.dtype), -10.0)
    return CUDNN(q, k, v, bias, False, 0.0, False, False, scale=0.3)[0]


def nm_bias_plus_alibi(q, k, v):
    bias = torch.where(causal(q, k), torch.zeros((), dtype=q.dtype), NEG_INF) + torch.arange(k.shape[2],
                                                                                            dtype=q.dtype)
    return EFFICIENT(q, k, v, bias.expand(q.shape[0], q.shape[1], -1, -1), False, scale=0.3)[0]


def nm_already_causal(q, k, v):
    return CUDNN(q, k, v, cudnn_bias(causal(q, k), q.dtype), False, 0.0, True, False, scale=0.3)[0]


def _plain(dtype=torch.bfloat16):
    return lambda: qkv(2, 9, dtype)


def _with_extra(kind):
    def make():
        q, k, v = qkv(2, 9, torch.bfloat16)
        if kind == "pad":
            pad = torch.ones(2, 9, dtype=torch.bool)
            pad[0, :3] = False
            return q, k, v, pad
        if kind == "keep":
            return q, k, v, torch.ones(9, 9, dtype=torch.bool).tril()[None, None].expand(2, 1, 9, 9)
        return q, k, v, torch.arange(9)  # position_ids (the arange's values, but as data)
    return make


NEAR_MISSES = {  # name -> (fn, inputs, the reason report() gives, why a rewrite would be wrong)
    "offset": (nm_offset, _plain(), "has an offset", "each query also sees the next key"),
    "sliding_window": (nm_sliding_window, _plain(), "a window", "keys further back than the window are masked"),
    "anti_causal": (nm_anti_causal, _plain(), "a window", "kv >= q keeps the future keys"),
    "bottom_right": (nm_bottom_right, lambda: qkv(2, 5, torch.bfloat16, t=9), "not provably equal",
                     "S < T: the mask is bottom-right aligned, is_causal top-left"),
    "padding_mask": (nm_padding_mask, _with_extra("pad"), "not one arange comparison",
                     "a padding mask joins the causal one"),
    "given_mask": (nm_given_mask, _with_extra("keep"), "not one arange comparison",
                   "the mask is an input: its values are data"),
    "position_ids": (nm_position_ids, _with_extra("pos"), "not arange(S)",
                     "query positions come from a tensor"),
    "small_fill": (nm_small_fill, _plain(), "neither -inf nor", "masked keys keep a weight exp(-10)"),
    "bias_plus_alibi": (nm_bias_plus_alibi, _plain(torch.float32), "not where(mask, 0, fill)",
                        "another additive term besides the mask"),
    "already_causal": (nm_already_causal, _plain(), "is_causal=True already", "is_causal on top of the bias"),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_keeps_bias(fresh, name):
    from dsa_inductor.report import _STATS

    fn, make, reason, _ = NEAR_MISSES[name]
    args = make()
    with torch.no_grad(), fused_sdpa_on_cpu():
        out, ref = torch.compile(fn, fullgraph=True)(*args), fn(*args)
    why = attention_mismatch(ref, out)
    assert why is None, why
    assert matches("causal_sdpa") == {}, fresh.report()
    reasons = _STATS["causal_sdpa"].rejections
    assert any(reason in r for r in reasons), reasons


# ---- CUDA: the real fused kernels ---------------------------------------------------------------------------

def transformers_style_sdpa(x):
    """q, k, v from one fused projection ``x`` [B, H, S, 192 + 192 + 128] (one length symbol, as in a model)."""
    q, k, v = x[..., :192], x[..., 192:384], x[..., 384:]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=short_prefill_keep(q, k), scale=q.shape[-1] ** -0.5)


@pytest.mark.skipif(not CUDA, reason="needs CUDA: the fused SDPA kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_sdpa_compiled_equals_eager(fresh, dtype):
    compiled = torch.compile(transformers_style_sdpa, dynamic=True, fullgraph=True)
    for i, s in enumerate([64, 100, 256]):
        g = torch.Generator(device="cuda").manual_seed(i)
        x = torch.randn(2, 8, s, 512, device="cuda", dtype=dtype, generator=g)
        torch._dynamo.mark_static(x, 1)
        torch._dynamo.mark_static(x, 3)
        with torch.no_grad():
            out, ref = compiled(x), transformers_style_sdpa(x)
        why = attention_mismatch(ref, out)
        assert why is None, f"S={s}: {why}"
    assert sum(matches("causal_sdpa").values()) >= 1, fresh.report()


@pytest.mark.skipif(not CUDA, reason="needs CUDA: transformers' sdpa path reaches the fused kernels there")
def test_cuda_transformers_short_prefill_layer(fresh):
    """transformers' DeepseekV32Attention at S <= index_topk (small dims): the index mask folds away, the causal
    bias becomes is_causal, no [S, T] buffer is allocated, and the output equals eager."""
    import re
    import sys
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from bench_attention_layer import build, square_buffers
    from torch._inductor.utils import run_and_get_code

    s = 16
    _, fwd, _, args = build(True, s, "sdpa", "cuda", torch.bfloat16)
    with torch.no_grad():
        ref = fwd(*args)
        out, codes = run_and_get_code(torch.compile(fwd), *args)
    why = attention_mismatch(ref, out)
    assert why is None, why
    assert sum(matches("causal_sdpa").values()) == 1, fresh.report()
    assert square_buffers(codes, s) == [], square_buffers(codes, s)
    assert re.search(r"_scaled_dot_product_\w+_attention", "\n".join(codes))
