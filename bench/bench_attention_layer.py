"""transformers' ``DeepseekV32Attention`` layer (real DeepSeek-V3.2 dims): eager vs stock compile vs dsa_inductor,
beside the same layer with dense causal SDPA and no indexer.

    python bench/bench_attention_layer.py                 # CUDA: S = 4096 and 1024, sdpa and eager paths
    python bench/bench_attention_layer.py --s 4096 --attn sdpa
    python bench/bench_attention_layer.py --small         # CPU-sized run of the same code (correctness only)

The benchmarked function is what ``DeepseekV32Model`` runs for one layer's attention: the causal mask made by
``create_causal_mask`` (``allow_is_causal_skip=False``, as the model forces for its indexer), then
``DeepseekV32Attention(hidden_states, (cos, sin), mask)`` (the mask as inference with a KV cache builds it:
no packed-sequence term): q/kv LoRA projections, the indexer (64 heads of
dim 128, ``index_topk`` 2048), the top-k scattered into a bool mask, attention over 128 heads (qk 192, v 128)
through ``attn_implementation`` (``sdpa`` or ``eager``), and ``o_proj``.

``dense causal`` is the same layer with the indexer and its mask removed and
``F.scaled_dot_product_attention(..., is_causal=True)``, compiled by stock ``torch.compile``: issue 4 asks
that at S = 1024 (``S <= index_topk``: the selection is every key) the DSA layer compiled with dsa_inductor is
no slower than that.

Besides time (``do_bench`` medians) the run reports peak memory above the inputs
(``torch.cuda.max_memory_allocated``) and the ``[S, T]``-sized buffers that our generated code allocates
(a dense ``[B, S, T]`` mask would be one of them; the indexer's fp32 score buffer is another).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dsa_inductor  # noqa: E402
from bench_indexer_module import _measure  # noqa: E402  (time + peak memory of one call)
from harness import Case, Result  # noqa: E402


def layer_config(small: bool, attn: str):
    from transformers import DeepseekV32Config

    if small:
        cfg = DeepseekV32Config(hidden_size=64, q_lora_rank=48, num_attention_heads=4, num_key_value_heads=4,
                                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                index_n_heads=4, index_head_dim=32, index_topk=16, num_hidden_layers=1)
    else:  # DeepSeek-V3.2's attention: the config defaults are the released model's dims
        cfg = DeepseekV32Config(num_hidden_layers=1)
    cfg._attn_implementation = attn
    return cfg


def build(small: bool, s: int, attn: str, device: str, dtype: torch.dtype):
    from transformers.masking_utils import create_causal_mask
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import (DeepseekV32Attention,
                                                                        DeepseekV32RotaryEmbedding)

    cfg = layer_config(small, attn)
    torch.manual_seed(0)
    layer = DeepseekV32Attention(cfg, layer_idx=0).to(device=device, dtype=dtype).eval()
    for p in layer.parameters():  # default init is ~N(0, 1) for some projections: keep activations O(1)
        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5 if p.dim() > 1 else 0.0)
        if p.dim() == 1:
            p.data.fill_(1.0)
    rope = DeepseekV32RotaryEmbedding(cfg).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(1, s, cfg.hidden_size, device=device, generator=g, dtype=dtype)
    pos = torch.arange(s, device=device)[None]
    cos, sin = rope(hidden, pos)

    def attention_layer(hidden, cos, sin, pos):
        # position_ids=None: the mask of inference with a KV cache (generate, serving prefill), where transformers
        # skips its packed-sequence check (that check, for cache-less training batches, adds a per-position
        # sequence-id comparison to the mask)
        mask = create_causal_mask(config=cfg, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
                                  position_ids=None, allow_is_causal_skip=False)
        return layer(hidden, (cos, sin), mask)[0]

    def dense_causal_layer(hidden, cos, sin, pos):
        # DeepseekV32Attention.forward without the indexer: causal SDPA over all keys
        from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb_interleave

        b, n = hidden.shape[:2]
        q = layer.q_b_proj(layer.q_a_layernorm(layer.q_a_proj(hidden))).view(b, n, -1, layer.qk_head_dim)
        q_pass, q_rot = torch.split(q.transpose(1, 2), [layer.qk_nope_head_dim, layer.qk_rope_head_dim], -1)
        kv_pass, k_rot = torch.split(layer.kv_a_proj_with_mqa(hidden), [layer.kv_lora_rank, layer.qk_rope_head_dim], -1)
        k_pass = layer.kv_a_layernorm(kv_pass).view(b, 1, n, layer.kv_lora_rank)
        q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot.view(b, 1, n, -1), cos, sin)
        k, v = layer.expand_kv(k_pass, k_rot)
        out = F.scaled_dot_product_attention(torch.cat((q_pass, q_rot), -1), k, v, is_causal=True,
                                             scale=layer.scaling)
        return layer.o_proj(out.transpose(1, 2).reshape(b, n, -1))

    return cfg, attention_layer, dense_causal_layer, (hidden, cos, sin, pos)


def square_buffers(codes: list[str], s: int) -> list[str]:
    """Allocation lines of the generated code whose shape holds two dims equal to ``s`` ([.., S, T] buffers)."""
    pat = re.compile(r"empty_strided_\w+\(\(([^)]*)\)")
    found = []
    for code in codes:
        for line in code.splitlines():
            m = pat.search(line)
            if m and [d.strip() for d in m.group(1).split(",")].count(str(s)) >= 2:
                found.append(line.strip()[:160])
    return found


def run(small: bool = False, s: int | None = None, attn: str = "sdpa") -> dict:
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "deepseek_v32_prefill", pathlib.Path(__file__).parents[1] / "examples" / "deepseek_v32_prefill.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    cuda = torch.cuda.is_available() and not small
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    s = s or (4096 if cuda else 48)
    cfg, fwd, dense, args = build(small or not cuda, s, attn, device, dtype)
    res = {"S": s, "attn": attn, "k": cfg.index_topk, "device": device}
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        dsa_inductor.unregister_dsa_passes()
        res["eager_us"], res["eager_peak"], eager = _measure(fwd, args, cuda)
        torch._dynamo.reset()
        stock = torch.compile(fwd)
        stock(*args)
        res["stock_us"], res["stock_peak"], stock_out = _measure(stock, args, cuda)
        torch._dynamo.reset()
        dense_c = torch.compile(dense)
        dense_c(*args)
        res["dense_us"], res["dense_peak"], _ = _measure(dense_c, args, cuda)
        torch._dynamo.reset()
        dsa_inductor.reset_report()
        dsa_inductor.register_dsa_passes()
        ours = torch.compile(fwd)
        with example.OutputCode() as written:
            ours(*args)
        res["ours_us"], res["ours_peak"], ours_out = _measure(ours, args, cuda)
        res["report"] = dsa_inductor.report()
        from dsa_inductor.report import _STATS

        res["matches"] = {name: dict(st.matches) for name, st in _STATS.items() if st.matches}
        dsa_inductor.unregister_dsa_passes()
        torch._dynamo.reset()
    res["square_buffers"] = square_buffers(written.codes, s)
    if eager is not None:
        res["diff_ours"] = (ours_out.float() - eager.float()).abs().max().item()
        res["diff_stock"] = (stock_out.float() - eager.float()).abs().max().item()
    return res


def _fmt(x, unit=""):
    return "OOM" if x is None else f"{x:.0f}{unit}"


def summary(r: dict) -> str:
    mb = 2 ** 20
    lines = [f"{r['device']} attn={r['attn']} S={r['S']} index_topk={r['k']}: time us eager {_fmt(r['eager_us'])} | "
             f"stock {_fmt(r['stock_us'])} | ours {_fmt(r['ours_us'])} | dense causal SDPA (stock) {_fmt(r['dense_us'])}"]
    if r["device"] == "cuda":
        lines.append(f"  peak MB eager {_fmt(r['eager_peak'] and r['eager_peak'] / mb)} | stock "
                     f"{_fmt(r['stock_peak'] and r['stock_peak'] / mb)} | ours {_fmt(r['ours_peak'] and r['ours_peak'] / mb)}"
                     f" | dense {_fmt(r['dense_peak'] and r['dense_peak'] / mb)}")
    lines.append(f"  max |diff| vs eager: ours {r.get('diff_ours', float('nan')):.3g}, stock "
                 f"{r.get('diff_stock', float('nan')):.3g}; matches {r['matches']}")
    lines.append(f"  [S, T] buffers in our code: {r['square_buffers'] or 'none'}")
    return "\n".join(lines)


def cases():
    if not torch.cuda.is_available():
        return []
    return [Case(f"DeepseekV32Attention layer ({attn}, transformers)", f"B=1 S={s} H=128 k=2048 bf16",
                 fn=None, make_inputs=lambda: ()) for s in (4096, 1024) for attn in ("sdpa",)]


def run_case(case: Case) -> Result:
    s = int(re.search(r"S=(\d+)", case.shape).group(1))
    attn = re.search(r"\((\w+),", case.idiom).group(1)
    r = run(False, s, attn)
    nan = float("nan")
    note = (f"dense causal SDPA {_fmt(r['dense_us'])} us; peak MB stock {_fmt(r['stock_peak'] and r['stock_peak'] / 2**20)}"
            f" / ours {_fmt(r['ours_peak'] and r['ours_peak'] / 2**20)}; [S,T] buffers {len(r['square_buffers'])}")
    return Result(case, r["eager_us"] or nan, r["stock_us"] or nan, r["ours_us"], 0.0,
                  sum(sum(v.values()) for v in r["matches"].values()), note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small dims on CPU (a correctness run, no timings)")
    ap.add_argument("--s", type=int, nargs="*", default=None)
    ap.add_argument("--attn", nargs="*", default=["sdpa", "eager"])
    a = ap.parse_args()
    for attn in a.attn:
        for s in a.s or ([4096, 1024] if torch.cuda.is_available() and not a.small else [48]):
            r = run(a.small, s, attn)
            print(r["report"])
            print(summary(r), flush=True)


if __name__ == "__main__":
    main()
