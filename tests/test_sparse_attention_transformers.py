"""The sparse_attention rule fires inside transformers' DeepseekV32Attention (code we did not write), and the
logits still match eager, for both the eager (finfo.min additive mask) and sdpa (bool mask) paths; on CUDA the
sdpa path is SDPA's fused efficient kernel with the mask as an additive bias."""

import pathlib

import pytest

from conftest import load_example

pytest.importorskip("transformers", minversion="5.23")

example = load_example("deepseek_v32_prefill")


@pytest.mark.parametrize("attn,variant", [("sdpa", "dense_mask:per_head_kv:safe_softmax"),
                                          ("eager", "dense_mask:per_head_kv:finfo_min")])
def test_sparse_attention_fires_in_deepseek_v32(fresh, attn, variant):
    import torch

    from conftest import matches

    if attn == "sdpa" and torch.cuda.is_available():  # fp32 with a bool mask: SDPA's efficient kernel (cuDNN
        variant = "dense_mask:per_head_kv:sdpa_efficient"  # and flash take no fp32)
    # fp32: bf16 rounding differences between compiled and eager scores would flip near-tied selections
    model, ids = example.build(seq=48, batch=2, attn_implementation=attn, dtype=torch.float32)
    res = example.compare(model, ids, with_stock=False)  # asserts logits == eager within tolerance
    assert matches("sparse_attention") == {variant: model.config.num_hidden_layers}, res["report"]
    section = res["report"].split("rule sparse_attention")[1].split("- rule")[0]
    assert "modeling_deepseek_v32.py" in section, res["report"]
    assert "keep mask -> row_ends" in section  # no dense causal mask read
    assert "not from a topk" not in section  # the indices are the indexer's topk: distinct
    # (per-head k/v turn dedup on all the same, a no-op on distinct indices: it selects the masked flash kernel)
    assert "per-head k/v: dedup on" in section
    assert any("dsa_inductor.sparse_attention" in pathlib.Path(p).read_text() for p in res["code_paths"])
