"""Verify mode (``register_dsa_passes(verify=True)``): each fused op checked against the eager subgraph it replaced.

How: when verify is on, a rule's replacement is ``rule_verify(fused_op(inputs), inputs)`` instead of
``fused_op(inputs)``.  ``dsa_inductor::rule_verify`` is an opaque ``torch.library.custom_op`` (Inductor
calls it as an extern kernel, never traces into it).  At run time it receives the fused op's outputs, as
the compiled code computed them, and the live inputs of the matched subgraph; it runs the variant's eager
search function (the subgraph that was replaced: the re-trace on the matched shapes proved they are the
same graph) on those inputs in plain eager PyTorch, compares with the rule's contract
(``dsa_inductor.testing``), and raises ``DSAVerifyError`` naming the rule, the variant and the first
differing element.  It returns copies of the fused outputs (a custom op may not return its inputs).

Why not inside the op: the check must see what the compiled graph computed, on CPU (the op's plain torch
path) and CUDA (its Triton kernels) alike, and compare it with the eager subgraph the rule removed, which
the op itself does not know (each op's own ``VERIFY`` flag compares its CUDA kernel with its CPU path,
not with the user's code).  An opaque op downstream of the fused op does that and leaves the fused op
unchanged.

Cost: the eager subgraph runs beside the compiled one on every call (verify mode is for debugging and CI).
The mode is part of the pass manager's ``uuid()``, so a graph compiled without it is never served with it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import testing


class DSAVerifyError(AssertionError):
    """A fused op's output differs from the eager subgraph it replaced (``register_dsa_passes(verify=True)``)."""


# (rule, variant) -> (rule op, variant): filled when a verified replacement is traced
_VARIANTS: dict = {}


def _per_output(mismatch: Callable) -> Callable[[list, list, list], Optional[str]]:
    """A variant comparison applying ``mismatch(actual, expected)`` to each output, naming the first that fails."""

    def compare(args, expected: list, actual: list) -> Optional[str]:
        for j, (e, a) in enumerate(zip(expected, actual)):
            why = mismatch(a, e)
            if why is not None:
                return f"output {j}: {why}"
        return None

    return compare


default_compare = _per_output(testing.close_mismatch)  # within testing.tol(dtype), exact for integer results
exact_compare = _per_output(testing.exact_mismatch)


@torch.library.custom_op("dsa_inductor::rule_verify", mutates_args=())
def rule_verify(rule: str, variant: str, spec: str, tensors: list[torch.Tensor], ints: list[int],
                floats: list[float], outs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Compare the fused op's outputs ``outs`` with the eager subgraph of ``rule``/``variant`` on its inputs.

    ``spec`` lists the subgraph's inputs in order, one letter each: ``t`` the next of ``tensors``, ``i`` of
    ``ints``, ``f`` of ``floats``.  Returns copies of ``outs``.

    Raises:
        DSAVerifyError: an output breaks the rule's contract; the message names the rule, the variant and
            the first differing element.
    """
    op, v = _VARIANTS[(rule, variant)]
    its = {"t": iter(tensors), "i": iter(ints), "f": iter(floats)}
    args = [next(its[c]) for c in spec]
    with torch.no_grad():
        expected = v.search(*args)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    if len(expected) != len(outs):
        why = f"{len(outs)} outputs, the eager subgraph has {len(expected)}"
    else:
        why = (v.compare or default_compare)(args, expected, list(outs))
    if why is not None:
        raise DSAVerifyError(f"dsa_inductor verify: rule {rule} (variant {variant}, op {op}) differs from the "
                             f"eager subgraph it replaced: {why}")
    return [o.clone() for o in outs]


@rule_verify.register_fake
def _(rule, variant, spec, tensors, ints, floats, outs):
    return [torch.empty_like(o) for o in outs]


def wrap(rule_name: str, op: str, variant, args: tuple, out):
    """Inside a traced replacement: route the fused op's ``out`` through ``rule_verify``."""
    _VARIANTS[(rule_name, variant.name)] = (op, variant)
    spec, tensors, ints, floats = [], [], [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            spec.append("t")
            tensors.append(a)
        elif isinstance(a, (int, torch.SymInt)) and not isinstance(a, bool):
            spec.append("i")
            ints.append(a)
        elif isinstance(a, (float, torch.SymFloat)):
            spec.append("f")
            floats.append(a)
        else:  # pragma: no cover - every variant's inputs are tensors, ints and floats
            raise TypeError(f"dsa_inductor verify: rule {rule_name} input {a!r} cannot be carried")
    single = isinstance(out, torch.Tensor)
    outs = [out] if single else list(out)
    checked = torch.ops.dsa_inductor.rule_verify(rule_name, variant.name, "".join(spec), tensors, ints, floats,
                                                 outs)
    return checked[0] if single else tuple(checked)


Compare = Callable[[list, list, list], Optional[str]]
