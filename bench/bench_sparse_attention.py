"""Top-k sparse MLA attention at DeepSeek-V3.2 prefill shapes: T = 2048, H = 128, K = 2048, dqk = 576, dv = 512, bf16.

Two eager spellings (the rule rewrites both into ``dsa_inductor::sparse_attention``):

* the dense-mask form as transformers' ``DeepseekV32Attention`` writes it: ``ones(B, S, T).scatter(-1,
  topk_indices, False)``, combined with the causal mask, dense matmul / masked fp32 softmax / matmul, with
  the MLA latent ``kv`` [B, T, 576] expanded over the heads and ``v = kv[..., :512]``.  The indices are
  the indexer's: ``topk`` of causally masked random index scores, so row ``s`` selects its ``s + 1``
  causal keys first and then causal-future keys that the causal mask hides (T = K: every key is picked);
* the gather form (``kv[b, topk_indices]``, einsum, ``masked_fill(topk_indices == -1)``, softmax, einsum)
  with every selected key valid (a random permutation of the T keys per row): the kernel's raw throughput.

TFLOP/s use the issue's count, ``2 * S * H * K * (dqk + dv)`` (all K selected keys), for every column;
stock torch.compile of the dense-mask form is the issue's 152 TFLOP/s (7689 us).  In the causal case half
of the selected keys are hidden, and our kernel skips key tiles with no valid key, so its TFLOP/s there
count work it did not need to do; the gather case has none to skip.
"""

from __future__ import annotations

import torch

import harness
from dsa_inductor.lowerings.sparse_attention import attention_mismatch
from harness import Case

NEG_INF = float("-inf")
S = T = K = 2048
H, DQK, DV = 128, 576, 512
SCALE = DQK ** -0.5


def dense_mask_mla(q, kv, topk_indices):
    """q [B, S, H, 576], kv [B, T, 576] (latent shared by the heads), topk_indices [B, S, K] int32."""
    b, s, h, d = q.shape
    t = kv.shape[1]
    index_mask = torch.ones(b, s, t, dtype=torch.bool, device=q.device).scatter(-1, topk_indices.long(), False)
    causal = torch.arange(t, device=q.device)[None, :] <= torch.arange(s, device=q.device)[:, None]
    keep = (causal[None] & ~index_mask).unsqueeze(1)  # [B, 1, S, T]
    k = kv.unsqueeze(1).expand(b, h, t, d)
    v = kv[..., :DV].unsqueeze(1).expand(b, h, t, DV)
    scores = torch.matmul(q.transpose(1, 2), k.transpose(-1, -2)) * SCALE
    scores = scores.masked_fill(~keep, NEG_INF)
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v).transpose(1, 2)


def gather_mla(q, kv, topk_indices):
    b = q.shape[0]
    sel = kv[torch.arange(b, device=q.device)[:, None, None], topk_indices]  # [B, S, K, 576]
    scores = torch.einsum("bshd,bskd->bshk", q, sel) * SCALE
    scores = scores.masked_fill((topk_indices == -1).unsqueeze(2), NEG_INF)
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("bshk,bskd->bshd", p, sel[..., :DV])


def _check(args, eager, ours):
    return attention_mismatch(eager, ours)


def _inputs(device, causal: bool):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, S, H, DQK, device=device, dtype=torch.bfloat16, generator=g)
    kv = torch.randn(1, T, DQK, device=device, dtype=torch.bfloat16, generator=g)
    index_scores = torch.rand(1, S, T, device=device, generator=g)
    if causal:
        future = torch.arange(T, device=device)[None, :] > torch.arange(S, device=device)[:, None]
        index_scores = index_scores.masked_fill(future, NEG_INF)
    idx = index_scores.topk(K, dim=-1).indices.to(torch.int32)
    return q, kv, idx


FLOPS = 2.0 * S * H * K * (DQK + DV)


def cases(device="cuda"):
    kv_bytes = T * DQK * 2
    min_bytes = S * H * DQK * 2 + kv_bytes + S * K * 4 + S * H * DV * 2
    shape = f"S=T={T} H={H} K={K} dqk={DQK} dv={DV} bf16"
    return [
        Case("sparse_attention (dense-mask MLA, causal)", shape, dense_mask_mla, lambda: _inputs(device, True),
             min_bytes=min_bytes, flops=FLOPS, check=_check),
        Case("sparse_attention (gather MLA, all valid)", shape, gather_mla, lambda: _inputs(device, False),
             min_bytes=min_bytes, flops=FLOPS, check=_check),
    ]


def run_case(case: Case) -> harness.Result:
    """harness.run_case, with TFLOP/s (the issue's count) appended to the check column."""
    r = harness.run_case(case)
    tf = [case.flops / (us * 1e-6) / 1e12 for us in (r.eager_us, r.stock_us, r.ours_us)]
    r.problem = f"{r.problem or 'ok'}; TFLOP/s eager {tf[0]:.0f} / stock {tf[1]:.0f} / ours {tf[2]:.0f}"
    return r


device_times = harness.device_times  # bench/run.py takes GPU times after every wall-clock timing


if __name__ == "__main__":
    for c in cases():
        res = run_case(c)
        print(f"{c.idiom}: eager {res.eager_us:.0f} us, stock {res.stock_us:.0f} us, ours {res.ours_us:.0f} us, "
              f"matches {res.matches}; {res.problem}", flush=True)
