"""The rule fires inside transformers' DeepseekV32Indexer (code we did not write), and logits match eager."""

import pathlib

import pytest

from conftest import load_example

pytest.importorskip("transformers", minversion="5.23")

example = load_example("deepseek_v32_prefill")


@pytest.mark.parametrize("attn,variant", [("sdpa", "keep_mask:sorted:indices_int32"),
                                          ("eager", "additive:sorted:indices_int32")])
def test_indexer_rule_fires_and_logits_match(fresh, attn, variant):
    import torch

    # fp32: bf16 rounding differences between compiled and eager scores would flip near-tied selections
    model, ids = example.build(seq=48, batch=2, attn_implementation=attn, dtype=torch.float32)
    res = example.compare(model, ids, with_stock=False)  # asserts logits == eager within tolerance
    report = res["report"]
    assert "modeling_deepseek_v32.py" in report, report
    assert variant in report, report
    assert res["code_paths"], "no generated code calls a dsa_inductor op"


def test_short_prefill_removes_the_indexer(fresh):
    """S <= index_topk (SGLang's short-prefill case): min(index_topk, T) == T, the scattered index mask is
    constant, the indexer is dead code in the compiled graph, and the logits still equal eager."""
    import torch

    model, ids = example.build(seq=16, batch=2, attn_implementation="sdpa", dtype=torch.float32, index_topk=16)
    res = example.compare(model, ids, with_stock=False)  # asserts logits == eager within tolerance
    assert "scatter -> full" in res["report"], res["report"]
    assert not any("dsa_inductor.index_score" in pathlib.Path(p).read_text() for p in res["code_paths"])
