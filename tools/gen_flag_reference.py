"""Write docs/flags.md from the argument parser (tests check it is up to date).

    python tools/gen_flag_reference.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "flags.md"
# This checkout's parser, not whichever checkout `pip install -e` last linked.
sys.path.insert(0, str(ROOT))


def render() -> str:
    from slime.utils.arguments import get_parser

    parser = get_parser()
    lines = [
        "# Flag reference",
        "",
        "Generated from the parser by `python tools/gen_flag_reference.py`; do not edit by hand.",
        "Every entry point (`train.py`, `train_async.py`, `tools/inspect_sft_data.py`,",
        "`python -m slime.backends.megatron_utils.run_steps`) takes these flags.",
        "",
        "SGLang's own server flags are passed to the engines with a `--sglang-` prefix",
        "(`--sglang-mem-fraction-static 0.7` is SGLang's `--mem-fraction-static 0.7`): checked by",
        "SGLang's parser where SGLang is installed, accepted as given elsewhere (see",
        "`slime/ray/sglang_flags.py`). They follow the installed SGLang, so they are not listed here.",
        "",
    ]
    from slime.ray.sglang_flags import SGLANG_GROUP_TITLE

    for group in parser._action_groups:
        if group.title == SGLANG_GROUP_TITLE:
            continue
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        lines += [f"## {group.title}", "", "| flag | default | help |", "|---|---|---|"]
        for a in actions:
            flags = ", ".join(f"`{s}`" for s in a.option_strings)
            if a.choices:
                flags += " {" + ",".join(str(c) for c in a.choices) + "}"
            default = "" if a.default in (None, False, argparse.SUPPRESS) else f"`{a.default}`"
            text = (a.help or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {flags} | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true", help="exit 1 if docs/flags.md is stale")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python tools/gen_flag_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
