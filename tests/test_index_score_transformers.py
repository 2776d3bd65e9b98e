"""The index_score rule fires inside transformers' DeepseekV32Indexer (code we did not write), logits match eager."""

import pathlib

import pytest

from conftest import load_example

pytest.importorskip("transformers", minversion="5.23")

example = load_example("deepseek_v32_prefill")


def test_index_score_rule_fires_in_deepseek_v32(fresh):
    import torch

    from conftest import matches

    # fp32: bf16 rounding differences between compiled and eager scores would flip near-tied selections
    model, ids = example.build(seq=48, batch=2, attn_implementation="sdpa", dtype=torch.float32)
    res = example.compare(model, ids, with_stock=False)  # asserts logits == eager within tolerance
    n_layers = model.config.num_hidden_layers
    assert matches("index_score") == {"matmul:scale_pre:matmul": n_layers}, res["report"]
    section = res["report"].split("rule index_score")[1].split("- rule")[0]
    assert "modeling_deepseek_v32.py" in section, res["report"]
    assert any("dsa_inductor.index_score" in pathlib.Path(p).read_text() for p in res["code_paths"])
