"""Rerolling: fold a loop that Dynamo already unrolled back into one batched computation (post-grad FX).

A Python loop with a static trip count over constants, e.g.::

    for i, s in enumerate((3, 5, 7, 9)):          # or: for i in range(8): out[i] = cache[slots[i]] ...
        out[i] = cache[s] * scale[s]              # with slots a static Python list / tuple of ints

reaches the post-grad graph as N *chains* that differ only in the constants they index with, ending in a
run of ``select_scatter(acc, v_i, dim, j0 + i)`` (the ``out[i] = ...`` writes) or in one ``cat([v_0, ...])``
(``torch.stack`` / ``torch.cat`` of the per-iteration results).  This pass replaces the chains by one
batched chain: every per-chain node becomes the same op over a leading batch dimension of size N, the
indexing constants become an index tensor (``arange`` for an arithmetic sequence, else a constant list),
and the sink becomes one ``slice_scatter`` (or one ``reshape``).  The batched gather can then be caught by
the other rules (gather-dequant looks for such gathers).  (Dynamo's ``graph_region_tracker`` finds repeated regions for
its own compile-time deduplication; the chains here are found directly from their sinks, which also gives
the order of the iterations.)

Equality holds by construction and is checked node by node:

* the chains are *isomorphic*: walked in lockstep from the sink, every pair of nodes has the same target
  and the same arguments, except integer constants in index positions (``select``'s index, a ``slice``'s
  start and end at a constant width);
* batched ops: ``select`` / ``slice`` of a loop-invariant tensor with a varying index (-> ``aten.index``
  then the batch dim moved first), ``select`` / ``unsqueeze`` with a fixed dim of a batched value (dim + 1),
  ``view(dtype)`` of the same itemsize, and pointwise ops (``torch.Tag.pointwise``), batched operands
  reshaped so that per-item broadcasting is right-aligned as in each chain.  Each new node's fake value must
  have shape ``[N, *item]`` and the dtype of chain 0's node (so type promotion did not change; otherwise the
  region is left alone);
* the sink writes consecutive slices: ``select_scatter`` indices ``j0, j0 + 1, ...`` in order, or the
  ``cat`` holds exactly the chains' results, in order.  A write of values of another dtype than ``out``
  reaches the graph as ``select_scatter(acc, copy(select(acc, d, j), src), d, j)``; that copy never reads the
  view's values, so it is batched as ``convert_element_type(src)`` (broadcast to the slot) and the view
  dropped (``_write_copy``);
* nothing leaks: no intermediate or result of a chain is used outside its chain and its sink, no chain reads
  the tensor being written, and no mutating node lies between the first chain node and the sink (the
  batched reads happen at the sink).

Anything else is left alone and the reason counted in ``report()`` (rule ``reroll``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Graph, Node
from torch.utils._pytree import tree_flatten

from ..report import log, source_location, stats_for
from .common import Rule

aten = torch.ops.aten

MIN_CHAINS = 2
_INDEX_POSITIONS = {aten.select.int: (2,), aten.slice.Tensor: (2, 3)}


class _Reject(Exception):
    pass


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _is_static_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _mutating(n: Node) -> bool:
    if n.op != "call_function":
        return False
    schema = getattr(n.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable) or n.is_impure()


def _live_users(n: Node) -> list:
    """Users that matter: a pure node with no users of its own (e.g. a dead ``select`` of ``out``) does not."""
    return [u for u in n.users if u.users or _mutating(u) or u.op == "output"]


def _next_scatter(cur: Node) -> Optional[Node]:
    """The select_scatter along the same dim whose base is ``cur`` (the next ``out[j] = ...``), if unique."""
    nxt = [u for u in cur.users if u.target is aten.select_scatter.default and u.args[0] is cur
           and u.args[2] == cur.args[2]]
    return nxt[0] if len(nxt) == 1 else None


def _select_scatter_run(head: Node) -> list:
    """``[s_0, s_1, ...]``: select_scatters along one dim, each the base of the next.  Other users of the
    intermediate states (a read of ``out`` inside the loop) are rejected later, with the reason."""
    run = [head]
    while (nxt := _next_scatter(run[-1])) is not None:
        run.append(nxt)
    return run


def _is_run_head(n: Node) -> bool:
    if n.target is not aten.select_scatter.default:
        return False
    base = n.args[0]
    return not (isinstance(base, Node) and base.target is aten.select_scatter.default and _next_scatter(base) is n)


class RerollRule(Rule):
    """Fold N isomorphic unrolled chains into one batched chain (see the module docstring)."""

    name = "reroll"
    op = "batched aten ops (index_select + pointwise + slice_scatter / reshape)"
    anchors = (aten.select_scatter.default, aten.cat.default)

    def variants(self):
        return ()

    def diagnose(self, node):
        return "not rerolled"

    # -- candidates: the sinks -------------------------------------------------------------------------
    def _sinks(self, graph: Graph) -> list:
        out = []
        for n in graph.nodes:
            if n.op != "call_function":
                continue
            if n.target is aten.select_scatter.default and _is_run_head(n):
                run = _select_scatter_run(n)
                if len(run) >= MIN_CHAINS:
                    out.append(("select_scatter", run))
            elif n.target is aten.cat.default and isinstance(n.args[0], (list, tuple)) and len(n.args[0]) >= MIN_CHAINS:
                vals = n.args[0]
                if all(isinstance(v, Node) and v.op == "call_function" for v in vals) and \
                        len({v.target for v in vals}) == 1 and len(set(vals)) == len(vals):
                    out.append(("cat", [n]))
        return out

    def candidates(self, graph: Graph) -> list:
        return self._sinks(graph)

    def apply(self, graph: Graph) -> int:
        st = stats_for(self.name, self.op)
        done = 0
        for kind, nodes in self._sinks(graph):
            if any(n.graph is not graph or n not in graph.nodes for n in nodes):  # erased by an earlier reroll
                continue
            st.candidates += 1
            try:
                n_chains, n_ops = _reroll(graph, kind, nodes)
            except _Reject as r:
                st.rejections[f"{kind}: {r}"] += 1
                log.info("rule reroll left the %s at %s alone: %s", kind, source_location(nodes[-1]), r)
                continue
            done += 1
            st.matches[kind] += 1
            st.locations[source_location(nodes[-1])] += 1
            st.notes[f"rerolled {n_chains} chains of {n_ops} op(s) ending in {kind} into one batched chain"] += 1
        if done:
            graph.lint()
        return done


# ----------------------------------------------------------------------------------------------------
# chains

class _Chains:
    """Chain 0's private nodes, their counterparts in the other chains, and the varying constants."""

    def __init__(self, results: list, sinks: set, converts: frozenset = frozenset()):
        self.results = results
        self.converts = converts  # the sinks' converting copies (_write_copy): only their source is walked
        self.n = len(results)
        self.sinks = sinks
        self.peers: dict = {}  # chain-0 node -> [node of chain k for k in range(n)]
        self.varying: dict = {}  # (chain-0 node, flat arg position) -> [constant of chain k]
        self.owner: dict = {}  # any private node -> chain number
        self.varying_positions: set = set()
        for k, r in enumerate(results[1:], start=1):
            self._walk(results[0], r, k)
        for a, pos in self.varying_positions:
            if any(p is None for p in self.peers[a]):
                raise _Reject("chains are not isomorphic (a node has no counterpart)")
            self.varying[(a, pos)] = [tree_flatten((p.args, p.kwargs))[0][pos] for p in self.peers[a]]

    def _walk(self, a: Node, b: Node, k: int) -> None:
        if a in self.sinks or b in self.sinks:
            raise _Reject("a chain reads the tensor being written (loop-carried)")
        if a is b:
            if a in self.peers:
                raise _Reject("a node is shared by some chains and private to others")
            return
        if a in self.peers and self.peers[a][k] is not None:
            if self.peers[a][k] is not b:
                raise _Reject("chains are not isomorphic (different sharing)")
            return
        if a.op != "call_function" or b.op != "call_function":
            raise _Reject(f"chains read different inputs ({a.name} vs {b.name})")
        if a.target != b.target:
            raise _Reject(f"chains differ in a non-index op: {a.target} vs {b.target}")
        if self.owner.get(b, k) != k or (k and self.owner.get(a, 0) != 0):
            raise _Reject("chains overlap")
        if (a in self.converts) != (b in self.converts):
            raise _Reject("chains differ in how their value is written")
        if a in self.converts:  # copy(dst, src): dst gives only the shape and dtype (the same in every chain)
            va, vb = _val(a), _val(b)
            if va.dtype != vb.dtype or tuple(va.shape) != tuple(vb.shape):
                raise _Reject("chains write values of different shapes or dtypes")
            self.peers.setdefault(a, [a] + [None] * (self.n - 1))[k] = b
            self.owner[a], self.owner[b] = 0, k
            self._walk(a.args[1], b.args[1], k)
            return
        la, sa = tree_flatten((a.args, a.kwargs))
        lb, sb = tree_flatten((b.args, b.kwargs))
        if sa != sb:
            raise _Reject(f"chains call {a.target} with different argument structures")
        self.peers.setdefault(a, [a] + [None] * (self.n - 1))[k] = b
        self.owner[a], self.owner[b] = 0, k
        for pos, (x, y) in enumerate(zip(la, lb)):
            if isinstance(x, Node) or isinstance(y, Node):
                if not (isinstance(x, Node) and isinstance(y, Node)):
                    raise _Reject(f"chains differ in an argument of {a.target}")
                self._walk(x, y, k)
            elif type(x) is not type(y) or x != y:
                if pos not in _INDEX_POSITIONS.get(a.target, ()) or not (_is_static_int(x) and _is_static_int(y)):
                    raise _Reject(f"chains differ in a non-index argument of {a.target}: {x!r} vs {y!r}")
                self.varying_positions.add((a, pos))

    def order(self, graph: Graph) -> list:
        """Chain 0's private nodes in graph order."""
        return [n for n in graph.nodes if n in self.peers]

    def check_private(self, sink_of: dict) -> None:
        """Each private node of chain k is used only inside chain k or by chain k's sink."""
        for a, peers in self.peers.items():
            for k, b in enumerate(peers):
                if b is None:
                    raise _Reject("chains are not isomorphic (a node has no counterpart)")
                for u in _live_users(b):
                    if self.owner.get(u) == k:
                        continue
                    if u is sink_of[k] and b is self.results[k]:
                        continue
                    raise _Reject(f"a chain's {'result' if b is self.results[k] else 'intermediate'} is also "
                                  "used elsewhere")


# ----------------------------------------------------------------------------------------------------
# batched construction

# Node meta that Inductor's lowering reads, carried from each chain-0 pointwise node to its batched node.
# ``low_precision_pointwise_barrier`` marks the ops eager runs as ops of their own: with
# ``config.emulate_precision_casts`` Inductor rounds their 16-bit results as eager does (torch/_inductor/
# lowering.py, ``make_pointwise``); without it the batched chain skipped eager's roundings (found by the
# property suite's bf16 reroll class, session 11).
_LOWERING_META = ("low_precision_pointwise_barrier",)


class _Builder:
    def __init__(self, graph: Graph, chains: _Chains):
        self.graph, self.c, self.n = graph, chains, chains.n
        self.created: list = []
        self.batched: dict = {}  # chain-0 node -> batched node [N, *item]
        fake_vals = [v for v in (_val(x) for x in graph.nodes) if isinstance(v, torch.Tensor)]
        self.fake_mode = torch._guards.detect_fake_mode(fake_vals)
        if self.fake_mode is None:
            raise _Reject("no fake values on the graph")

    def call(self, target, *args, **kwargs) -> Node:
        node = self.graph.call_function(target, args, kwargs)
        self.created.append(node)
        fargs, fkwargs = torch.fx.node.map_arg((args, kwargs), _val)
        with self.fake_mode:
            node.meta["val"] = target(*fargs, **fkwargs)
        return node

    def iota(self, length, start, step, device) -> Node:
        """``arange(start, start + length * step, step)`` as Inductor's decomposed graphs spell it
        (``prims.iota``): ``aten.arange`` has no lowering post-grad (torch 2.11 asserts on it)."""
        return self.call(torch.ops.prims.iota.default, length, start=start, step=step, dtype=torch.int64,
                         device=device, requires_grad=False)

    def index_tensor(self, consts: list, device) -> Node:
        if any(not _is_static_int(c) or c < 0 for c in consts):
            raise _Reject("an index that is negative or not a static int")
        step = consts[1] - consts[0]
        if step != 0 and all(consts[k] == consts[0] + k * step for k in range(self.n)):
            return self.iota(self.n, consts[0], step, device)
        gm = self.graph.owning_module
        if gm is None:
            raise _Reject("an explicit index list needs the owning GraphModule")
        name = f"_dsa_reroll_index_{len([k for k in dir(gm) if k.startswith('_dsa_reroll_index_')])}"
        gm.register_buffer(name, torch.tensor(consts, dtype=torch.int64, device=device))
        node = self.graph.get_attr(name)
        self.created.append(node)
        with self.fake_mode:
            node.meta["val"] = self.fake_mode.from_tensor(getattr(gm, name))
        return node

    def gather(self, x: Node, dim: int, idx: Node) -> Node:
        """``index_select(x, dim, idx)``, spelled ``aten.index`` (post-grad graphs hold decomposed ops)."""
        return self.call(aten.index.Tensor, x, [None] * dim + [idx])

    def to_front(self, node: Node, dim: int) -> Node:
        if dim == 0:
            return node
        rank = _val(node).dim()
        perm = [dim] + [d for d in range(rank) if d != dim]
        return self.call(aten.permute.default, node, perm)

    def item_rank(self, a: Node) -> int:
        return _val(a).dim()

    def operand(self, x, rank: int):
        """Batched operand for a per-item rank ``rank``: singleton dims after the batch dim if needed."""
        if not isinstance(x, Node) or x not in self.batched:
            return x
        b = self.batched[x]
        extra = rank - (_val(b).dim() - 1)
        if extra > 0:
            shape = list(_val(b).shape)
            b = self.call(aten.reshape.default, b, [shape[0]] + [1] * extra + shape[1:])
        return b

    def build(self, a: Node) -> None:
        c, t = self.c, a.target
        var = {pos: consts for (node, pos), consts in c.varying.items() if node is a}
        nodes_in = [x for x in tree_flatten((a.args, a.kwargs))[0] if isinstance(x, Node)]
        if not var and not any(x in self.batched for x in nodes_in):
            return  # same value in every chain: chain 0's node stands for all of them
        va = _val(a)
        if not isinstance(va, torch.Tensor):
            raise _Reject(f"{t} does not produce a tensor")
        if a in c.converts:  # copy(select(out, d, j), src) == src converted to out's dtype, broadcast to the slot
            rank = va.dim()
            # (post-grad graphs spell a dtype conversion as prims.convert_element_type: _to_copy is decomposed)
            out = self.call(torch.ops.prims.convert_element_type.default, self.operand(a.args[1], rank), va.dtype)
            if tuple(_val(out).shape) != (self.n, *va.shape):
                out = self.call(aten.expand.default, out, [self.n, *va.shape])
        elif t in (aten.select.int, aten.slice.Tensor):
            x, dim = a.args[0], a.args[1]
            xv = _val(x)
            dim = dim + xv.dim() if dim < 0 else dim
            if var and x in self.batched:
                raise _Reject("a varying index into a per-chain value")
            if var:
                if t is aten.select.int:
                    idx = self.index_tensor(var[2], xv.device)
                    out = self.to_front(self.gather(x, dim, idx), dim)
                else:
                    if len(a.args) > 4 and a.args[4] != 1:
                        raise _Reject("a slice with a step")
                    starts = var.get(2) or [a.args[2]] * self.n
                    ends = var.get(3) or [a.args[3]] * self.n
                    # every chain's slice has the static width end - start in its traced value: not clamped
                    # (with a dynamic size, Dynamo guarded that the slice fits)
                    width = va.shape[dim]
                    if not _is_static_int(width) or any(
                            not (_is_static_int(s) and _is_static_int(e)) or s < 0 or e - s != width
                            or _val(peer).shape[dim] != width for s, e, peer in zip(starts, ends, c.peers[a])):
                        raise _Reject("slices of different or clamped widths")
                    st = self.index_tensor(starts, xv.device)
                    ar = self.iota(width, 0, 1, xv.device)
                    idx = self.call(aten.add.Tensor, self.call(aten.unsqueeze.default, st, 1), ar)
                    flat = self.call(aten.reshape.default, idx, [self.n * width])
                    g = self.gather(x, dim, flat)
                    shape = list(_val(g).shape)
                    g = self.call(aten.reshape.default, g, shape[:dim] + [self.n, width] + shape[dim + 1:])
                    out = self.to_front(g, dim)
            else:  # fixed index/slice of a batched value: one dim further right
                args = list(a.args)
                args[0], args[1] = self.batched[x], dim + 1
                out = self.call(t, *args, **a.kwargs)
        elif t is aten.unsqueeze.default:
            x, dim = a.args
            dim = dim + _val(x).dim() + 1 if dim < 0 else dim
            out = self.call(t, self.batched[x], dim + 1)
        elif t is aten.view.dtype:
            x, dtype = a.args
            if dtype.itemsize != _val(x).dtype.itemsize:
                raise _Reject("view(dtype) to another element size")
            out = self.call(t, self.batched[x], dtype)
        elif isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags:
            rank = va.dim()
            args, kwargs = torch.fx.node.map_arg((a.args, a.kwargs), lambda x: self.operand(x, rank))
            out = self.call(t, *args, **kwargs)
            for key in _LOWERING_META:
                if key in a.meta:
                    out.meta[key] = a.meta[key]
        else:
            raise _Reject(f"op {t} is not batchable by this pass")
        vo = _val(out)
        if vo.dtype != va.dtype or tuple(vo.shape) != (self.n, *va.shape):
            raise _Reject(f"batched {t} gives {vo.dtype} {tuple(vo.shape)}, chains {va.dtype} {tuple(va.shape)} "
                          "(type promotion or broadcasting would differ)")
        self.batched[a] = out

    def rollback(self) -> None:
        for node in reversed(self.created):
            if node.op == "get_attr":
                delattr(self.graph.owning_module, node.target)
            self.graph.erase_node(node)


def _write_copy(scatter: Node) -> Optional[Node]:
    """The value of ``scatter`` (``select_scatter(acc, v, d, j)``) when it is ``copy(select(acc, d, j), src)``,
    used once, with the view used only by it: how functionalization writes ``out[j] = src`` when ``src`` has
    another dtype than ``out`` (or broadcasts).  Its value is ``src`` converted to ``out``'s dtype and broadcast
    to the slot's shape: the view's values are never read.  Else None."""
    acc, v, d, j = scatter.args[:4]
    if not (isinstance(v, Node) and v.target is aten.copy.default and len(v.args) == 2 and not v.kwargs
            and len(v.users) == 1):
        return None
    dst = v.args[0]
    if not (isinstance(dst, Node) and dst.target is aten.select.int and tuple(dst.args) == (acc, d, j)
            and len(dst.users) == 1 and isinstance(v.args[1], Node)):
        return None
    return v


def _reaches(starts: list, targets: set, limit: int = 10000) -> bool:
    """Whether a forward walk over users from ``starts`` meets one of ``targets``."""
    seen, todo = set(), list(starts)
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in targets:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.users)
    return False


def _reroll(graph: Graph, kind: str, nodes: list) -> tuple:
    if kind == "select_scatter":
        results = [s.args[1] for s in nodes]
        dim, j0 = nodes[0].args[2], nodes[0].args[3]
        if not all(_is_static_int(s.args[3]) for s in nodes) or \
                [s.args[3] for s in nodes] != list(range(j0, j0 + len(nodes))):
            raise _Reject(f"writes to {[s.args[3] for s in nodes]}: not consecutive slices in order "
                          "(overlapping or reordered writes)")
        converts = [_write_copy(s) for s in nodes]
        converts = frozenset(converts) if all(converts) else frozenset()
        dsts = {c.args[0] for c in converts}
        sink_of = dict(enumerate(nodes))
        for s in nodes[:-1]:
            extra = [u for u in _live_users(s) if u is not _next_scatter(s) and u not in dsts]
            if extra:
                raise _Reject("a chain reads the tensor being written (loop-carried)" if _reaches(extra, set(nodes))
                              else "an intermediate state of the output is read elsewhere")
        base = nodes[0].args[0]
        if _val(base).dtype != _val(results[0]).dtype:
            raise _Reject("written values have another dtype than the output")
        sinks = set(nodes)
    else:
        cat = nodes[0]
        results = list(cat.args[0])
        sink_of = {k: cat for k in range(len(results))}
        sinks = {cat}
        converts, dsts = frozenset(), set()
    if not all(isinstance(r, Node) for r in results):
        raise _Reject("a written value is not a graph node")
    chains = _Chains(results, sinks, converts)
    chains.check_private(sink_of)
    order = chains.order(graph)
    if not chains.varying:
        raise _Reject("the chains read the same elements (nothing indexes by the iteration)")
    # no mutation between the first chain node and the sink: the batched reads move to the sink
    pos = {n: i for i, n in enumerate(graph.nodes)}
    first = min(pos[b] for peers in chains.peers.values() for b in peers)
    last = pos[nodes[-1]]
    if any(_mutating(n) for n in list(graph.nodes)[first:last]):
        raise _Reject("a mutating op lies between the chains and the sink")
    b = _Builder(graph, chains)
    try:
        with graph.inserting_before(nodes[-1]):
            for a in order:
                b.build(a)
            if results[0] not in b.batched:
                raise _Reject("the chains' results do not depend on the index")
            batched = b.batched[results[0]]
            if kind == "select_scatter":
                rank = _val(base).dim()
                d = dim + rank if dim < 0 else dim
                src = batched if d == 0 else b.call(aten.permute.default, batched,
                                                    list(range(1, d + 1)) + [0] + list(range(d + 1, rank)))
                new = b.call(aten.slice_scatter.default, base, src, d, j0, j0 + len(nodes), 1)
                old_val = _val(nodes[-1])
            else:
                cat = nodes[0]
                item = list(_val(results[0]).shape)
                d = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
                d = d + len(item) if d < 0 else d
                if not item:
                    raise _Reject("cat of 0-d values")
                src = batched if d == 0 else b.call(aten.permute.default, batched,
                                                    list(range(1, d + 1)) + [0] + list(range(d + 1, len(item) + 1)))
                new = b.call(aten.reshape.default, src, item[:d] + [len(results) * item[d]] + item[d + 1:])
                old_val = _val(cat)
            nv = _val(new)
            if nv.dtype != old_val.dtype or tuple(nv.shape) != tuple(old_val.shape):
                raise _Reject("the batched result differs in shape or dtype from the sink's")
    except _Reject:
        b.rollback()
        raise
    new.meta.setdefault("stack_trace", nodes[-1].meta.get("stack_trace"))
    nodes[-1].replace_all_uses_with(new)
    # erase the sinks and the chains (and the dead views of the accumulators), last first
    doomed = list(nodes) + [p for peers in chains.peers.values() for p in peers]
    doomed += [u for n in doomed for u in n.users if not u.users and not _mutating(u) and u.op != "output"]
    doomed += list(dsts)  # the converting copies' destination views (dead once the copies are gone)
    for n in sorted(set(doomed), key=lambda n: -pos.get(n, 0)):
        if not n.users:
            graph.erase_node(n)
    return len(results), len(order)


__all__ = ["RerollRule"]
