"""Pass machinery: registration, chaining with other passes (uuid / FX graph cache: test_cache_correctness.py)."""

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

import dsa_inductor


def masked_topk_fn(x, mask):
    return x.masked_fill(~mask, float("-inf")).topk(3).indices


class Recorder(CustomGraphPass):
    def __init__(self, tag="r"):
        self.calls = 0
        self.tag = tag

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return ("recorder", self.tag)


@pytest.fixture(autouse=True)
def clean_slot():
    saved = inductor_config.post_grad_custom_pre_pass
    dsa_inductor.unregister_dsa_passes()
    inductor_config.post_grad_custom_pre_pass = None
    yield
    dsa_inductor.unregister_dsa_passes()
    inductor_config.post_grad_custom_pre_pass = saved


def test_register_is_idempotent_and_unregister_restores():
    prior = Recorder()
    inductor_config.post_grad_custom_pre_pass = prior
    a = dsa_inductor.register_dsa_passes()
    b = dsa_inductor.register_dsa_passes(verify=True)
    assert a is b and inductor_config.post_grad_custom_pre_pass is a and a.prior is prior and a.verify
    dsa_inductor.unregister_dsa_passes()
    assert inductor_config.post_grad_custom_pre_pass is prior


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match="no_such_rule"):
        dsa_inductor.register_dsa_passes(patterns=["no_such_rule"])


@pytest.mark.parametrize("as_list", [False, True])
def test_prior_passes_run_first_and_enter_uuid(as_list):
    r1, r2 = Recorder("a"), Recorder("b")
    inductor_config.post_grad_custom_pre_pass = [r1, r2] if as_list else r1
    mgr = dsa_inductor.register_dsa_passes()
    with inductor_config.patch(force_disable_caches=True):
        torch._dynamo.reset()
        torch.compile(masked_topk_fn)(torch.randn(4, 9), torch.rand(4, 9) > 0.5)
    assert r1.calls == 1 and (r2.calls == 1 or not as_list)
    uid = mgr.uuid()
    assert uid[1] == ("recorder", "a") and (not as_list or uid[2] == ("recorder", "b"))


def test_plain_callable_prior_forces_cache_bypass():
    inductor_config.post_grad_custom_pre_pass = lambda graph: None
    assert dsa_inductor.register_dsa_passes().uuid() is None


# uuid() and the FX graph cache: tests/test_cache_correctness.py
