"""Prefill of transformers' GLM-5 (``GlmMoeDsaForCausalLM``) and DeepSeek-V4 (``DeepseekV4ForCausalLM``):
eager vs torch.compile with dsa_inductor, on model code we did not write.

Both are DSA models built like DeepSeek-V3.2 (``examples/deepseek_v32_prefill.py``, whose ``compare`` this
reuses), each from a small random config that keeps its structure:

* GLM-5: V3.2's lightning indexer (interleaved RoPE) and dense-mask sparse attention, plus cross-layer top-k
  sharing (``indexer_types``: a ``"shared"`` layer reuses the previous full layer's selection);
* DeepSeek-V4: sliding-window layers, and compressed layers (CSA, every ``compress_rate`` tokens one entry,
  with a lightning indexer over the compressed keys; HCA), attention sinks, eager attention only.  Its
  indexer scores a transposed q, masks with ``arange >= (position_ids + 1) // compress_rate`` and turns picks
  past a row's end into ``-1`` before scattering them into a 0 / -inf block bias.

    python examples/glm5_deepseek_v4_prefill.py                   # both, CPU, a minute or two
    python examples/glm5_deepseek_v4_prefill.py --model deepseek_v4

The script checks the logits against eager, prints ``dsa_inductor.report()`` and which rules fired inside
the model's files.  transformers must ship the model (GLM-5 and DeepSeek-V4 are in 5.25).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from deepseek_v32_prefill import compare  # noqa: E402  (the shared eager / compiled comparison)

MODELS = {"glm5": "modeling_glm_moe_dsa.py", "deepseek_v4": "modeling_deepseek_v4.py"}


def build(model: str, seq: int = 48, batch: int = 2, dtype: torch.dtype = torch.float32):
    """A small random ``model`` ("glm5" or "deepseek_v4") and its input ids; ImportError if transformers
    lacks it."""
    if model == "glm5":
        from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

        cfg = GlmMoeDsaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=32,
            q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, index_topk=16,
            index_head_dim=32, index_n_heads=4, first_k_dense_replace=1, max_position_embeddings=1024,
            indexer_types=["full", "shared", "full"])
        cfg._attn_implementation = "sdpa"
        cls = GlmMoeDsaForCausalLM
    elif model == "deepseek_v4":
        from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

        cfg = DeepseekV4Config(
            vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=48, num_experts_per_tok=2,
            n_routed_experts=4, n_shared_experts=1, hc_mult=2, hc_sinkhorn_iters=3, sliding_window=16,
            o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=32, index_topk=8,
            num_nextn_predict_layers=0, max_position_embeddings=1024,
            layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16})
        cfg._attn_implementation = "eager"  # V4 has no SDPA path in transformers
        cls = DeepseekV4ForCausalLM
    else:
        raise ValueError(f"`model`: {model!r} is not one of {sorted(MODELS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    m = cls(cfg).to(device=device, dtype=dtype).eval()
    return m, torch.randint(0, cfg.vocab_size, (batch, seq), device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), action="append",
                    help="which model (repeatable; default both)")
    ap.add_argument("--seq", type=int, default=48)
    args = ap.parse_args()
    for name in args.model or sorted(MODELS):
        model, ids = build(name, args.seq)
        res = compare(model, ids, with_stock=False)  # asserts the logits equal eager
        print(f"== {name}: logits agree, max |ours - eager| = {res['max_diff_ours']:.3g}")
        print(res["report"])
        if MODELS[name] not in res["report"]:
            raise SystemExit(f"no rule fired inside {MODELS[name]}")


if __name__ == "__main__":
    main()
