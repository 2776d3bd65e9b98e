"""What every rule shares: the ``Rule`` base class (one per idiom), variant registration, checks.

A rule owns one ``PatternMatcherPass`` filled lazily, under a fake mode, from its ``variants()``: eager
search functions and replacements traced with ``canonicalize.trace_fn``.  Style follows PyTorch's
``torch/_inductor/fx_passes/fuse_attention.py`` (a generator of search variants with shared checks) and
vLLM's ``vllm/compilation/passes`` (one class per pass, a match table, a uuid from sources).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Iterable, Optional

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, register_replacement
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from ..canonicalize import trace_fn
from ..report import log, source_location, stats_for

_HAS_PATTERN_NAME = "pattern_name" in inspect.signature(register_replacement).parameters  # torch >= 2.13


@dataclasses.dataclass
class Variant:
    """One eager spelling of an idiom and its replacement.

    ``argnames`` are the pattern inputs (tensors first, then scalars captured by ``scalar_workaround``);
    ``search`` and ``replace`` take them positionally in that order.
    """

    name: str
    argnames: tuple[str, ...]
    search: Callable
    replace: Callable
    example_inputs: Callable[[], list]
    scalar_workaround: dict
    check: Callable[[Match], Optional[str]] = lambda match: None
    # verify mode: (inputs, eager outputs, fused outputs) -> why they break the rule's contract, or None
    # (None: elementwise within dsa_inductor.testing.tol(dtype))
    compare: Optional[Callable[[list, list, list], Optional[str]]] = None
    trace: Optional[Callable] = None  # trace function of the search/replacement (default canonicalize.trace_fn)


def with_signature(fn: Callable, argnames: Iterable[str]) -> Callable:
    """Give ``fn(*args)`` the named positional signature that ``register_replacement`` inspects."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in argnames]
    fn.__signature__ = inspect.Signature(params)
    return fn


def tensor_meta(match: Match, name: str):
    node = match.kwargs.get(name)
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def dropped_kwarg(match: Match) -> Optional[str]:
    """A keyword argument of a matched node that the pattern matcher ignored, if it is not its default.

    ``torch._inductor.pattern_matcher`` compares a node's args with its pattern's but drops the node's kwargs
    that the pattern lacks, so ``torch.sub(x, m, alpha=2)`` matches the ``x - m`` of a decomposed softmax and
    ``torch.add(x, b, alpha=-2)`` the additive mask ``x + b``: such a match would change the result.
    """
    ctx = getattr(match, "ctx", None)
    for pattern, node in getattr(ctx, "pattern_to_node", {}).items():
        if not isinstance(node, torch.fx.Node) or not node.kwargs or not hasattr(pattern, "kwargs"):
            continue
        schema = getattr(node.target, "_schema", None)
        defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()} if schema else {}
        for key, value in node.kwargs.items():
            if key in pattern.kwargs:
                continue
            if key not in defaults or not _same_default(value, defaults[key]):
                return f"{node.target}: the pattern does not take its argument {key}={value!r}"
    return None


def _same_default(value, default) -> bool:
    try:
        return bool(value == default)
    except Exception:  # e.g. a tensor-valued kwarg
        return False


class Rule:
    """A rewrite of one DSA idiom into one fused op.

    Subclasses set ``name``, ``op`` (the fused op's qualified name), ``anchors`` (the aten targets whose
    nodes are this rule's candidates) and implement ``variants()`` and ``diagnose(node)``.
    """

    name: str = ""
    op: str = ""
    anchors: tuple = ()

    def __init__(self) -> None:
        self._pass: Optional[PatternMatcherPass] = None
        self._failed: dict = {}
        self.verify = False  # set by the pass manager: replacements then check themselves (dsa_inductor.verify)

    # -- registration --------------------------------------------------------------------------------
    def variants(self) -> Iterable[Variant]:
        raise NotImplementedError

    def diagnose(self, node: torch.fx.Node) -> str:
        raise NotImplementedError

    def pattern_pass(self) -> PatternMatcherPass:
        if self._pass is None:
            pm = PatternMatcherPass(pass_name=f"dsa_{self.name}")
            with torch._guards.tracing(None), unset_fake_temporarily(), FakeTensorMode():
                for v in self.variants():
                    kwargs = {"pattern_name": f"dsa_{self.name}:{v.name}"} if _HAS_PATTERN_NAME else {}
                    register_replacement(
                        with_signature(v.search, v.argnames),
                        with_signature(self._counted(v), v.argnames),
                        v.example_inputs(),
                        v.trace or trace_fn,
                        pm,
                        extra_check=self._checked(v),
                        scalar_workaround=v.scalar_workaround,
                        skip_duplicates=True,
                        **kwargs,
                    )
            self._pass = pm
        return self._pass

    def _counted(self, v: Variant) -> Callable:
        """The replacement is traced exactly once per accepted match: count it there (and, in verify mode,
        follow the fused op with the check against the eager subgraph, ``dsa_inductor.verify``)."""

        def replace(*args):
            stats_for(self.name, self.op).matches[v.name] += 1
            out = v.replace(*args)
            if self.verify:
                from ..verify import wrap

                out = wrap(self.name, self.op, v, args, out)
            return out

        return replace

    def _checked(self, v: Variant) -> Callable[[Match], bool]:
        def extra_check(match: Match) -> bool:
            reason = dropped_kwarg(match) or v.check(match)
            if reason is not None:
                for node in match.nodes:
                    if node.target in self.anchors:
                        self._failed[node] = reason
                log.debug("rule %s variant %s rejected: %s", self.name, v.name, reason)
                return False
            for node in match.nodes:
                if node.target in self.anchors:
                    stats_for(self.name, self.op).locations[source_location(node)] += 1
            return True

        return extra_check

    # -- running ------------------------------------------------------------------------------------
    def candidates(self, graph: torch.fx.Graph) -> list:
        return [n for n in graph.nodes if n.op == "call_function" and n.target in self.anchors]

    def apply(self, graph: torch.fx.Graph) -> int:
        """Rewrite every match in ``graph``; record candidates, matches and rejections. Returns matches."""
        st = stats_for(self.name, self.op)
        cands = self.candidates(graph)
        if not cands:
            return 0
        st.candidates += len(cands)
        self._failed = {}
        matched = self.pattern_pass().apply(graph)
        for node in self.candidates(graph):
            reason = self._failed.get(node) or self.diagnose(node)
            st.rejections[reason] += 1
            log.info("rule %s left %s at %s alone: %s", self.name, node.name, source_location(node), reason)
        self._failed = {}  # holds graph nodes (and their fake values): never keep them past the pass
        if matched:
            log.info("rule %s: %d match(es) -> %s", self.name, matched, self.op)
        return matched
