"""Load plugin functions given as dotted paths (``--rollout-function-path pkg.mod.fn``)."""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

__all__ = ["PluginError", "load_function"]


class PluginError(ValueError):
    """A function path that does not resolve to a usable callable."""


def load_function(path: str, flag: str = "function path", required_params: tuple[str, ...] = ()) -> Callable:
    """Import ``module.attr`` and check it is callable and accepts ``required_params``.

    Raised at start-up, so a typo fails before any data is read or model built.
    """
    if not isinstance(path, str) or "." not in path:
        raise PluginError(f"{flag} {path!r} must be a dotted path 'package.module.function'")
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(f"{flag} {path!r}: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise PluginError(f"{flag} {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise PluginError(f"{flag} {path!r}: {attr!r} is not callable")
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
