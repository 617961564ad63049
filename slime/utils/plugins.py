"""Load plugin functions given as import paths (``--rollout-function-path pkg.mod.fn``).

Both spellings slime users write are accepted: ``pkg.mod.fn`` and ``pkg.mod:fn`` (the
entry-point style; the part after the colon may be a dotted attribute path such as
``Class.method``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

__all__ = ["PluginError", "load_function", "split_function_path"]


class PluginError(ValueError):
    """A function path that does not resolve to a usable callable."""


def split_function_path(path: str, flag: str = "function path") -> tuple[str, str]:
    """``'a.b.c'`` -> ``('a.b', 'c')``; ``'a.b:C.m'`` -> ``('a.b', 'C.m')``."""
    if not isinstance(path, str) or not path.strip():
        raise PluginError(f"{flag} {path!r} must be an import path 'package.module.function' or 'package.module:function'")
    if ":" in path:
        module_name, _, attr = path.partition(":")
        if not module_name or not attr or ":" in attr:
            raise PluginError(f"{flag} {path!r} must look like 'package.module:function'")
        return module_name, attr
    if "." not in path:
        raise PluginError(f"{flag} {path!r} must be a dotted path 'package.module.function'")
    module_name, _, attr = path.rpartition(".")
    return module_name, attr


def load_function(
    path: str,
    flag: str = "function path",
    required_params: tuple[str, ...] = (),
    require_async: bool = False,
) -> Callable:
    """Import ``module.attr`` (or ``module:attr``) and check it is callable and accepts ``required_params``.

    ``require_async`` also demands an ``async def`` (the rollout awaits it). Raised at
    start-up, so a typo or a wrong signature fails before any data is read or model built.
    """
    module_name, attr = split_function_path(path, flag)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(f"{flag} {path!r}: cannot import module {module_name!r}: {e}") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise PluginError(f"{flag} {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise PluginError(f"{flag} {path!r}: {attr!r} is not callable")
    if require_async and not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))):
        raise PluginError(f"{flag} {path!r}: {attr} must be an async function (async def), got a plain callable")
    if required_params:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return fn
        positional = [
            p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
        takes_var = any(p.kind == p.VAR_POSITIONAL for p in positional)
        if not takes_var and len(positional) < len(required_params):
            raise PluginError(
                f"{flag} {path!r}: expected a function taking ({', '.join(required_params)}), "
                f"got {attr}{inspect.signature(fn)}"
            )
    return fn
