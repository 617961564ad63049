"""slime's import path for plugin loading: ``from slime.utils.misc import load_function``.

Plugin code written for THUDM/slime calls ``load_function("pkg.mod.fn")`` with one argument;
this keeps that call working (cached, like slime's) on top of `slime.utils.plugins`, which
does the import and the error messages. ``pkg.mod:fn`` is accepted too.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

from slime.utils.plugins import PluginError, load_function as _load_checked

__all__ = ["PluginError", "load_function"]


@lru_cache(maxsize=None)
def load_function(path: str) -> Callable:
    """The callable at ``path`` (``package.module.function`` or ``package.module:function``)."""
    return _load_checked(path, "function path")
