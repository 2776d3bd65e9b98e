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
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, fx_to_pattern, is_match, register_replacement
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


def sym_size(graph: torch.fx.Graph, node: torch.fx.Node, dim: int):
    """An int, or a new ``sym_size`` node (inserted at the graph's insert point), for ``node``'s size ``dim``."""
    size = node.meta["val"].shape[dim]
    if isinstance(size, int):
        return size
    new = graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
    new.meta["val"] = size
    return new


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


def non_constant_scalar(v: Variant, match: Match) -> Optional[str]:
    """A scalar argument of the variant (``scale``, ``dv``, ...) bound to a graph value that is not an int.

    With ``dynamic=True`` Dynamo does not specialize a Python float it reads from a global or a closure
    (``torch._dynamo.config.specialize_float``): the graph then multiplies by a 0-d tensor input, which the
    pattern's ``mul(x, scale)`` still matches, and the fused op's ``float`` argument would get a tensor.  A
    symbolic int (a size) may stand for an int argument (the ops take ``SymInt``).
    """
    for name in v.scalar_workaround:
        reason = graph_value_reason(name, match.kwargs.get(name))
        if reason is not None:
            return reason
    return None


def graph_value_reason(name: str, value) -> Optional[str]:
    """Why a scalar argument ``name`` bound to ``value`` cannot be a fused op's number: a graph value (a 0-d
    tensor input, a float Dynamo did not specialize) rather than a Python number or a (symbolic) int."""
    if isinstance(value, torch.fx.Node) and not isinstance(value.meta.get("val"), (int, torch.SymInt)):
        return (f"`{name}` is a graph input ({type(value.meta.get('val')).__name__}), not a constant: "
                "Dynamo did not specialize it")
    return None


def _same_default(value, default) -> bool:
    try:
        return bool(value == default)
    except Exception:  # e.g. a tensor-valued kwarg
        return False


_IGNORED = (int, float, list, torch.device, torch.dtype)


def generic_pattern(v: Variant):
    """The variant's search graph with every int, float, list, device and dtype ignored (the first,
    shape-free match; ``specific_mismatch`` then checks the shapes)."""
    scalar_names = [n for n in v.argnames if n in v.scalar_workaround]
    if list(v.argnames[len(v.argnames) - len(scalar_names):]) != scalar_names:
        raise ValueError(f"variant {v.name}: scalar arguments {scalar_names} must come last (specific_mismatch)")
    gm = (v.trace or trace_fn)(with_signature(v.search, v.argnames), v.example_inputs())
    return fx_to_pattern(gm, ignore_types=_IGNORED, argnames=v.argnames, scalar_workaround=v.scalar_workaround)


def specific_mismatch(v: Variant, match: Match) -> Optional[str]:
    """Re-trace the search function on the matched shapes and match it exactly (ints included).

    What ``register_replacement`` does itself, except that *every* distinct size symbol is a pattern
    input: torch passes only symbols it can prove distinct from the first one (``statically_known_true
    (v != a)``), so with unrelated dynamic sizes its re-trace reads ``sym_size(x, i)`` (or shares one product
    of sizes among several views) where Dynamo's graph has the size's own placeholder, and no dynamic graph
    would match.  Scalar arguments (``v.scalar_workaround``) come last in ``v.argnames``; the re-trace uses
    their matched values.
    """
    scalar_names = [n for n in v.argnames if n in v.scalar_workaround]  # last (checked by generic_pattern)
    tensors = [tensor_meta(match, n) for n in v.argnames if n not in v.scalar_workaround]
    if any(t is None for t in tensors):
        return "an input of the match is not a tensor"
    fake_mode = torch._dynamo.utils.detect_fake_mode(tensors)
    if fake_mode is None:
        return "no fake values on the matched inputs"
    with fake_mode:
        args = [torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device) for t in tensors]
        syms, seen = [], set()
        for t in args:
            for d in (*t.shape, *t.stride()):
                if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol and d.node.expr not in seen:
                    seen.add(d.node.expr)
                    syms.append(d)
        # the matched scalars themselves (a magic value would trace a slice [:DV_MAGIC] as a no-op, say)
        scalars = [match.kwargs[n] if isinstance(match.kwargs.get(n), (int, float)) else v.scalar_workaround[n]
                   for n in scalar_names]
        n_sym = len(syms)

        def search(*a):
            return v.search(*a[n_sym:])

        try:
            gm = (v.trace or trace_fn)(search, syms + args + scalars)
        except RuntimeError as e:  # e.g. shapes the search function cannot take
            return f"the search function does not trace on the matched shapes: {e}"
    names = [f"sym{i}" for i in range(n_sym)] + list(v.argnames)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, names):
        node.target = name
        node.name = name
    pattern = fx_to_pattern(gm, argnames=names, scalar_workaround=v.scalar_workaround)
    if not is_match(pattern.match(match.output_nodes()[0])):
        return "the matched graph differs from the variant on its shapes (an int, a dim or a permutation)"
    return None


class Rule:
    """A rewrite of one DSA idiom into one fused op.

    Subclasses set ``name``, ``op`` (the fused op's qualified name), ``anchors`` (the aten targets whose
    nodes are this rule's candidates) and implement ``variants()`` and ``diagnose(node)``.

    ``exact_retrace``: match first with a shape-free pattern (``generic_pattern``), then re-trace on the
    matched shapes with every size symbol an input (``specific_mismatch``), instead of
    ``register_replacement``'s own re-trace, which no graph with several unrelated dynamic sizes passes.
    """

    name: str = ""
    op: str = ""
    anchors: tuple = ()
    exact_retrace: bool = False

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
            # canonicalize.trace_joint applies Inductor's joint-graph patterns, whose lazy_init registers
            # replacements under a config patch: run it now, not nested inside register_replacement's patch
            # (torch 2.11 asserts "prior should be empty when entering ConfigPatch").
            from torch._inductor.fx_passes import joint_graph

            joint_graph.lazy_init()
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
                        search_fn_pattern=generic_pattern(v) if self.exact_retrace else None,
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
            reason = (dropped_kwarg(match) or non_constant_scalar(v, match) or v.check(match)
                      or (specific_mismatch(v, match) if self.exact_retrace else None))
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
