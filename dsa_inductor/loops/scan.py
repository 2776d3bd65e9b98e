"""Find candidate functions: scan the user modules already loaded, and hook imports for later ones.

A *user module* is one whose file lies outside the Python installation (``sys.prefix``,
``sys.base_prefix``, ``site-packages`` / ``dist-packages``) and outside torch and dsa_inductor; its
top-level plain functions (``def`` at module level, ``fn.__module__`` equal to the module) are parsed once
and analyzed if they contain a ``for`` over ``t.tolist()``, ``range``, ``enumerate`` or ``zip``.  Class
methods and nested functions are not scanned.  Modules imported after ``register_dsa_passes()`` are
scanned when their import finishes, through a ``sys.meta_path`` finder that wraps the real loader.
``dsa_inductor.loops.lift_function(fn)`` analyzes one function explicitly (any module).
"""

from __future__ import annotations

import ast
import importlib.abc
import inspect
import os
import sys
import sysconfig
import textwrap
from typing import Callable, Iterator

_SKIP_PREFIXES = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                       sysconfig.get_paths().get("stdlib", sys.prefix)) if p})
_PKG_DIR = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def is_user_file(path) -> bool:
    if not path or not path.endswith(".py"):
        return False
    real = os.path.realpath(path)
    if "site-packages" in real or "dist-packages" in real or real.startswith(_PKG_DIR + os.sep):
        return False
    return not real.startswith(_SKIP_PREFIXES)


def candidates(module) -> Iterator[tuple[Callable, ast.FunctionDef]]:
    """Top-level functions of ``module`` with a loop header of a known shape."""
    from .analyze import has_candidate_loop

    path = getattr(module, "__file__", None)
    if not is_user_file(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and has_candidate_loop(node):
            fn = vars(module).get(node.name)
            if inspect.isfunction(fn) and fn.__module__ == module.__name__ and fn.__code__.co_firstlineno in \
                    (node.lineno, *(d.lineno for d in node.decorator_list)):
                try:  # the function's own source (the file may have changed since import)
                    fdef = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
                except (OSError, TypeError, SyntaxError):
                    continue
                if isinstance(fdef, ast.FunctionDef):
                    yield fn, fdef


def loaded_user_modules() -> list:
    return [m for m in list(sys.modules.values()) if m is not None and is_user_file(getattr(m, "__file__", None))]


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, on_module):
        self.inner, self.on_module = inner, on_module

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            self.on_module(module)
        except Exception as err:  # never break an import
            from ..report import log

            log.warning("dsa_inductor loop scan of %s failed: %s", module.__name__, err)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class ImportHook(importlib.abc.MetaPathFinder):
    """Wraps the loader of user modules so that ``on_module`` sees each one after it executes."""

    def __init__(self, on_module):
        self.on_module = on_module
        self._busy = False

    def find_spec(self, fullname, path, target=None):
        if self._busy:
            return None
        self._busy = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy = False
        if spec.loader is None or not hasattr(spec.loader, "exec_module") or not is_user_file(spec.origin):
            return None  # the regular finders find it again, unwrapped
        spec.loader = _Loader(spec.loader, self.on_module)
        return spec
