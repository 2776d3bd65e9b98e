"""Loop lifting: per-token Python loops replaced, for Dynamo only, by vectorized equivalents.

Serving code (vLLM, SGLang, DeepSeek-V3.2's indexer cache) reads paged FP8 caches and builds per-token
metadata in Python loops such as::

    for i, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        page, pos = divmod(slot, block_size)
        out[i] = cache[page, pos*D:(pos+1)*D].view(torch.float8_e4m3fn).float() * scale_of(page, pos)

Under ``torch.compile`` the ``.tolist()`` graph-breaks, the loop is unrolled with a guard per slot, and
every batch recompiles.  ``register_dsa_passes()`` calls :func:`install`, which analyzes the candidate
functions of the loaded user modules (and of modules imported later, see :mod:`.scan`), translates the
loops it can prove equal (:mod:`.analyze`) and registers the vectorized form with
``torch.compiler.substitute_in_graph`` (:mod:`.lift`): Dynamo traces one gather instead of N iterations,
eager calls still run the original.  ``report()`` lists what was lifted and what was refused, and why.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Union

from . import runtime
from .analyze import Plan, Refusal, analyze
from .lift import Lifted, LoopVerifyError, build, install as _install_polyfill
from .scan import ImportHook, candidates, loaded_user_modules

__all__ = ["install", "uninstall", "lift_function", "LIFTED", "REFUSED", "LoopVerifyError"]

LIFTED: dict = {}  # original function -> Lifted
REFUSED: dict = {}  # original function -> Refusal
_SEEN_MODULES: set = set()
_HOOK: Optional[ImportHook] = None


def lift_function(fn: Callable, fdef=None) -> Union[Lifted, Refusal, None]:
    """Analyze ``fn`` and, if its loop is liftable, install the vectorized form for Dynamo.

    Args:
        fn: a plain Python function (module-level, no closure, no decorator).
        fdef: its parsed ``ast.FunctionDef`` if the caller has it.

    Returns:
        :class:`~dsa_inductor.loops.lift.Lifted`, a :class:`~dsa_inductor.loops.analyze.Refusal` with the
        reason, or None if ``fn`` has no loop of a known shape.  Idempotent per function.
    """
    if fn in LIFTED:
        return LIFTED[fn]
    if fn in REFUSED:
        return REFUSED[fn]
    res = analyze(fn, fdef)
    if res is None:
        return None
    if isinstance(res, Refusal):
        REFUSED[fn] = res
        return res
    try:
        vec = build(fn, res)
        poly = _install_polyfill(fn, vec)
    except (ValueError, TypeError, SyntaxError) as err:  # e.g. another library already polyfilled it
        REFUSED[fn] = Refusal(res.name, res.location, f"could not install: {err}")
        return REFUSED[fn]
    LIFTED[fn] = Lifted(fn, vec, poly, res, registered=True)
    return LIFTED[fn]


def _scan_module(module) -> None:
    if module.__name__ in _SEEN_MODULES:
        return
    _SEEN_MODULES.add(module.__name__)
    for fn, fdef in candidates(module):
        lift_function(fn, fdef)


def install(verify: bool = False) -> None:
    """Scan the loaded user modules, lift what can be lifted, and hook later imports (idempotent)."""
    global _HOOK
    runtime.VERIFY = verify
    runtime.ENABLED = True
    for m in loaded_user_modules():
        _scan_module(m)
    if _HOOK is None:
        _HOOK = ImportHook(_scan_module)
        sys.meta_path.insert(0, _HOOK)


def uninstall() -> None:
    """Remove the import hook and turn every polyfill into the original loop.

    ``substitute_in_graph`` has no public inverse (and Dynamo memoizes its lookups), so the polyfills stay
    registered; with ``runtime.ENABLED = False`` (a global Dynamo guards on) they trace a clone of the
    original loop, i.e. stock behaviour.  Refusals and scanned modules are forgotten; a later
    ``install()`` re-enables the lifted functions and rescans."""
    global _HOOK
    if _HOOK is not None and _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
    _HOOK = None
    runtime.ENABLED = False
    runtime.VERIFY = False
    REFUSED.clear()
    _SEEN_MODULES.clear()
