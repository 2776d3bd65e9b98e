"""How a fused op is defined: ``fused_op``, a plain ``torch.library`` definition with a fake impl.

Each op module writes its op as one Python function (typed signature, CPU path and CUDA launch inside)
decorated with ``@fused_op("dsa_inductor::name")``; ``@op.register_fake`` adds the shape function.

Why not ``torch.library.triton_op`` / ``custom_op``.  Our rules insert the ops post-grad, after
AOTAutograd, so triton_op's decomposition into its kernels (which happens under AOTAutograd's
functionalization) never applies: Inductor calls the op as an opaque fallback.  What custom_op then adds
to every call is Python: an autograd wrapper, a redispatch and ``backend_impl`` with its output aliasing
check.  On an H100 with torch 2.11 those layers cost 25-86 us of host time per call
(``bench/host_overhead.py``), more than the kernels themselves take at decode sizes.  Here the
dispatcher calls the function directly.  The ops are inference ops: no autograd kernel is registered,
so autograd's default fallback applies (a warning if a backward ever reaches them).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

_LIBS: dict = {}


def _lib(ns: str) -> torch.library.Library:
    if ns not in _LIBS:
        _LIBS[ns] = torch.library.Library(ns, "FRAGMENT")
    return _LIBS[ns]


class FusedOp:
    """``dsa_inductor::<name>`` defined from ``fn``'s annotations; calling it goes through the dispatcher."""

    def __init__(self, qualname: str, fn: Callable) -> None:
        ns, name = qualname.split("::")
        lib = _lib(ns)
        lib.define(name + torch.library.infer_schema(fn, mutates_args=()))
        for key in ("CPU", "CUDA"):
            lib.impl(name, fn, key)
        self.qualname = qualname
        self.default = getattr(getattr(torch.ops, ns), name).default
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        return self.default(*args, **kwargs)

    def register_fake(self, fake: Callable) -> Callable:
        torch.library.register_fake(self.qualname, fake, lib=_lib(self.qualname.split("::")[0]))
        return fake


def fused_op(qualname: str) -> Callable[[Callable], FusedOp]:
    """Decorator: define ``qualname`` (``"ns::name"``) with ``fn`` as its CPU and CUDA kernel."""
    return lambda fn: FusedOp(qualname, fn)
