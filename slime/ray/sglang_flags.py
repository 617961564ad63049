"""SGLang server flags passed through with the ``--sglang-`` prefix (slime's convention).

slime's scripts configure the engines with SGLang's own server flags, prefixed:
``--sglang-mem-fraction-static 0.7`` is SGLang's ``--mem-fraction-static 0.7``. Two cases:

* SGLang installed: the flags are derived from SGLang's own parser (``ServerArgs.add_cli_args``),
  so names, types and choices follow the installed version and never go stale; a typo is an
  error naming the flag.
* SGLang absent (CPU machines, CI): every ``--sglang-*`` flag is still accepted, so slime's
  scripts parse anywhere; the values are kept as given (strings) and reported as unused by
  the CPU engine.

Either way the result is ``args.sglang_server_args``: ``{sglang_flag_without_prefix: value}``,
``True`` for a bare switch, a list for several values. SGLang flags that our own groups
define (``--sglang-router-ip``, ``--sglang-server-concurrency``, ...) are ours, not passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging

logger = logging.getLogger(__name__)

__all__ = ["PREFIX", "SGLANG_GROUP_TITLE", "add_sglang_server_arguments", "collect_derived", "sglang_available", "split_sglang_flags"]

PREFIX = "--sglang-"
DEST_PREFIX = "sglang_server__"
SGLANG_GROUP_TITLE = "SGLang server (passed to every engine)"


def sglang_available() -> bool:
    return importlib.util.find_spec("sglang") is not None


def add_sglang_server_arguments(parser: argparse.ArgumentParser) -> bool:
    """Add SGLang's server flags, prefixed, when SGLang is installed; returns whether it did.

    Each action of SGLang's parser is re-added with ``--sglang-`` on its long option strings
    and a private dest; flags our parser already has are skipped (ours win).
    """
    if not sglang_available():
        return False
    from sglang.srt.server_args import ServerArgs

    theirs = argparse.ArgumentParser(add_help=False)
    ServerArgs.add_cli_args(theirs)
    g = parser.add_argument_group(SGLANG_GROUP_TITLE)
    taken = set(parser._option_string_actions)
    for action in theirs._actions:
        names = [PREFIX + o[2:] for o in action.option_strings if o.startswith("--")]
        names = [n for n in names if n not in taken]
        if not names:
            continue
        kwargs = {"dest": DEST_PREFIX + action.dest, "default": argparse.SUPPRESS, "help": action.help}
        if action.nargs == 0:  # store_true / store_false / store_const
            kwargs.update(action="store_const", const=action.const)
        else:
            kwargs.update(nargs=action.nargs, type=action.type, choices=action.choices)
        g.add_argument(*names, **kwargs)
    return True


def collect_derived(args: argparse.Namespace) -> dict:
    """The SGLang flags given on the command line (derived-parser case), by SGLang's dest."""
    return {k[len(DEST_PREFIX) :]: v for k, v in vars(args).items() if k.startswith(DEST_PREFIX)}


def split_sglang_flags(tokens: list[str]) -> tuple[dict, list[str]]:
    """Leftover command-line tokens -> (``--sglang-*`` flags with their values, the rest).

    A flag's values are the tokens after it up to the next ``--`` option; none makes it a
    switch (True), one a string, several a list. ``--sglang-x=v`` is one value.
    """
    flags: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith(PREFIX):
            rest.append(token)
            i += 1
            continue
        name, eq, inline = token[len(PREFIX) :].partition("=")
        key = name.replace("-", "_")
        if eq:
            flags[key] = inline
            i += 1
            continue
        values = []
        i += 1
        while i < len(tokens) and not tokens[i].startswith("--"):
            values.append(tokens[i])
            i += 1
        flags[key] = True if not values else values[0] if len(values) == 1 else values
    return flags, rest
