"""CPU stand-ins for CUDA's fused SDPA kernels, for tests of rules that rewrite calls of them.

``aten._scaled_dot_product_cudnn_attention`` and ``aten._scaled_dot_product_efficient_attention`` have meta
kernels (Dynamo and Inductor trace them on CPU) but no CPU kernel.  Inside ``fused_sdpa_on_cpu()`` they get one:
plain fp32 ``softmax(q k^T * scale + attn_bias) @ v`` with PyTorch's documented ``is_causal`` (the top-left
aligned mask ``torch.ones(S, T).tril()``), the result rounded to q's dtype, and the outputs the meta kernels
declare.  A rewritten graph (another ``attn_bias``, ``is_causal``) and the eager original then both run on
CPU and can be compared.  Outside the context the ops fail on CPU as before (tests/test_sparse_attention_fused
_sdpa.py relies on that).
"""

from __future__ import annotations

import contextlib
import math

import torch


def attention_reference(q, k, v, attn_bias, is_causal, scale):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q.float() @ k.float().transpose(-1, -2) * scale
    if attn_bias is not None:
        logits = logits + attn_bias.float()
    if is_causal:
        s, t = logits.shape[-2:]
        logits = logits.masked_fill(~torch.ones(s, t, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(logits, dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    return (p @ v.float()).to(q.dtype), lse


def _like(meta, value):
    """``value`` in a tensor laid out as the meta kernel's output ``meta`` (shape, strides, dtype)."""
    out = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype)
    out.copy_(value)
    return out


def _kernel(op):
    def kernel(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *rest, scale=None):
        assert dropout_p == 0.0
        meta_args = [x.to("meta") if isinstance(x, torch.Tensor) else x
                     for x in (query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, *rest)]
        metas = op(*meta_args, scale=scale)
        out, lse = attention_reference(query, key, value, attn_bias, is_causal, scale)
        results = [_like(metas[0], out)]
        for i, m in enumerate(metas[1:], 1):
            if i == 1 and m.numel():  # the logsumexp
                if m.dim() == lse.dim() + 1:  # cuDNN: [B, H, S, 1]
                    full = lse.unsqueeze(-1)
                else:  # efficient: [B, H, S rounded up to 32]
                    full = torch.full(m.shape, float("inf"))
                    full[..., :lse.shape[-1]] = lse
                results.append(_like(m, full))
            elif isinstance(m, torch.Tensor):
                results.append(torch.zeros(m.shape, dtype=m.dtype))
            else:
                results.append(m)
        return tuple(results)
    return kernel


@contextlib.contextmanager
def fused_sdpa_on_cpu():
    """Give the two fused SDPA ops a CPU kernel (``attention_reference``) while the context is open."""
    lib = torch.library.Library("aten", "IMPL")
    for name in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_efficient_attention"):
        lib.impl(name, _kernel(getattr(torch.ops.aten, name).default), "CPU")
    try:
        yield
    finally:
        lib._destroy()
