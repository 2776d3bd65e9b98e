"""transformers' ``DeepseekV32Indexer`` alone (real indexer dims): eager vs stock compile vs dsa_inductor,
time and peak GPU memory.

    python bench/bench_indexer_module.py            # CUDA: S = 8192, 64 heads, head dim 128, index_topk 2048
    python bench/bench_indexer_module.py --small    # CPU-sized check of the same code path (correctness only)
    python bench/bench_indexer_module.py --s 4096   # another prefill length

The benchmarked function is the indexer's forward as the model calls it: a causal bool mask built from
aranges (transformers' sdpa mask: ``kv_idx <= q_idx`` expanded over batch and heads, head 0 selected),
then ``DeepseekV32Indexer(hidden_states, q_resid, (cos, sin), mask, position_ids=None)``, which returns
the top-``index_topk`` token indices ``[B, S, index_topk]`` int32, **sorted by score** (the module returns
them, so their order is observable: the top-k writes values and sorts, and rows are not skipped as short;
inside the model, where the indices are only scattered into a mask, the order is relaxed).

What dsa_inductor runs: ``index_score`` (fused score, key tiles past each row's causal end skipped,
entries past the end left unwritten) -> ``masked_topk`` (range rows).  Intermediates:

* eager / stock: ``[B, S, H, T]`` fp32 per-head scores (S = 8192, H = 64: 17.2 GB), plus the broadcast
  matmul's fp32 copy of k; eager runs out of memory on an 80 GB H100 at S = 8192 (reported as OOM);
* ours: one ``[B, S, T]`` fp32 score buffer (S = T = 8192: 268 MB, half of it never written) and the
  top-k's ``[B, S, k]`` values and indices.  The score buffer is the one [B, S, T] intermediate left:
  the top-k reads it back once (its range part, ~134 MB at 3.35 TB/s: ~40 us of the total).

Peak memory = ``torch.cuda.max_memory_allocated()`` during one call minus the memory allocated before it
(weights and inputs excluded).  Times are ``do_bench`` medians.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import dsa_inductor  # noqa: E402
from harness import Case, Result  # noqa: E402


def indexer_config(small: bool):
    from transformers import DeepseekV32Config

    if small:
        return DeepseekV32Config(hidden_size=64, q_lora_rank=48, index_n_heads=4, index_head_dim=32,
                                 qk_rope_head_dim=8, index_topk=16, num_attention_heads=4,
                                 num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, v_head_dim=16)
    # DeepSeek-V3.2's indexer: 64 heads of dim 128 (64 of them rotary), index_topk 2048.
    return DeepseekV32Config(hidden_size=7168, q_lora_rank=1536, index_n_heads=64, index_head_dim=128,
                             qk_rope_head_dim=64, index_topk=2048)


def build(small: bool, s: int, device: str, dtype: torch.dtype):
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer

    cfg = indexer_config(small)
    torch.manual_seed(0)
    indexer = DeepseekV32Indexer(cfg, layer_idx=0).to(device=device, dtype=dtype).eval()
    b = 1
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(b, s, cfg.hidden_size, device=device, generator=g, dtype=dtype)
    q_resid = torch.randn(b, s, cfg.q_lora_rank, device=device, generator=g, dtype=dtype)
    rope = cfg.qk_rope_head_dim
    inv = 1.0 / (10000 ** (torch.arange(0, rope, 2, device=device).float() / rope))
    ang = torch.arange(s, device=device).float()[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def indexer_forward(hidden, q_resid, cos, sin):
        bsz, seq = hidden.shape[:2]
        q_idx = torch.arange(seq, device=hidden.device)
        kv_idx = torch.arange(seq, device=hidden.device)
        mask = (kv_idx[None, None, None, :] <= q_idx[None, None, :, None]).expand(bsz, 1, seq, seq)
        return indexer(hidden, q_resid, (cos, sin), mask[:, 0], None)

    return cfg, indexer, indexer_forward, (hidden, q_resid, cos, sin)


def reference_scores(indexer, hidden, q_resid, cos, sin):
    """The indexer's causal-masked index scores, computed row block by row block (no [B, S, H, T])."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

    b, s, _ = hidden.shape
    q = indexer.wq_b(q_resid).view(b, s, indexer.n_heads, indexer.head_dim)
    r = indexer.qk_rope_head_dim
    q_rot, q_pass = torch.split(q, [r, indexer.head_dim - r], dim=-1)
    k = indexer.k_norm(indexer.wk(hidden)).unsqueeze(2)
    k_rot, k_pass = torch.split(k, [r, indexer.head_dim - r], dim=-1)
    q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], -1)
    k = torch.cat([k_rot, k_pass], -1).squeeze(2)
    w = indexer.weights_proj(hidden).float() * indexer.n_heads ** -0.5
    out = torch.empty(b, s, s, device=hidden.device)
    step = 256
    for i in range(0, s, step):
        x = torch.relu(torch.einsum("bshd,btd->bsht", q[:, i:i + step].float(), k.float()) * indexer.softmax_scale)
        out[:, i:i + step] = torch.einsum("bsht,bsh->bst", x, w[:, i:i + step])
    pos = torch.arange(s, device=hidden.device)
    return out.masked_fill(pos[None, None, :] > pos[None, :, None], float("-inf"))


def check_selection(masked, k, idx) -> str | None:
    """Valid distinct indices whose reference scores match the reference top-k within rounding (the fused
    and eager scores round differently; near-ties may swap)."""
    idx = idx.long()
    if idx.shape != (*masked.shape[:-1], k):
        return f"indices shape {tuple(idx.shape)}"
    if (idx < 0).any() or (idx >= masked.shape[-1]).any():
        return "index out of range"
    srt = idx.sort(-1).values
    if (srt[..., 1:] == srt[..., :-1]).any():
        return "duplicate index"
    picked = masked.gather(-1, idx).sort(-1, descending=True).values
    ref = masked.topk(k, -1).values
    fin = torch.isfinite(ref) & torch.isfinite(picked)
    if not torch.equal(torch.isfinite(ref), torch.isfinite(picked)):
        return "a masked (-inf) position selected where an in-range one should be"
    scale = ref[fin].abs().max().clamp(min=1e-6) if fin.any() else torch.tensor(1.0)
    err = ((picked - ref).abs()[fin].max() / scale).item() if fin.any() else 0.0
    return None if err < 1e-2 else f"selected scores differ from the top-k by {err:.3g} (relative)"


def _measure(fn, args, cuda: bool):
    """(median us, peak bytes above the pre-call allocation) or (None, None) on OOM."""
    try:
        if not cuda:
            t0 = time.perf_counter()
            out = fn(*args)
            return (time.perf_counter() - t0) * 1e6, None, out
        import triton.testing

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn(*args)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        us = triton.testing.do_bench(lambda: fn(*args), warmup=5, rep=50, return_mode="median") * 1e3
        return us, peak, out
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None, None


def run(small: bool = False, s: int | None = None) -> dict:
    cuda = torch.cuda.is_available() and not small
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    s = s or (8192 if cuda else 96)
    cfg, indexer, fwd, args = build(small or not cuda, s, device, dtype)
    res = {"S": s, "H": cfg.index_n_heads, "D": cfg.index_head_dim, "k": cfg.index_topk, "device": device}
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        dsa_inductor.unregister_dsa_passes()
        res["eager_us"], res["eager_peak"], _ = _measure(fwd, args, cuda)
        torch._dynamo.reset()
        stock = torch.compile(fwd)
        try:
            stock(*args)
            res["stock_us"], res["stock_peak"], _ = _measure(stock, args, cuda)
        except torch.cuda.OutOfMemoryError:
            res["stock_us"] = res["stock_peak"] = None
        torch._dynamo.reset()
        dsa_inductor.reset_report()
        dsa_inductor.register_dsa_passes()
        ours = torch.compile(fwd)
        ours(*args)
        res["ours_us"], res["ours_peak"], idx = _measure(ours, args, cuda)
        res["report"] = dsa_inductor.report()
        from dsa_inductor.report import match_count

        res["matches"] = match_count()
        dsa_inductor.unregister_dsa_passes()
        torch._dynamo.reset()
        masked = reference_scores(indexer, *args)
    res["check"] = check_selection(masked, min(cfg.index_topk, s), idx)
    res["score_buffer_bytes"] = 1 * s * s * 4  # the [B, S, T] fp32 index-score buffer left in our graph
    return res


def _fmt_us(x):
    return "OOM" if x is None else f"{x:.0f}"


def _fmt_mb(x):
    return "-" if x is None else f"{x / 2**20:.0f}"


def cases():
    """For bench/run.py: this module times its one case itself (``run_case``), with peak memory."""
    if not torch.cuda.is_available():
        return []
    return [Case("DeepseekV32Indexer module (transformers)", "B=1 S=8192 H=64 D=128 k=2048 bf16",
                 fn=None, make_inputs=lambda: ())]


def run_case(case: Case) -> Result:
    r = run(small=False, s=8192)
    mem = (f"peak MB eager {_fmt_mb(r['eager_peak'])} / stock {_fmt_mb(r['stock_peak'])} / ours "
           f"{_fmt_mb(r['ours_peak'])} (ours keeps a {r['score_buffer_bytes'] / 2**20:.0f} MB [B,S,T] fp32 score buffer)")
    nan = float("nan")  # eager / stock out of memory
    return Result(case, r["eager_us"] or nan, r["stock_us"] or nan, r["ours_us"], 0.0, r["matches"],
                  (r["check"] or "ok") + "; " + mem)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small dims on CPU (a correctness run, no timings)")
    ap.add_argument("--s", type=int, default=None)
    a = ap.parse_args()
    r = run(a.small, a.s)
    print(r["report"])
    print(f"{r['device']}: S={r['S']} H={r['H']} D={r['D']} index_topk={r['k']}")
    print(f"time us:  eager {_fmt_us(r['eager_us'])} | stock {_fmt_us(r['stock_us'])} | ours {_fmt_us(r['ours_us'])}"
          + ("" if r["device"] == "cuda" else "  (CPU: says nothing about GPU speed)"))
    if r["device"] == "cuda":
        print(f"peak MB:  eager {_fmt_mb(r['eager_peak'])} | stock {_fmt_mb(r['stock_peak'])} | "
              f"ours {_fmt_mb(r['ours_peak'])}")
        if r["stock_us"] and r["ours_us"]:
            print(f"ours vs stock: {r['stock_us'] / r['ours_us']:.1f}x faster")
    print(f"[B,S,T] fp32 score buffer in our graph: {r['score_buffer_bytes'] / 2**20:.1f} MB")
    print(f"check: {r['check'] or 'ok'}")
    if r["check"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
