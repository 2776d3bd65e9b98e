"""Recognize per-token Python loops of known shapes and translate them into vectorized code.

The translation is syntax-directed: every statement and expression of the loop body is mapped to a
batched form whose row ``r`` is exactly what iteration ``r`` computed, or the whole function is refused
with a reason.  Nothing is guessed from names.  Two loop shapes are lifted:

* **map loops**: one iteration per token, writing ``out[i] = value`` rows.  Header ``for i, x in
  enumerate(t.tolist())``, ``for i in range(n)`` (``n`` an int, ``len(t)``, ``t.shape[0]``...), or
  ``enumerate(zip(a.tolist(), b.tolist()))``.  The body may assign locals, skip rows with ``if cond:
  continue``, ``divmod`` / ``+ - * // %`` loop ints, gather from loop-invariant tensors with loop-int
  indices or loop-int slices of a provably constant width (``t[page, pos*D:(pos+1)*D]``, width proved
  with sympy; a start ``c + w * s`` with ``s = x % m`` becomes tile ``s`` of a ``[M, w]`` view, so the
  FP8 bytes and the inline scales of one token are both ``view[page, pos]``, the form the gather-dequant
  rule matches), call ``int()``/``.item()`` on gathered integer scalars, apply ``.view(dtype)``,
  ``.to(dtype)``/``.float()``... and elementwise arithmetic, and call helpers whose body is a single
  ``return`` (nested ``def``s before the loop, or functions of the same module), which are inlined.
  This is the FP8 indexer-cache read of DeepSeek-V3.2 serving code (vLLM / SGLang ``slot_mapping``
  loops; the paged layout of DeepSeek's ``fp8_index`` cache).
* **ragged loops**: a loop over requests, then ``for t in range(n_b)`` over each request's tokens,
  appending ints to lists that are turned into tensors with ``torch.tensor(lst, dtype=...)`` after the
  loop, with running offsets ``acc += len_b`` at the end of the request body.  This is the per-token
  causal window ``[ks, ke)`` of the DeepSeek-V3.2 indexer prefill (vLLM's ``cu_seqlen_ks``/``ke``).

Refused (``Refusal.reason`` says which): ``break``/``return``/``while`` in the loop, a write to anything
but ``out[i]`` with the loop index (``out[i-1]``), reads of the tensor being written, a name read before
it is assigned in the iteration, ``+=`` on an outer variable (except the ragged offsets above), list
mutation other than the ragged appends, a body-local or loop variable used after the loop, calls not
known to be pure, ``/`` or ``**`` on loop ints (Python floats are doubles), arithmetic mixing loop ints
with tensors (type promotion would differ), slices with a step or an open end, closures, decorators.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
from typing import Optional, Union

import sympy


class Refuse(Exception):
    def __init__(self, reason: str, node: Optional[ast.AST] = None):
        super().__init__(reason)
        self.reason = reason
        self.lineno = getattr(node, "lineno", None)


@dataclasses.dataclass
class Refusal:
    """A function with a per-token loop that is left alone."""

    name: str
    location: str
    reason: str


@dataclasses.dataclass
class Plan:
    """A lifted function: the generated source and what it needs at trace time."""

    name: str
    location: str
    kinds: list  # "map" / "ragged", one per lifted loop
    source: str  # the vectorized function, as ``def _vectorized(...)``
    data_dependent_length: bool  # ragged loops: output length = a sum of the inputs' values (unbacked)


# ----------------------------------------------------------------------------------------------------
# loop headers

def _is_tolist(e) -> bool:
    return isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and e.func.attr == "tolist" \
        and not e.args and not e.keywords


def _known_header(it) -> bool:
    if _is_tolist(it):
        return True
    if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in ("range", "enumerate", "zip"):
        return True
    return False


def _names_loaded(nodes) -> set:
    out = set()
    for n in nodes:
        for m in ast.walk(n):
            if isinstance(m, ast.Name) and isinstance(m.ctx, ast.Load):
                out.add(m.id)
    return out


def _names_stored(nodes) -> set:
    out = set()
    for n in nodes:
        for m in ast.walk(n):
            if isinstance(m, ast.Name) and isinstance(m.ctx, (ast.Store, ast.Del)):
                out.add(m.id)
    return out


# ----------------------------------------------------------------------------------------------------
# values

@dataclasses.dataclass
class Val:
    kind: str  # "inv" (loop-invariant, any Python value), "bint" (loop ints [N]), "bten" ([N, *item]),
    #            "bbool" (per-row bool [N]), "tuple" (divmod result)
    code: str
    sym: Optional[sympy.Expr] = None
    parts: tuple = ()


_PURE_BUILTINS = {"len", "min", "max", "abs", "int", "float", "bool"}
_UNARY_METHODS = {"float", "half", "bfloat16", "double", "long", "int", "abs", "neg", "exp", "sqrt", "relu",
                  "clone", "contiguous", "sigmoid", "reciprocal"}
_BINOP = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}
_CMP = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}


class _Translator:
    """Translates expressions of one loop body into lines of batched code."""

    def __init__(self, gen, env: dict, body_assigned: set, helpers: dict, valid: str, inv_ok=None):
        self.gen = gen  # shared fresh-name generator / line sink
        self.env = env
        self.body_assigned = body_assigned
        self.helpers = helpers
        self.valid = valid
        self.depth = 0

    def tmp(self, code: str) -> str:
        return self.gen.emit(code)

    # -- expressions ----------------------------------------------------------------------------------
    def ex(self, e) -> Val:
        m = getattr(self, "ex_" + type(e).__name__, None)
        if m is None:
            raise Refuse(f"unsupported expression in the loop body: {ast.unparse(e)}", e)
        return m(e)

    def ex_Constant(self, e):
        sym = sympy.Integer(e.value) if isinstance(e.value, int) and not isinstance(e.value, bool) else None
        return Val("inv", repr(e.value), sym)

    def ex_Name(self, e):
        if e.id in self.env:
            return self.env[e.id]
        if e.id in self.body_assigned:
            raise Refuse(f"`{e.id}` is read before it is assigned in the iteration (a loop-carried value)", e)
        return Val("inv", e.id, sympy.Symbol(e.id))

    def _inv_source(self, e) -> Val:
        """An invariant compound expression: hoisted to a temporary (evaluated once, pure by the checks)."""
        name = self.tmp(ast.unparse(e))
        return Val("inv", name, sympy.Symbol(name))

    def ex_Attribute(self, e):
        base = self.ex(e.value)
        if base.kind == "inv":
            return Val("inv", f"{base.code}.{e.attr}")
        raise Refuse(f"attribute `.{e.attr}` of a per-iteration value", e)

    def ex_Subscript(self, e):
        base = self.ex(e.value)
        parts = e.slice.elts if isinstance(e.slice, ast.Tuple) else [e.slice]
        if base.kind == "inv":
            specs, batched = [], False
            for p in parts:
                if isinstance(p, ast.Slice):
                    if p.step is not None:
                        raise Refuse(f"slice with a step: {ast.unparse(e)}", e)
                    if p.lower is None and p.upper is None:
                        specs.append("('full',)")
                        continue
                    if p.upper is None:
                        raise Refuse(f"slice with an open end (its width varies): {ast.unparse(e)}", e)
                    lo = self.ex(p.lower) if p.lower is not None else Val("inv", "0", sympy.Integer(0))
                    hi = self.ex(p.upper)
                    if lo.kind not in ("inv", "bint") or hi.kind not in ("inv", "bint"):
                        raise Refuse(f"slice bounds that are not ints: {ast.unparse(e)}", e)
                    batched = batched or lo.kind == "bint" or hi.kind == "bint"
                    if lo.sym is None or hi.sym is None:
                        raise Refuse(f"slice width not provably constant: {ast.unparse(p)}", p)
                    width = sympy.expand(hi.sym - lo.sym)
                    loop_syms = {s for s in width.free_symbols if s.name.startswith("_b")}
                    if loop_syms:
                        raise Refuse(f"slice width {width} depends on the iteration: {ast.unparse(p)}", p)
                    wcode = sympy.pycode(width)
                    tile = self._tile_spec(lo, width, wcode)
                    if tile is not None:
                        specs.append(tile)
                        continue
                    locode = lo.code if lo.kind == "bint" else \
                        self.tmp(f"_rt.torch.full(({self.valid}.shape[0],), _rt.check_int({lo.code}), dtype=_rt.torch.int64)")
                    specs.append(f"('slice', {locode}, {wcode})")
                elif isinstance(p, (ast.Starred,)) or (isinstance(p, ast.Constant) and p.value in (None, Ellipsis)):
                    raise Refuse(f"None/Ellipsis index: {ast.unparse(e)}", e)
                else:
                    v = self.ex(p)
                    if v.kind == "bint":
                        specs.append(f"('idx', {self.live(v.code)})")
                        batched = True
                    elif v.kind == "inv":
                        specs.append(f"('int', {v.code})")
                    else:
                        raise Refuse(f"index that is a per-iteration tensor: {ast.unparse(p)}", p)
            if not batched:
                if any(isinstance(p, ast.Slice) for p in parts):
                    # invariant slicing: evaluate once (no per-iteration difference)
                    return self._inv_source(e)
                return Val("inv", f"{base.code}[{ast.unparse(e.slice)}]")
            return Val("bten", self.tmp(f"_rt.gather({base.code}, {self.valid}, [{', '.join(specs)}])"))
        if base.kind == "bten":
            idx = []
            for p in parts:
                if isinstance(p, ast.Slice):
                    for b in (p.lower, p.upper, p.step):
                        if b is not None and self.ex(b).kind != "inv":
                            raise Refuse(f"per-iteration slice of a per-iteration tensor: {ast.unparse(e)}", e)
                    idx.append(ast.unparse(p) if ast.unparse(p) != ":" else "slice(None)")
                else:
                    v = self.ex(p)
                    if v.kind != "inv":
                        raise Refuse(f"per-iteration index of a per-iteration tensor: {ast.unparse(e)}", e)
                    idx.append(v.code)
            idx = [f"slice({', '.join(ast.unparse(b) if b is not None else 'None' for b in (p.lower, p.upper, p.step))})"
                   if isinstance(p, ast.Slice) else c for p, c in zip(parts, idx)]
            return Val("bten", self.tmp(f"_rt.item_index({base.code}, ({', '.join(idx)},))"))
        raise Refuse(f"indexing a loop int: {ast.unparse(e)}", e)

    def _tile_spec(self, lo: Val, width, wcode: str) -> Optional[str]:
        """``('tile', s, c, w, m)`` when the slice start is ``c + w * s`` with ``s = x % m`` a loop int, and
        ``c``, ``w`` invariant: the slice is then tile ``s`` of the dimension's ``[M, w]`` view from ``c``,
        one index per row instead of ``w`` (``runtime.gather``; the gather-dequant rule matches it)."""
        if lo.kind != "bint" or lo.sym is None:
            return None
        loop_syms = [x for x in lo.sym.free_symbols if x.name.startswith("_b")]
        if len(loop_syms) != 1 or loop_syms[0] not in self.gen.mods:
            return None
        s = loop_syms[0]
        k = sympy.expand(sympy.diff(lo.sym, s))
        c = sympy.expand(lo.sym - k * s)
        if k.free_symbols & {s} or c.free_symbols & {s} or sympy.expand(k - width) != 0:
            return None
        code, m = self.gen.mods[s]
        return f"('tile', {self.live(code)}, {sympy.pycode(c)}, {wcode}, {m})"

    def live(self, code: str) -> str:
        """The loop int ``code`` with dead rows reading 0, emitted once per (rows, value): every gather of
        the loop then indexes with the same graph node (the gather-dequant rule needs the FP8 bytes and
        their scales indexed by the same nodes; the graph has no CSE pass before ours)."""
        key = (self.valid, code)
        if key not in self.gen.live:
            self.gen.live[key] = self.tmp(f"_rt.live_index({self.valid}, {code})")
        return self.gen.live[key]

    def _bint_mod(self, code: str, divisor: Val) -> Val:
        sym = sympy.Symbol("_b" + code)
        if divisor.kind == "inv":
            self.gen.mods[sym] = (code, divisor.code)
        return Val("bint", code, sym)

    def ex_BinOp(self, e):
        op = _BINOP.get(type(e.op))
        if op is None:
            raise Refuse(f"operator {type(e.op).__name__}", e)
        a, b = self.ex(e.left), self.ex(e.right)
        kinds = {a.kind, b.kind}
        if kinds == {"inv"}:
            sym = None
            if a.sym is not None and b.sym is not None and op in ("+", "-", "*"):
                sym = {"+": a.sym + b.sym, "-": a.sym - b.sym, "*": a.sym * b.sym}[op]
            code = f"({a.code} {op} {b.code})"
            return Val("inv", code, sym if sym is not None else sympy.Symbol(self.tmp(code)))
        if kinds <= {"inv", "bint"}:
            if op not in ("+", "-", "*", "//", "%"):
                raise Refuse(f"operator {op} on loop ints (Python would compute a float/bigint)", e)
            name = self.tmp(f"_rt.int_binop({op!r}, {a.code}, {b.code})")
            if op == "%":
                return self._bint_mod(name, b)
            sym = None
            if a.sym is not None and b.sym is not None and op in ("+", "-", "*"):
                sym = {"+": a.sym + b.sym, "-": a.sym - b.sym, "*": a.sym * b.sym}[op]
            return Val("bint", name, sym if sym is not None else sympy.Symbol("_b" + name))
        if kinds <= {"inv", "bten"}:
            return Val("bten", self.tmp(
                f"_rt.tensor_binop({op!r}, {a.code}, {a.kind == 'bten'}, {b.code}, {b.kind == 'bten'})"))
        raise Refuse(f"arithmetic mixing loop ints and tensors (type promotion would differ): {ast.unparse(e)}", e)

    def ex_UnaryOp(self, e):
        v = self.ex(e.operand)
        if isinstance(e.op, ast.Not):
            if v.kind == "bbool":
                return Val("bbool", self.tmp(f"~{v.code}"))
            if v.kind == "inv":
                return Val("inv", f"(not {v.code})")
        elif isinstance(e.op, ast.USub):
            if v.kind == "inv":
                return Val("inv", f"(-{v.code})", -v.sym if v.sym is not None else None)
            if v.kind in ("bint", "bten"):
                return Val(v.kind, self.tmp(f"(-{v.code})"), -v.sym if v.sym is not None else None)
        raise Refuse(f"unsupported unary operation: {ast.unparse(e)}", e)

    def ex_Compare(self, e):
        vals = [self.ex(e.left)] + [self.ex(c) for c in e.comparators]
        if all(v.kind == "inv" for v in vals):
            return Val("inv", f"({ast.unparse(e)})")
        if any(v.kind not in ("inv", "bint") for v in vals):
            raise Refuse(f"comparison of per-iteration tensors: {ast.unparse(e)}", e)
        terms = []
        for op, a, b in zip(e.ops, vals, vals[1:]):
            if type(op) not in _CMP:
                raise Refuse(f"comparison {type(op).__name__}", e)
            terms.append(self.tmp(f"_rt.int_cmp({_CMP[type(op)]!r}, {a.code}, {b.code})"))
        return Val("bbool", self.tmp(" & ".join(terms)))

    def ex_BoolOp(self, e):
        vals = [self.ex(v) for v in e.values]
        if any(v.kind != "bbool" for v in vals):
            raise Refuse(f"and/or over values that are not all per-iteration conditions: {ast.unparse(e)}", e)
        op = " & " if isinstance(e.op, ast.And) else " | "
        return Val("bbool", self.tmp(op.join(v.code for v in vals)))

    def ex_Call(self, e):
        if e.keywords and not (isinstance(e.func, ast.Attribute) and e.func.attr == "to"):
            raise Refuse(f"call with keyword arguments: {ast.unparse(e)}", e)
        f = e.func
        if isinstance(f, ast.Name):
            args = [self.ex(a) for a in e.args]
            if f.id == "divmod" and len(args) == 2:
                a, b = args
                if a.kind not in ("bint", "inv") or b.kind not in ("bint", "inv") or {a.kind, b.kind} == {"inv"}:
                    raise Refuse(f"divmod of non-ints: {ast.unparse(e)}", e)
                q = self.tmp(f"_rt.int_binop('//', {a.code}, {b.code})")
                r = self.tmp(f"_rt.int_binop('%', {a.code}, {b.code})")
                return Val("tuple", "", parts=(Val("bint", q, sympy.Symbol("_b" + q)), self._bint_mod(r, b)))
            if f.id == "int" and len(args) == 1:
                a = args[0]
                if a.kind == "bint":
                    return a
                if a.kind == "bten":
                    return Val("bint", self.tmp(f"_rt.int_of_tensor({a.code})"), sympy.Symbol("_b" + a.code))
            if f.id in self.helpers and f.id not in self.env:
                return self.inline(self.helpers[f.id], args, e)
            if f.id in _PURE_BUILTINS and f.id not in self.env and all(a.kind == "inv" for a in args):
                return self._inv_source(e)
            raise Refuse(f"call to `{f.id}` in the loop body (not a known pure function or a single-return helper)", e)
        if isinstance(f, ast.Attribute):
            base = self.ex(f.value)
            meth = f.attr
            if base.kind == "inv":
                if meth in ("size", "dim", "numel", "stride") and all(self.ex(a).kind == "inv" for a in e.args):
                    return self._inv_source(e)
                raise Refuse(f"method call `.{meth}()` on a loop-invariant value inside the loop (not known to be pure)", e)
            if base.kind != "bten":
                raise Refuse(f"method `.{meth}()` on a loop int", e)
            if meth == "item" and not e.args:
                return Val("bint", self.tmp(f"_rt.int_of_tensor({base.code})"), sympy.Symbol("_b" + base.code))
            if meth == "view" and len(e.args) == 1 and not e.keywords:
                d = self.ex(e.args[0])
                if d.kind != "inv":
                    raise Refuse("view() with a per-iteration argument", e)
                return Val("bten", self.tmp(f"_rt.view_dtype({base.code}, {d.code})"))
            if meth == "to" and len(e.args) + len(e.keywords) == 1:
                a = e.args[0] if e.args else (e.keywords[0].value if e.keywords[0].arg == "dtype" else None)
                if a is None:
                    raise Refuse(f"unsupported .to() call: {ast.unparse(e)}", e)
                d = self.ex(a)
                if d.kind != "inv":
                    raise Refuse("to() with a per-iteration argument", e)
                return Val("bten", self.tmp(f"_rt.to_dtype({base.code}, {d.code})"))
            if meth in _UNARY_METHODS and not e.args:
                return Val("bten", self.tmp(f"{base.code}.{meth}()"))
            raise Refuse(f"method `.{meth}()` on a per-iteration tensor", e)
        raise Refuse(f"unsupported call: {ast.unparse(e)}", e)

    def inline(self, fdef: ast.FunctionDef, args, call):
        if self.depth > 4:
            raise Refuse("helper calls nested too deep", call)
        a = fdef.args
        if a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults or len(a.args) != len(args):
            raise Refuse(f"helper `{fdef.name}` has a signature the inliner does not take", call)
        body = [s for s in fdef.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        env = dict(self.env)
        for p, v in zip(a.args, args):
            env[p.arg] = v
        sub = _Translator(self.gen, env, set(), self.helpers, self.valid)
        sub.depth = self.depth + 1
        for s in body[:-1]:
            if not (isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)):
                raise Refuse(f"helper `{fdef.name}` is not straight-line assignments then return", s)
            sub.env[s.targets[0].id] = sub.ex(s.value)
        if not body or not isinstance(body[-1], ast.Return) or body[-1].value is None:
            raise Refuse(f"helper `{fdef.name}` does not end with `return <expr>`", call)
        return sub.ex(body[-1].value)


class _Gen:
    def __init__(self):
        self.lines: list = []
        self.counter = itertools.count()
        # loop ints that are ``x % m`` with an invariant ``m``: symbol -> (code, code of m).  In Python such a
        # value lies in [0, m) when m > 0, which lets a slice ``[c + s*w : c + (s+1)*w]`` read tile ``s``
        # of a ``[M, w]`` view (see ``_tile_spec``).
        self.mods: dict = {}
        self.live: dict = {}  # (rows-alive code, loop int code) -> code of the int with dead rows at 0

    def emit(self, code: str) -> str:
        name = f"_t{next(self.counter)}"
        self.lines.append(f"{name} = {code}")
        return name

    def line(self, code: str):
        self.lines.append(code)


# ----------------------------------------------------------------------------------------------------
# loop shapes

def _tolist_base(e):
    return ast.unparse(e.func.value)


def _header_values(it, target, gen: _Gen):
    """(values: [(name, Val)], n_code, index_name) for a known per-token header, or Refuse."""
    def single(src, tgt):
        if not isinstance(tgt, ast.Name):
            raise Refuse(f"loop target {ast.unparse(tgt)} is not a name", tgt)
        if _is_tolist(src):
            base = _tolist_base(src)
            code = gen.emit(f"_rt.ints_of_list({base})")
            return [(tgt.id, Val("bint", code, sympy.Symbol("_b" + code)))], f"{base}.shape[0]"
        raise Refuse(f"iterating over {ast.unparse(src)} (only t.tolist(), range(n), enumerate and zip of those)", src)

    if _is_tolist(it):
        vals, n = single(it, target)
        return vals, n, None
    if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Name)):
        raise Refuse(f"loop over {ast.unparse(it)}", it)
    fname = it.func.id
    if fname == "range":
        if len(it.args) != 1 or it.keywords:
            raise Refuse("range() with a start or step", it)
        if not isinstance(target, ast.Name):
            raise Refuse("range() loop target is not a name", target)
        n = gen.emit(f"max(_rt.check_int({ast.unparse(it.args[0])}), 0)")
        code = gen.emit(f"_rt.torch.arange({n}, dtype=_rt.torch.int64)")
        return [(target.id, Val("bint", code, sympy.Symbol("_b" + code)))], n, target.id
    if fname == "enumerate":
        if len(it.args) != 1 or it.keywords:
            raise Refuse("enumerate() with a start", it)
        if not (isinstance(target, ast.Tuple) and len(target.elts) == 2 and isinstance(target.elts[0], ast.Name)):
            raise Refuse("enumerate() target is not `i, x`", target)
        vals, n, _ = _header_values(it.args[0], target.elts[1], gen)
        idx = gen.emit(f"_rt.torch.arange({n}, dtype=_rt.torch.int64, device={_valid_device(vals)})")
        return [(target.elts[0].id, Val("bint", idx, sympy.Symbol("_b" + idx)))] + vals, n, target.elts[0].id
    if fname == "zip":
        if it.keywords or not isinstance(target, ast.Tuple) or len(target.elts) != len(it.args):
            raise Refuse("zip() target does not unpack one name per sequence", target)
        vals, ns = [], []
        for src, tgt in zip(it.args, target.elts):
            v, n = single(src, tgt)
            vals += v
            ns.append(n)
        n = gen.emit(f"min({', '.join(ns)})") if len(ns) > 1 else ns[0]
        vals = [(name, Val("bint", gen.emit(f"{v.code}[:{n}]"), v.sym)) for name, v in vals]
        return vals, n, None
    raise Refuse(f"loop over {ast.unparse(it)}", it)


def _valid_device(vals) -> str:
    return f"{vals[-1][1].code}.device" if vals else "None"


def _translate_map(loop: ast.For, gen: _Gen, helpers: dict, body_assigned: set) -> None:
    vals, n, index = _header_values(loop.iter, loop.target, gen)
    valid = gen.emit(f"_rt.torch.ones(({n},), dtype=_rt.torch.bool, device={_valid_device(vals)})")
    env = dict(vals)
    tr = _Translator(gen, env, body_assigned, helpers, valid)
    targets = {id(t.value) for s in ast.walk(loop) if isinstance(s, ast.Assign)
               for t in s.targets if isinstance(t, ast.Subscript)}
    loaded = {m.id for s in loop.body for m in ast.walk(s)
              if isinstance(m, ast.Name) and isinstance(m.ctx, ast.Load) and id(m) not in targets}
    wrote = False
    for s in loop.body:
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant):
            continue
        if isinstance(s, ast.Pass):
            continue
        if isinstance(s, ast.If):
            if any(isinstance(x, ast.Break) for x in ast.walk(s)):
                raise Refuse("`break`: the trip count depends on the data", s)
            if s.orelse or len(s.body) != 1 or not isinstance(s.body[0], ast.Continue):
                raise Refuse("an `if` whose body is not a lone `continue`", s)
            c = tr.ex(s.test)
            if c.kind != "bbool":
                raise Refuse(f"`if {ast.unparse(s.test)}: continue` on a condition that is not per-iteration ints", s)
            valid = gen.emit(f"_rt.keep({tr.valid}, {c.code})")
            tr.valid = valid
            continue
        if isinstance(s, ast.Assign) and len(s.targets) == 1:
            t = s.targets[0]
            if isinstance(t, ast.Name):
                v = tr.ex(s.value)
                if v.kind == "tuple":
                    raise Refuse("tuple value assigned to one name", s)
                env[t.id] = v
                continue
            if isinstance(t, ast.Tuple) and all(isinstance(x, ast.Name) for x in t.elts):
                v = tr.ex(s.value)
                if v.kind != "tuple" or len(v.parts) != len(t.elts):
                    raise Refuse(f"tuple assignment from {ast.unparse(s.value)}", s)
                for x, p in zip(t.elts, v.parts):
                    env[x.id] = p
                continue
            if isinstance(t, ast.Subscript):
                if not isinstance(t.value, ast.Name) or t.value.id in env:
                    raise Refuse(f"write to {ast.unparse(t)}: not a loop-invariant tensor", s)
                if index is None or not (isinstance(t.slice, ast.Name) and t.slice.id == index):
                    raise Refuse(f"writes {ast.unparse(t)}: only `out[i]` with the loop index i is lifted", s)
                if t.value.id in loaded:
                    raise Refuse(f"the body reads `{t.value.id}`, which it writes (loop-carried)", s)
                if index in body_assigned:
                    raise Refuse(f"the loop index `{index}` is reassigned in the body", s)
                v = tr.ex(s.value)
                if v.kind not in ("bten", "inv", "bint"):
                    raise Refuse(f"value written to {ast.unparse(t)} is not a tensor or number", s)
                if v.kind == "bint":
                    raise Refuse(f"writes a loop int into {ast.unparse(t)} (dtype conversion of Python ints)", s)
                gen.line(f"_rt.write_rows({t.value.id}, {tr.valid}, {v.code}, {v.kind == 'bten'})")
                wrote = True
                continue
            raise Refuse(f"assignment to {ast.unparse(t)}", s)
        if isinstance(s, ast.Break):
            raise Refuse("`break`: the trip count depends on the data", s)
        if isinstance(s, ast.Return):
            raise Refuse("`return` inside the loop", s)
        if isinstance(s, ast.AugAssign):
            raise Refuse(f"`{ast.unparse(s)}`: a loop-carried update", s)
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and isinstance(s.value.func, ast.Attribute) \
                and s.value.func.attr in ("append", "extend", "insert", "pop", "add", "update"):
            raise Refuse(f"mutates `{ast.unparse(s.value.func.value)}` ({ast.unparse(s)})", s)
        if isinstance(s, (ast.For, ast.While)):
            raise Refuse("a nested loop that is not the ragged per-request form", s)
        raise Refuse(f"unsupported statement in the loop body: {ast.unparse(s).splitlines()[0]}", s)
    if not wrote:
        raise Refuse("the loop writes no `out[i]` rows (nothing to lift)", loop)


def _translate_ragged(loop: ast.For, gen: _Gen, helpers: dict, fn_body: list, after: list) -> dict:
    """Returns {list name: vector code} for the lists the inner loop appends to."""
    vals, n, _ = _header_values(loop.iter, loop.target, gen)
    valid = gen.emit(f"_rt.torch.ones(({n},), dtype=_rt.torch.bool, device={_valid_device(vals)})")
    env = dict(vals)
    body = [s for s in loop.body if not isinstance(s, ast.Pass)]
    inner_at = [k for k, s in enumerate(body) if isinstance(s, ast.For)]
    if len(inner_at) != 1:
        raise Refuse("not one inner per-token loop", loop)
    k = inner_at[0]
    before, inner, trailing = body[:k], body[k], body[k + 1:]
    accs = {}
    for s in trailing:
        if not (isinstance(s, ast.AugAssign) and isinstance(s.op, ast.Add) and isinstance(s.target, ast.Name)):
            raise Refuse(f"after the inner loop only `acc += value` is lifted, not `{ast.unparse(s)}`", s)
        accs[s.target.id] = s
    body_assigned = _names_stored(before)
    tr = _Translator(gen, env, body_assigned, helpers, valid)
    for s in before:
        if accs and (_names_loaded([s]) & set(accs)):
            raise Refuse("a running offset is read before the inner loop", s)
        if isinstance(s, ast.If):
            if s.orelse or len(s.body) != 1 or not isinstance(s.body[0], ast.Continue):
                raise Refuse("an `if` whose body is not a lone `continue`", s)
            c = tr.ex(s.test)
            if c.kind != "bbool":
                raise Refuse("`if ...: continue` on a condition that is not per-request ints", s)
            tr.valid = gen.emit(f"_rt.keep({tr.valid}, {c.code})")
        elif isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name):
            v = tr.ex(s.value)
            if v.kind not in ("bint", "inv"):
                raise Refuse(f"per-request value that is not an int: {ast.unparse(s)}", s)
            env[s.targets[0].id] = v
        else:
            raise Refuse(f"unsupported statement before the inner loop: {ast.unparse(s).splitlines()[0]}", s)
    # running offsets: value seen by request b = init + sum of the increments of the live requests before b
    for name, s in accs.items():
        if any(isinstance(x, ast.Name) and x.id == name for x in ast.walk(s.value)):
            raise Refuse(f"`{name}` increment depends on itself", s)
        inc = tr.ex(s.value)
        if inc.kind not in ("bint", "inv"):
            raise Refuse(f"`{name}` increment is not an int", s)
        inc_code = inc.code if inc.kind == "bint" else gen.emit(f"_rt.torch.full(({n},), _rt.check_int({inc.code}), dtype=_rt.torch.int64)")
        live = gen.emit(f"_rt.torch.where({tr.valid}, {inc_code}, 0)")
        env[name] = Val("bint", gen.emit(f"_rt.exclusive_cumsum({live}, _rt.check_int({name}))"))
    # inner loop
    if not (isinstance(inner.iter, ast.Call) and isinstance(inner.iter.func, ast.Name) and inner.iter.func.id == "range"
            and 1 <= len(inner.iter.args) <= 2 and not inner.iter.keywords and isinstance(inner.target, ast.Name)):
        raise Refuse("the inner loop is not `for t in range(n)` / `range(a, b)`", inner)
    if inner.orelse or loop.orelse:
        raise Refuse("for/else", inner)
    ra = [tr.ex(a) for a in inner.iter.args]
    if any(v.kind not in ("bint", "inv") for v in ra):
        raise Refuse("inner range bounds are not ints", inner)
    if len(ra) == 1:
        lo, hi = None, ra[0]
    else:
        lo, hi = ra
    bcast = lambda v: v.code if v.kind == "bint" else gen.emit(f"_rt.torch.full(({n},), _rt.check_int({v.code}), dtype=_rt.torch.int64)")  # noqa: E731
    reps = gen.emit(f"_rt.torch.where({tr.valid}, {bcast(hi)}{' - ' + bcast(lo) if lo is not None else ''}, 0)")
    rid = gen.emit(f"_rt.ragged({reps})")
    tvec = gen.emit(f"{rid}[1]" + (f" + {bcast(lo)}[{rid}[0]]" if lo is not None else ""))
    inner_env = {}
    for name, v in env.items():
        inner_env[name] = Val("bint", gen.emit(f"{v.code}[{rid}[0]]")) if v.kind == "bint" else v
    inner_env[inner.target.id] = Val("bint", tvec)
    lists = {}
    itr = _Translator(gen, inner_env, set(), helpers, gen.emit(f"_rt.torch.ones_like({rid}[1], dtype=_rt.torch.bool)"))
    for s in inner.body:
        if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and isinstance(s.value.func, ast.Attribute)
                and s.value.func.attr == "append" and isinstance(s.value.func.value, ast.Name) and len(s.value.args) == 1):
            raise Refuse(f"the inner loop does more than append to lists: `{ast.unparse(s)}`", s)
        lst = s.value.func.value.id
        if lst in lists:
            raise Refuse(f"`{lst}` is appended to twice per token", s)
        v = itr.ex(s.value.args[0])
        if v.kind != "bint":
            raise Refuse(f"appends a value that is not a per-token int: {ast.unparse(s)}", s)
        lists[lst] = v.code
    for lst in lists:
        last = None  # the value of the last top-level assignment to lst before the loop
        for s in fn_body:
            if isinstance(s, ast.Assign) and len(s.targets) == 1:
                t, v = s.targets[0], s.value
                if isinstance(t, ast.Name) and t.id == lst:
                    last = v
                elif isinstance(t, ast.Tuple) and isinstance(v, ast.Tuple) and len(t.elts) == len(v.elts):
                    for tt, vv in zip(t.elts, v.elts):
                        if isinstance(tt, ast.Name) and tt.id == lst:
                            last = vv
        if not (isinstance(last, ast.List) and not last.elts):
            raise Refuse(f"`{lst}` is not initialized as [] before the loop", loop)
        if lst in _names_loaded(before) | _names_stored(before):
            raise Refuse(f"`{lst}` is used in the loop other than by the per-token append", loop)
    return lists


class _AfterRewriter(ast.NodeTransformer):
    """``torch.tensor(lst, dtype=..., device=...)`` -> ``_rt.ints_to_tensor(vec, dtype=..., device=...)``."""

    def __init__(self, lists):
        self.lists = lists

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "tensor" and isinstance(f.value, ast.Name) and f.value.id == "torch" \
                and len(node.args) == 1 and isinstance(node.args[0], ast.Name) and node.args[0].id in self.lists:
            if any(k.arg not in ("dtype", "device") for k in node.keywords):
                raise Refuse(f"torch.tensor({node.args[0].id}, ...) with other arguments", node)
            return ast.Call(func=ast.Attribute(value=ast.Name("_rt", ast.Load()), attr="ints_to_tensor", ctx=ast.Load()),
                            args=[ast.Name(self.lists[node.args[0].id], ast.Load())], keywords=node.keywords)
        return node


# ----------------------------------------------------------------------------------------------------
# whole functions

def _location(fn) -> str:
    code = fn.__code__
    return f"{'/'.join(code.co_filename.split('/')[-2:])}:{code.co_firstlineno} in {fn.__qualname__}"


def function_def(fn) -> ast.FunctionDef:
    src = textwrap.dedent(inspect.getsource(fn))
    mod = ast.parse(src)
    fdef = mod.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        raise Refuse("not a plain `def` function")
    return fdef


def _per_token_body(loop: ast.For) -> bool:
    """The loop looks per-token: it stores into a subscript indexed by a loop variable (``out[i] = ...``,
    ``out[i - 1] = ...``) or appends a value computed from one (``ks.append(start + t)``), counting the
    variables of nested loops too.  Loops that never index or emit by their loop variable (over layers,
    files, config entries) are not candidates, so they are neither lifted nor reported."""
    loop_vars = _names_stored([n.target for n in ast.walk(loop) if isinstance(n, (ast.For, ast.comprehension))])
    for n in ast.walk(loop):
        if isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store) and _names_loaded([n.slice]) & loop_vars:
            return True
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("append", "extend") \
                and _names_loaded(n.args) & loop_vars:
            return True
    return False


def _token_header(it) -> bool:
    """The header walks token data: ``.tolist()`` of a tensor somewhere in it, or ``range(...)`` (possibly in
    ``enumerate``/``zip``).  ``enumerate(blocks)`` / ``zip(names, layers)`` over Python containers is not."""
    for n in ast.walk(it):
        if _is_tolist(n) or (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "range"):
            return True
    return False


def _per_token_loop(n) -> bool:
    return isinstance(n, ast.For) and _known_header(n.iter) and _token_header(n.iter) and _per_token_body(n)


def has_candidate_loop(fdef: ast.AST) -> bool:
    """A ``for`` over ``t.tolist()``/``range``/``enumerate``/``zip`` whose body looks per-token
    (:func:`_per_token_body`)."""
    return any(_per_token_loop(n) for n in ast.walk(fdef))


def _module_helpers(fn) -> dict:
    """Single-return functions of fn's module, by name (inlined when the loop calls them)."""
    import sys

    out = {}
    mod = sys.modules.get(fn.__module__)
    for name, obj in vars(mod).items() if mod is not None else ():
        if inspect.isfunction(obj) and obj.__module__ == fn.__module__ and obj is not fn and not obj.__code__.co_freevars:
            try:
                d = function_def(obj)
            except (OSError, TypeError, SyntaxError, Refuse):
                continue
            if d.name == name and not d.decorator_list:
                out[name] = d
    return out


def analyze(fn, fdef: Optional[ast.FunctionDef] = None) -> Union[Plan, Refusal, None]:
    """Analyze one Python function.

    Returns None when it has no loop of a known header shape (not a candidate), a :class:`Refusal` with the
    reason when it has one that cannot be lifted, or a :class:`Plan` holding the vectorized source.
    """
    loc = _location(fn)
    try:
        if fdef is None:
            fdef = function_def(fn)
        if not has_candidate_loop(fdef):
            return None
        return _analyze(fn, fdef, loc)
    except Refuse as r:
        where = f" (line {r.lineno + fn.__code__.co_firstlineno - 1})" if r.lineno else ""
        return Refusal(fn.__qualname__, loc, r.reason + where)
    except (OSError, TypeError, SyntaxError) as err:
        return Refusal(fn.__qualname__, loc, f"source not available: {err}")


def _analyze(fn, fdef: ast.FunctionDef, loc: str) -> Plan:
    if fdef.decorator_list:
        raise Refuse("decorated function", fdef)
    if fn.__code__.co_freevars:
        raise Refuse(f"closure over {', '.join(fn.__code__.co_freevars)}", fdef)
    if fn.__code__.co_flags & (inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR):
        raise Refuse("generator or coroutine", fdef)
    helpers = _module_helpers(fn)
    lines, kinds, scalar = [], [], False
    body = fdef.body
    for k, stmt in enumerate(body):
        if isinstance(stmt, ast.FunctionDef):
            helpers[stmt.name] = stmt
        if not _per_token_loop(stmt):
            if has_candidate_loop(stmt):
                raise Refuse("the per-token loop is not a top-level statement of the function", stmt)
            lines.append(ast.unparse(stmt))
            continue
        if stmt.orelse:
            raise Refuse("for/else", stmt)
        after = body[k + 1:]
        gen = _Gen()
        gen.counter = itertools.count(1000 * (k + 1))
        ragged = any(isinstance(s, ast.For) for s in stmt.body)
        inner_targets = _names_stored([s.target for s in ast.walk(stmt) if isinstance(s, ast.For)])
        body_locals = (_names_stored(stmt.body) | inner_targets) - set()
        if ragged:
            lists = _translate_ragged(stmt, gen, helpers, body[:k], after)
            accs = {s.target.id for s in stmt.body if isinstance(s, ast.AugAssign)}
            leaked = (_names_loaded(after) & (body_locals | _names_stored([stmt.target]))) - set(lists) - accs
            if _names_loaded(after) & accs:
                raise Refuse(f"running offset(s) {sorted(_names_loaded(after) & accs)} used after the loop", stmt)
            rewriter = _AfterRewriter(lists)
            after_new = [rewriter.visit(ast.parse(ast.unparse(s)).body[0]) for s in after]
            if _names_loaded(after_new) & set(lists):
                raise Refuse(f"list(s) {sorted(_names_loaded(after_new) & set(lists))} used after the loop other than "
                             "by torch.tensor(lst, dtype=...)", stmt)
            if leaked:
                raise Refuse(f"loop variable(s) {sorted(leaked)} used after the loop", stmt)
            lines += gen.lines + [ast.unparse(ast.fix_missing_locations(s)) for s in after_new]
            kinds.append("ragged")
            scalar = True
            break  # the statements after the loop were emitted (rewritten) already
        stores = _names_stored(stmt.body) | _names_stored([stmt.target])
        leaked = _names_loaded(after) & stores
        if leaked:
            raise Refuse(f"loop variable(s) {sorted(leaked)} used after the loop", stmt)
        _translate_map(stmt, gen, helpers, _names_stored(stmt.body))
        lines += gen.lines
        kinds.append("map")
    args = ast.parse(f"def f({ast.unparse(fdef.args)}): pass").body[0].args
    for a in args.posonlyargs + args.args + args.kwonlyargs + ([args.vararg] if args.vararg else []) + \
            ([args.kwarg] if args.kwarg else []):
        a.annotation = None
    args.defaults, args.kw_defaults = [], [None] * len(args.kwonlyargs)
    src = f"def _vectorized({ast.unparse(args)}):\n" + textwrap.indent("\n".join(lines) or "pass", "    ")
    return Plan(fn.__qualname__, loc, kinds, src, scalar)
