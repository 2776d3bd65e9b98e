"""dsa_inductor: torch.compile / Inductor passes that rewrite DeepSeek Sparse Attention idioms into fused kernels.

Usage::

    import torch, dsa_inductor
    dsa_inductor.register_dsa_passes()
    model = torch.compile(model)       # unmodified DSA model code
    out = model(inputs)                # == eager
    print(dsa_inductor.report())       # which idioms matched where, which kernels replaced them

Logging goes through the standard ``logging`` module under the ``dsa_inductor`` name.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch._inductor.config as inductor_config

from . import lowerings  # noqa: F401  (registers the fused ops)
from .pass_manager import DSAPassManager, _as_tuple
from .patterns import RULES
from .report import report, reset as reset_report

__all__ = ["register_dsa_passes", "unregister_dsa_passes", "report", "reset_report", "RULES"]

_MANAGER: Optional[DSAPassManager] = None
_RULE_INSTANCES: dict = {}


def _rule(name: str):
    if name not in _RULE_INSTANCES:
        _RULE_INSTANCES[name] = RULES[name]()
    return _RULE_INSTANCES[name]


def register_dsa_passes(patterns: Optional[Iterable[str]] = None, verify: bool = False) -> DSAPassManager:
    """Install the dsa_inductor rules in ``torch._inductor.config.post_grad_custom_pre_pass``.

    Args:
        patterns: names of the rules to enable (see ``dsa_inductor.RULES``); None enables all.  They run in
            ``RULES``' order whatever the order given (the order is part of what a rule sees, not of
            the cache key).
        verify: check every fused op against the eager subgraph it replaced, on live inputs, on every
            call (CPU and CUDA): the rewritten graph runs the op, then the opaque op
            ``dsa_inductor::rule_verify``, which runs the replaced subgraph eagerly, compares under the
            rule's contract (``dsa_inductor.testing``) and raises ``dsa_inductor.verify.DSAVerifyError``
            naming the rule, the variant and the first differing element (``dsa_inductor/verify.py``).
            Slow; for debugging and CI.  Follow-up folds that read the op's consumers (gather_dequant's
            zero mask and cast, mask_topk's sorted -> unsorted) do not apply in this mode, since the
            check is the op's consumer.  Lifted per-token loops likewise run the original loop beside
            the compiled lifted code on their first calls; direct calls of the ops on CUDA also compare
            the kernel with the op's plain-torch definition.

    Also lifts per-token Python loops of the loaded user modules for Dynamo (``dsa_inductor.loops``).

    Idempotent: calling it again reconfigures the installed manager rather than stacking a second one.
    A pass already in the slot (one object on torch 2.11, possibly a list on 2.13) is kept and runs first.

    Raises:
        ValueError: an unknown rule name in ``patterns``.
    """
    global _MANAGER
    names = list(RULES) if patterns is None else list(patterns)
    unknown = [n for n in names if n not in RULES]
    if unknown:
        raise ValueError(f"register_dsa_passes: unknown rule(s) in `patterns`: {unknown}; known: {list(RULES)}")
    rules = {n: _rule(n) for n in RULES if n in names}  # in RULES' order, whatever the order of `patterns`
    lowerings.set_verify(verify)
    from . import loops  # per-token Python loops: lifted for Dynamo (see dsa_inductor/loops)

    loops.install(verify)
    current = inductor_config.post_grad_custom_pre_pass
    if isinstance(current, DSAPassManager):
        current.configure(rules, verify)
        _MANAGER = current
        return current
    if _MANAGER is not None and any(p is _MANAGER for p in _as_tuple(current)):
        _MANAGER.configure(rules, verify)  # someone put us in a list: stay there
        return _MANAGER
    _MANAGER = DSAPassManager(rules, verify, prior=current)
    inductor_config.post_grad_custom_pre_pass = _MANAGER
    return _MANAGER


def unregister_dsa_passes() -> None:
    """Remove the dsa_inductor pass, restoring whatever pass was in the slot before it.

    If another library has since wrapped our manager, the manager stays in its chain but turns into a
    pass-through (its uuid changes accordingly).
    """
    global _MANAGER
    current = inductor_config.post_grad_custom_pre_pass
    if isinstance(current, DSAPassManager):
        inductor_config.post_grad_custom_pre_pass = current.prior
        current.enabled = False
    elif _MANAGER is not None:
        _MANAGER.enabled = False
    lowerings.set_verify(False)
    from . import loops

    loops.uninstall()
    _MANAGER = None
