"""Find candidate functions: scan the user modules already loaded, and hook imports for later ones.

Which modules are *user code* (scanned) -- the rule, in order:

1. the module has a ``.py`` file on disk;
2. the file is not part of the Python installation or an installed library: not under ``sys.prefix``,
   ``sys.base_prefix``, ``sys.exec_prefix`` or any ``sysconfig`` install path (stdlib, purelib, platlib) or
   the user site-packages, and no directory on its path is named ``site-packages`` / ``dist-packages``;
3. it is not part of a known framework, wherever that lives (a source checkout on ``PYTHONPATH`` counts):
   its top-level package is not one of :data:`LIBRARY_PACKAGES` (torch, transformers, vllm, sglang,
   triton, numpy, ... and dsa_inductor itself);
4. the file lies under a *project root*: the current working directory, the directory of the script that
   runs (``__main__.__file__``), or a root added with :func:`add_scan_root` or listed in the environment
   variable ``DSA_INDUCTOR_LOOP_ROOTS`` (``os.pathsep``-separated).  A library on ``PYTHONPATH`` outside
   the project (e.g. ``PYTHONPATH=/opt/src/transformers/src``) is therefore not scanned.

Within a user module, top-level plain functions (``def`` at module level, ``fn.__module__`` equal to the
module) are analyzed -- and, if refused, reported -- only when they hold a *per-token-looking* loop
(:func:`dsa_inductor.loops.analyze.has_candidate_loop`): a ``for`` over ``t.tolist()`` or ``range(...)``
(possibly inside ``enumerate`` / ``zip``) whose body stores into a subscript indexed by a loop variable,
or appends a value computed from one to a list (counting nested ``for`` loops).  Loops over Python
containers (layers, configs, files) or that never index by their loop variable are not candidates and
are not reported.  Measured with transformers 5.23 copied onto ``PYTHONPATH`` outside site-packages: 33
refusals before these rules, 12 with the per-token filter alone, 0 with rules 3 and 4.  Class methods and
nested functions are not scanned.  Modules imported after ``register_dsa_passes()`` are scanned when their
import finishes, through a ``sys.meta_path`` finder that wraps the real loader.
``dsa_inductor.loops.lift_function(fn)`` analyzes one function explicitly (any module, library or not).
"""

from __future__ import annotations

import ast
import importlib.abc
import inspect
import os
import site
import sys
import sysconfig
import textwrap
from typing import Callable, Iterator, Optional

#: Top-level package names that are never scanned, wherever their files live.
LIBRARY_PACKAGES = frozenset({
    "dsa_inductor", "torch", "torchvision", "torchaudio", "functorch", "triton", "transformers", "tokenizers",
    "accelerate", "peft", "diffusers", "datasets", "safetensors", "huggingface_hub", "vllm", "sglang",
    "flashinfer", "flash_attn", "xformers", "deepspeed", "megatron", "apex", "deep_gemm", "numpy", "scipy",
    "sympy", "pandas", "jax", "tensorflow", "pytest", "_pytest", "hypothesis", "IPython", "setuptools", "pip",
})


def _install_dirs() -> tuple:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        paths.add(sysconfig.get_paths().get(key))
    try:
        paths.update(site.getsitepackages())
    except AttributeError:  # virtualenv's old site.py
        pass
    user_site = getattr(site, "getusersitepackages", lambda: None)()
    if user_site:
        paths.add(user_site)
    return tuple(sorted({os.path.realpath(p) for p in paths if p}))


_SKIP_PREFIXES = _install_dirs()
_PKG_DIR = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_EXTRA_ROOTS: list = []


def add_scan_root(path) -> None:
    """Treat the modules under ``path`` as user code (for model code that lives outside the working
    directory and the running script's directory).  Takes effect for the next ``register_dsa_passes()``
    and for later imports."""
    real = os.path.realpath(os.fspath(path))
    if real not in _EXTRA_ROOTS:
        _EXTRA_ROOTS.append(real)


def project_roots() -> list:
    """The directories whose modules are user code (rule 4 above), resolved now."""
    roots = list(_EXTRA_ROOTS)
    roots += [os.path.realpath(p) for p in os.environ.get("DSA_INDUCTOR_LOOP_ROOTS", "").split(os.pathsep) if p]
    try:
        roots.append(os.path.realpath(os.getcwd()))
    except OSError:
        pass
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main:
        roots.append(os.path.realpath(os.path.dirname(os.path.abspath(main))))
    return roots


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def library_reason(path, module_name: Optional[str] = None, roots=None) -> Optional[str]:
    """Why the module at ``path`` is not user code (a rule of the module docstring), or None if it is."""
    if not path or not str(path).endswith(".py"):
        return "no .py file"
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return "installed library (site-packages)"
    if _under(real, _PKG_DIR) or any(_under(real, p) for p in _SKIP_PREFIXES):
        return "part of the Python installation or dsa_inductor"
    top = (module_name or "").split(".")[0]
    if top in LIBRARY_PACKAGES:
        return f"known library package `{top}`"
    if not any(_under(real, r) for r in (project_roots() if roots is None else roots)):
        return "outside the project roots (working directory, script directory, add_scan_root)"
    return None


def is_user_file(path, module_name: Optional[str] = None) -> bool:
    return library_reason(path, module_name) is None


def candidates(module) -> Iterator[tuple[Callable, ast.FunctionDef]]:
    """Top-level functions of ``module`` with a loop header of a known shape."""
    from .analyze import has_candidate_loop

    path = getattr(module, "__file__", None)
    if not is_user_file(path, module.__name__):
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
    roots = project_roots()
    return [m for m in list(sys.modules.values()) if m is not None and isinstance(getattr(m, "__name__", None), str)
            and library_reason(getattr(m, "__file__", None), m.__name__, roots) is None]


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
        if spec.loader is None or not hasattr(spec.loader, "exec_module") or not is_user_file(spec.origin, fullname):
            return None  # the regular finders find it again, unwrapped
        spec.loader = _Loader(spec.loader, self.on_module)
        return spec
