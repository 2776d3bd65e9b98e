"""Build the vectorized function from a :class:`~dsa_inductor.loops.analyze.Plan` and install it for Dynamo.

``torch.compiler.substitute_in_graph(original)`` registers a polyfill that Dynamo traces wherever traced
code calls ``original``; eager calls (and Dynamo-skipped frames) still run ``original`` itself.  The
polyfill runs the vectorized code and, if a runtime property is outside what the translation covers
(:class:`~dsa_inductor.loops.runtime.Unsupported`, raised while tracing), traces a clone of the original
loop instead, which is what stock ``torch.compile`` does.

Limitation (Dynamo's, documented by ``substitute_in_graph``): the substitution applies where traced code
*calls* the function; ``torch.compile(original)`` itself traces the original's frame.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable

import torch

from . import runtime
from .analyze import Plan


@dataclasses.dataclass
class Lifted:
    original: Callable
    vectorized: Callable  # same signature as the original; eager-callable
    polyfill: Callable  # what Dynamo traces
    plan: Plan
    registered: bool = False


def build(fn: Callable, plan: Plan) -> Callable:
    """The vectorized function of ``plan``, with ``fn``'s globals and defaults."""
    src = "def _factory(_rt):\n" + "\n".join("    " + ln for ln in plan.source.splitlines()) + "\n    return _vectorized\n"
    code = compile(src, f"<dsa_inductor lifted {plan.location}>", "exec")
    inner = next(c for c in code.co_consts if isinstance(c, types.CodeType)).co_consts
    inner = next(c for c in inner if isinstance(c, types.CodeType) and c.co_name == "_vectorized")
    cells = tuple(types.CellType(runtime) for _ in inner.co_freevars)  # the only free variable is _rt
    assert inner.co_freevars == ("_rt",), inner.co_freevars
    vec = types.FunctionType(inner, fn.__globals__, fn.__name__, fn.__defaults__, cells)
    vec.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
    vec.__qualname__ = fn.__qualname__ + ".<lifted>"
    vec.__dsa_source__ = plan.source
    return vec


def _clone(fn: Callable) -> Callable:
    """A copy of ``fn`` that is not polyfilled (Dynamo traces its loop as stock torch.compile would)."""
    c = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    c.__kwdefaults__ = fn.__kwdefaults__
    return c


# ----------------------------------------------------------------------------------------------------
# verify mode: an opaque op that runs the original eagerly beside the compiled lifted code

VERIFY_CALLS = 4  # calls of each (function, argument layout) compared against the original
_ORIGINALS: dict[int, tuple] = {}  # fid -> (clone of the original, qualified name); filled at install time
_CALLS: dict = {}  # (fid, layout) -> calls verified so far


class LoopVerifyError(AssertionError):
    """The lifted loop and the original loop returned different values (``register_dsa_passes(verify=True)``)."""


def _decode(tok: str):
    kind, _, val = tok.partition(":")
    if kind == "n":
        return None
    if kind == "b":
        return val == "1"
    if kind == "f":
        return float(val)
    if kind == "d":
        return getattr(torch, val)
    raise ValueError(tok)


@torch.library.custom_op("dsa_inductor::loop_verify", mutates_args=())
def loop_verify(fid: int, layout: str, tensors: list[torch.Tensor], ints: list[int],
                outs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run the original loop (function ``fid``) on the call's arguments and compare its outputs with ``outs``.

    ``layout`` lists the arguments in order, ``name=kind[:value]`` (name empty for positional ones): ``t`` the
    next of ``tensors``, ``i`` the next of ``ints``, ``n``/``b``/``f``/``d`` a None, bool, float or dtype.
    Values must be equal bit for bit (NaN equal to NaN).  Only the first ``VERIFY_CALLS`` calls per layout
    are checked.  Returns copies of ``outs``.

    Raises:
        LoopVerifyError: an output differs; the message names the function and the first differing index.
    """
    original, name = _ORIGINALS[fid]
    if _CALLS.get((fid, layout), 0) < VERIFY_CALLS:
        _CALLS[(fid, layout)] = _CALLS.get((fid, layout), 0) + 1
        ti, ii = iter(tensors), iter(ints)
        args, kwargs = [], {}
        for tok in layout.split("|") if layout else []:
            key, _, kv = tok.partition("=")
            v = next(ti) if kv == "t" else next(ii) if kv == "i" else _decode(kv)
            if key:
                kwargs[key] = v
            else:
                args.append(v)
        expected = original(*args, **kwargs)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        if len(expected) != len(outs):
            raise LoopVerifyError(f"{name}: lifted returned {len(outs)} tensors, original {len(expected)}")
        for j, (e, o) in enumerate(zip(expected, outs)):
            o = o.to(e.device)
            if e.shape != o.shape or e.dtype != o.dtype:
                raise LoopVerifyError(f"{name}: output {j} is {tuple(o.shape)} {o.dtype}, original "
                                      f"{tuple(e.shape)} {e.dtype}")
            same = (e == o) | (e.isnan() & o.isnan()) if e.is_floating_point() else e == o
            if not bool(same.all()):
                idx = tuple(int(x) for x in (~same).nonzero()[0])
                raise LoopVerifyError(f"{name}: output {j} differs from the original loop at {idx}: "
                                      f"lifted {o[idx].item()} vs original {e[idx].item()}")
    return [o.clone() for o in outs]


@loop_verify.register_fake
def _(fid, layout, tensors, ints, outs):
    return [torch.empty_like(o) for o in outs]


def _encode(a):
    if a is None:
        return "n"
    if isinstance(a, bool):
        return f"b:{int(a)}"
    if isinstance(a, float):
        return f"f:{a!r}"
    if isinstance(a, torch.dtype):
        return f"d:{str(a).split('.')[-1]}"
    return None


def _verified(original: Callable, vec: Callable) -> Callable:
    fid = len(_ORIGINALS)
    _ORIGINALS[fid] = (_clone(original), original.__qualname__)

    def check(*args, **kwargs):
        toks, tensors, ints = [], [], []
        for key, a in [("", a) for a in args] + list(kwargs.items()):
            if isinstance(a, torch.Tensor):
                toks.append(f"{key}=t")
                tensors.append(a.clone())  # before the lifted code may write into it
            elif isinstance(a, (int, torch.SymInt)) and not isinstance(a, bool):
                toks.append(f"{key}=i")
                ints.append(a)
            else:
                enc = _encode(a)
                if enc is None:  # an argument the op cannot carry: not verified
                    return vec(*args, **kwargs)
                toks.append(f"{key}={enc}")
        out = vec(*args, **kwargs)
        single = isinstance(out, torch.Tensor)
        outs = [out] if single else list(out) if isinstance(out, (tuple, list)) else None
        if outs is None or not all(isinstance(o, torch.Tensor) for o in outs):
            return out
        checked = loop_verify(fid, "|".join(toks), tensors, ints, outs)
        return checked[0] if single else tuple(checked)

    return check


def make_polyfill(original: Callable, vec: Callable) -> Callable:
    clone = _clone(original)
    checked = _verified(original, vec)

    def polyfill(*args, **kwargs):
        # both flags are module globals: Dynamo guards on them, so flipping one retraces
        if not runtime.ENABLED:
            return clone(*args, **kwargs)
        try:
            return (checked if runtime.VERIFY else vec)(*args, **kwargs)
        except runtime.Unsupported:
            return clone(*args, **kwargs)

    polyfill.__name__ = original.__name__
    polyfill.__qualname__ = original.__qualname__ + ".<polyfill>"
    return polyfill


def install(original: Callable, vec: Callable) -> Callable:
    """Register the polyfill for ``original`` with ``torch.compiler.substitute_in_graph``.

    Raises:
        ValueError: ``original`` already has a polyfill (from us or another library).
    """
    poly = make_polyfill(original, vec)
    torch.compiler.substitute_in_graph(original, skip_signature_check=True)(poly)
    return poly


def describe(x: Any) -> str:
    return getattr(x, "__qualname__", repr(x))
