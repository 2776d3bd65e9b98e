"""Rule sparse_attention on CUDA's fused SDPA: transformers' bool mask ``causal & ~index_mask`` handed by
``F.scaled_dot_product_attention`` to ``aten._scaled_dot_product_cudnn_attention`` (additive bias
``where(keep, 0, -65504)``) or ``aten._scaled_dot_product_efficient_attention`` (``where(keep, 0, -inf)``,
padded to a multiple of 8 keys, sliced back, expanded over the heads).

CPU: the fused ops have no CPU kernel, but Dynamo and Inductor trace them (their meta kernels), and our
post-grad pass runs before anything executes.  The user functions below spell out what ATen's SDPA
composite emits on CUDA and call the fused op directly; compiled, they run only if the rule replaced the op
(the op's CPU path then runs), and are compared with ``sdpa_kernel_reference``, the same functions run
eagerly with a plain-torch stand-in for the fused kernel.  Near misses must keep the fused op (running them
on CPU then fails in that op, which the tests check) and record the reason.

CUDA (skipped without a GPU): ``F.scaled_dot_product_attention`` itself, compiled vs eager, at DeepSeek-like
head dims in bf16 and fp16, static and dynamic S; and a row with no kept key on each backend.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from conftest import CUDA, matches
from dsa_inductor.lowerings.sparse_attention import EMPTY_ZERO, attention_mismatch
from test_sparse_attention_rule import DQK, DV, H, inputs

aten = torch.ops.aten
NEG_INF = float("-inf")
OP = torch.ops.dsa_inductor.sparse_attention.default
CUDNN = aten._scaled_dot_product_cudnn_attention
EFFICIENT = aten._scaled_dot_product_efficient_attention


# ---- what ATen's SDPA composite emits on CUDA, spelled out ---------------------------------------------------

def causal_keep(q, k, topk_indices):
    """transformers' mask: ``kv_idx <= q_idx`` (+ past) expanded over the batch, ``& ~index_mask``: [B, 1, S, T]."""
    b, _, s, _ = q.shape
    t = k.shape[2]
    q_idx = torch.arange(s, device=q.device) + (t - s)
    kv_idx = torch.arange(t, device=q.device)
    causal = (kv_idx[None, None, None, :] <= q_idx[None, None, :, None]).expand(b, 1, s, t)
    index_mask = torch.ones(b, s, t, dtype=torch.bool, device=q.device).scatter(-1, topk_indices.long(), False)
    return causal & ~index_mask.unsqueeze(1)


def bool_to_bias(keep, dtype, fill):
    """``convert_boolean_attn_mask_``: ``where(mask, 0, fill)`` in the query dtype."""
    return torch.where(keep, torch.zeros((), dtype=dtype, device=keep.device), fill)


def efficient_bias(bias, q, k):
    """``preprocess_mask``: pad the key dim to a multiple of 8, slice back, expand to [B, H, S, T]."""
    t = bias.shape[-1]
    bias = torch.constant_pad_nd(bias, [0, 8 - t % 8])[..., :t]
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def cudnn_sdpa(q, k, v, topk_indices, op=CUDNN):
    bias = bool_to_bias(causal_keep(q, k, topk_indices), q.dtype, -65504.0)
    return op(q, k, v, bias, False, 0.0, False, False, scale=0.3)[0]


def efficient_sdpa(q, k, v, topk_indices, op=EFFICIENT):
    """-inf fill, the alignment pad, the default scale 1/sqrt(Dqk)."""
    bias = efficient_bias(bool_to_bias(causal_keep(q, k, topk_indices), q.dtype, NEG_INF), q, k)
    return op(q, k, v, bias, False)[0]


def efficient_sdpa_not(q, k, v, topk_indices, op=EFFICIENT):
    """Older torch's conversion: ``where(~mask, -inf, 0)``; no pad (an aligned bias), compute_log_sumexp set
    with the logsumexp unused."""
    keep = causal_keep(q, k, topk_indices)
    bias = torch.where(~keep, NEG_INF, torch.zeros((), dtype=q.dtype))
    return op(q, k, v, bias.expand(q.shape[0], q.shape[1], -1, -1), True, scale=0.3)[0]


def cudnn_sdpa_mla(q, kv, topk_indices, op=CUDNN):
    """One latent expanded over the heads, v its leading DV dims (MLA)."""
    b, h, s, d = q.shape
    t = kv.shape[1]
    k = kv.unsqueeze(1).expand(b, h, t, d)
    v = kv[..., :DV].unsqueeze(1).expand(b, h, t, DV)
    bias = bool_to_bias(causal_keep(q, k, topk_indices), q.dtype, -65504.0)
    return op(q, k, v, bias, False, 0.0, False, False, scale=0.3)[0]


def sdpa_kernel_reference(q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False,
                          return_debug_mask=False, *, scale=None):
    """Plain-torch stand-in for the fused kernels: fp32 ``softmax(q k^T * scale + bias) @ v``, and 0 for a query
    with no kept key (SDPA's convention; the efficient kernel's result with -inf, the rule's documented
    result for cuDNN's finite fill)."""
    assert dropout_p == 0.0 and not is_causal
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q.float() @ k.float().transpose(-1, -2) * scale + attn_bias.float()
    p = torch.softmax(logits, dim=-1)
    empty = (attn_bias < -1000).all(dim=-1, keepdim=True)
    out = torch.where(empty, 0.0, p.to(v.dtype).float() @ v.float())
    return (out.to(q.dtype),)


def static_heads(*tensors):
    """A model's head count and head dims are static (the default scale is 1/sqrt(Dqk)); S and T stay dynamic."""
    for x in tensors:
        torch._dynamo.mark_static(x, x.dim() - 1)
        if x.dim() == 4:
            torch._dynamo.mark_static(x, 1)


# fn -> (input kind, {dtype: variant})
CASES = {
    cudnn_sdpa: ("dense_heads", {torch.bfloat16: "dense_mask:per_head_kv:sdpa_cudnn",
                                 torch.float16: "dense_mask:per_head_kv:sdpa_cudnn"}),
    efficient_sdpa: ("dense_heads", {torch.float32: "dense_mask:per_head_kv:sdpa_efficient",
                                     torch.bfloat16: "dense_mask:per_head_kv:sdpa_efficient"}),
    efficient_sdpa_not: ("dense_heads", {torch.float32: "dense_mask:per_head_kv:sdpa_efficient"}),
    cudnn_sdpa_mla: ("dense_mla", {torch.bfloat16: "dense_mask:mla:sdpa_cudnn"}),
}
PARAMS = [(fn, dt) for fn, (_, variants) in CASES.items() for dt in variants]


@pytest.mark.parametrize("fn,dtype", PARAMS, ids=lambda p: getattr(p, "__name__", str(p)))
def test_compiled_equals_kernel_reference(fresh, fn, dtype):
    kind, variants = CASES[fn]
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    torch._dynamo.utils.counters.clear()

    @settings(max_examples=10)
    @given(inputs(kind, dtype, "cpu"))
    def check(args):
        static_heads(*args[:-1])
        with torch.no_grad():
            out, ref = compiled(*args), fn(*args, op=sdpa_kernel_reference)
        why = attention_mismatch(ref, out)
        assert why is None, why

    check()
    assert matches("sparse_attention") == {variants[dtype]: matches("sparse_attention")[variants[dtype]]}, \
        fresh.report()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # static, then dynamic


def _rewritten_graph(fn, args):
    """Compile ``fn`` and return the post-grad graph as our pass left it (Inductor's post pass sees it next)."""
    seen = []
    with torch._inductor.config.patch(post_grad_custom_post_pass=lambda g: seen.append(g)):
        with torch.no_grad():
            torch.compile(fn, fullgraph=True)(*args)
    return seen[-1]


def _example(kind="dense_heads", dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s, t, k = 2, 6, 9, 4
    idx = torch.rand(b, s, t, generator=g).argsort(-1)[..., :k]
    q = torch.randn(b, H, s, DQK, generator=g).to(dtype)
    if kind == "dense_mla":
        return q, torch.randn(b, t, DQK, generator=g).to(dtype), idx
    return q, torch.randn(b, H, t, DQK, generator=g).to(dtype), torch.randn(b, H, t, DV, generator=g).to(dtype), idx


@pytest.mark.parametrize("fn,scale", [(cudnn_sdpa, 0.3), (efficient_sdpa, DQK ** -0.5), (cudnn_sdpa_mla, 0.3)],
                         ids=lambda p: getattr(p, "__name__", str(p)))
def test_one_fused_op_with_row_ends(fresh, fn, scale):
    """scatter + mask + fused SDPA -> one sparse_attention call: the arange causal mask as row_ends, no
    mask, SDPA's empty-row convention, the op's scale; the fused SDPA op is gone."""
    kind = CASES[fn][0]
    args = _example(kind, torch.float32 if fn is efficient_sdpa else torch.bfloat16)
    graph = _rewritten_graph(fn, args)
    calls = [n for n in graph.nodes if n.target is OP]
    assert len(calls) == 1, graph
    q, k, v, idx, row_ends, keep_mask, sink, op_scale, dv, empty_row = calls[0].args[:10]
    assert row_ends is not None and keep_mask is None and sink is None
    assert empty_row == EMPTY_ZERO and op_scale == pytest.approx(scale, rel=1e-12)
    assert (v is None) == (fn is cudnn_sdpa_mla) and dv == DV
    assert not any(n.target in (CUDNN.default, EFFICIENT.default, aten.scatter.value) for n in graph.nodes)
    assert "keep mask -> row_ends" in fresh.report()
    assert ("finite mask fill" in fresh.report()) == (fn is not efficient_sdpa)  # the empty-row caveat


# ---- near misses: the fused op stays (and fails on CPU), with the reason in the report -------------------------

def nm_scatter_true(q, k, v, topk_indices):
    b, _, s, _ = q.shape
    t = k.shape[2]
    index_mask = torch.ones(b, s, t, dtype=torch.bool).scatter(-1, topk_indices, True)
    bias = bool_to_bias(~index_mask.unsqueeze(1), q.dtype, -65504.0)
    return CUDNN(q, k, v, bias, False, 0.0, False, False, scale=0.3)[0]


def nm_logsumexp_used(q, k, v, topk_indices):
    bias = bool_to_bias(causal_keep(q, k, topk_indices), q.dtype, -65504.0)
    out, lse = CUDNN(q, k, v, bias, True, 0.0, False, False, scale=0.3)[:2]
    return out, lse


def nm_dropout(q, k, v, topk_indices):
    bias = efficient_bias(bool_to_bias(causal_keep(q, k, topk_indices), q.dtype, NEG_INF), q, k)
    return EFFICIENT(q, k, v, bias, False, 0.1, scale=0.3)[0]


def nm_is_causal(q, k, v, topk_indices):
    bias = bool_to_bias(causal_keep(q, k, topk_indices), q.dtype, -65504.0)
    return CUDNN(q, k, v, bias, False, 0.0, True, False, scale=0.3)[0]


def nm_bias_reused(q, k, v, topk_indices):
    bias = bool_to_bias(causal_keep(q, k, topk_indices), q.dtype, -65504.0)
    return CUDNN(q, k, v, bias, False, 0.0, False, False, scale=0.3)[0], bias.float().sum()


def nm_bias_not_zero(q, k, v, topk_indices):
    keep = causal_keep(q, k, topk_indices)
    bias = torch.where(keep, torch.full((), 0.5, dtype=q.dtype), -65504.0)
    return CUDNN(q, k, v, bias, False, 0.0, False, False, scale=0.3)[0]


def nm_small_fill(q, k, v, topk_indices):
    bias = bool_to_bias(causal_keep(q, k, topk_indices), q.dtype, -10.0)
    return CUDNN(q, k, v, bias, False, 0.0, False, False, scale=0.3)[0]


def nm_cudnn_neg_inf(q, k, v, topk_indices):
    bias = bool_to_bias(causal_keep(q, k, topk_indices), q.dtype, NEG_INF)
    return CUDNN(q, k, v, bias, False, 0.0, False, False, scale=0.3)[0]


def nm_bias_plus_alibi(q, k, v, topk_indices):
    bias = bool_to_bias(causal_keep(q, k, topk_indices), q.dtype, NEG_INF)
    bias = bias + torch.arange(k.shape[2], dtype=q.dtype)  # another additive term
    return EFFICIENT(q, k, v, bias.expand(q.shape[0], q.shape[1], -1, -1), False, scale=0.3)[0]


NEAR_MISSES = {  # fn -> the reason report() gives
    nm_scatter_true: "scattered with True",
    nm_logsumexp_used: "logsumexp",
    nm_dropout: "dropout_p = 0.1",
    nm_is_causal: "is_causal=True",
    nm_bias_reused: "used elsewhere",
    nm_bias_not_zero: "not a -inf masking",
    nm_small_fill: "neither -inf nor <= -1024",
    nm_cudnn_neg_inf: "cuDNN attention with a -inf mask",
    nm_bias_plus_alibi: "do not feed a softmax",
}


@pytest.mark.parametrize("fn", list(NEAR_MISSES), ids=lambda f: f.__name__)
def test_near_miss_keeps_fused_op(fresh, fn):
    from dsa_inductor.report import _STATS

    args = _example()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="_scaled_dot_product_(cudnn|efficient)"):
        torch.compile(fn)(*args)  # the fused op is still there, and has no CPU kernel
    assert matches("sparse_attention") == {}, fresh.report()
    reasons = _STATS["sparse_attention"].rejections
    assert any(NEAR_MISSES[fn] in r for r in reasons), reasons


# ---- CUDA: F.scaled_dot_product_attention itself ----------------------------------------------------------------

GPU_H, GPU_DQK, GPU_DV, GPU_K = 8, 192, 128, 32  # DeepSeek-V3.2's head dims, fewer heads, a small top-k


def deepseek_style_sdpa(q, k, v, topk_indices):
    """transformers' ``DeepseekV32Attention`` sdpa path after the indexer: bool ``causal & ~index_mask``."""
    keep = causal_keep(q, k, topk_indices)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=GPU_DQK ** -0.5)


def _gpu_inputs(s, dtype, seed, empty_rows=False):
    """Per-head q/k/v and the indexer's top-k of causally masked scores (each query keeps a key), or with
    ``empty_rows`` only keys in each query's future for the first two queries (no kept key)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(2, GPU_H, s, GPU_DQK, device="cuda", generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(2, GPU_H, s, GPU_DV, device="cuda", generator=g, dtype=dtype)
    scores = torch.randn(2, s, s, device="cuda", generator=g)
    causal = torch.arange(s, device="cuda")[None, :] <= torch.arange(s, device="cuda")[:, None]
    idx = scores.masked_fill(~causal, NEG_INF).topk(min(GPU_K, s), dim=-1).indices
    if empty_rows:
        idx[:, :2] = torch.arange(s - min(GPU_K, s), s, device="cuda")  # the last keys: the future of queries 0, 1
    return q, k, v, idx


def _backend(q, k, v, idx):
    from torch.nn.attention import SDPBackend

    choice = torch._fused_sdp_choice(q, k, v, causal_keep(q, k, idx), 0.0, False)
    return {SDPBackend.CUDNN_ATTENTION.value: "sdpa_cudnn",
            SDPBackend.EFFICIENT_ATTENTION.value: "sdpa_efficient"}.get(choice, f"backend {choice}")


@pytest.mark.skipif(not CUDA, reason="needs CUDA: the fused SDPA kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_sdpa_compiled_equals_eager(fresh, dtype, dynamic):
    compiled = torch.compile(deepseek_style_sdpa, dynamic=dynamic, fullgraph=True)
    lengths = [64, 100, 256] if dynamic else [100]
    backends = set()
    for i, s in enumerate(lengths):
        args = _gpu_inputs(s, dtype, seed=i)
        static_heads(*args[:3])
        backends.add(_backend(*args))
        with torch.no_grad():
            out, ref = compiled(*args), deepseek_style_sdpa(*args)
        why = attention_mismatch(ref, out)
        assert why is None, f"S={s}: {why}"
    assert all(b.startswith("sdpa_") for b in backends), f"SDPA picked {backends}: no fused kernel with a mask"
    assert set(matches("sparse_attention")) == {f"dense_mask:per_head_kv:{b}" for b in backends}, fresh.report()


@pytest.mark.skipif(not CUDA, reason="needs CUDA: the fused SDPA kernels")
@pytest.mark.parametrize("backend,dtype", [("EFFICIENT_ATTENTION", torch.float32),
                                           ("EFFICIENT_ATTENTION", torch.bfloat16),
                                           ("CUDNN_ATTENTION", torch.bfloat16)])
def test_cuda_sdpa_query_without_kept_key(fresh, backend, dtype):
    """Queries 0 and 1 keep no key.  Compiled gives 0 there (SDPA's convention); eager's efficient kernel too
    (-inf fill); eager's cuDNN (finite fill) gives the unmasked attention over all T keys, the divergence the
    rule's docstring states (if this part fails, cuDNN changed and the docstring must follow).  The other
    rows equal eager."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, idx = _gpu_inputs(64, dtype, seed=7, empty_rows=True)
    with sdpa_kernel([getattr(SDPBackend, backend)]), torch.no_grad():
        out = torch.compile(deepseek_style_sdpa, fullgraph=True)(q, k, v, idx)
        ref = deepseek_style_sdpa(q, k, v, idx)
    kind = "sdpa_cudnn" if backend == "CUDNN_ATTENTION" else "sdpa_efficient"
    assert matches("sparse_attention") == {f"dense_mask:per_head_kv:{kind}": 1}, fresh.report()
    assert torch.all(out[:, :, :2] == 0)
    why = attention_mismatch(ref[:, :, 2:], out[:, :, 2:])
    assert why is None, why
    if kind == "sdpa_efficient":
        assert torch.all(ref[:, :, :2] == 0)
    else:
        with torch.no_grad():
            unmasked = F.scaled_dot_product_attention(q[:, :, :2].float(), k.float(), v.float(), scale=GPU_DQK ** -0.5)
        why = attention_mismatch(unmasked.to(dtype), ref[:, :, :2])
        assert why is None, f"cuDNN's fully masked row is not the unmasked attention: {why}"
