"""Convert SFT data from other projects' formats to OpenAI ``messages`` JSONL.

    python tools/convert_sft_data.py --format sharegpt --input glaive.json --output out.jsonl
    python tools/convert_sft_data.py --format nemo-gym --input rollouts.jsonl --output sft.jsonl --min-reward 0.8

Formats: sharegpt (ShareGPT / OpenHermes-2.5 ``conversations``, with function_call and
observation turns), alpaca (instruction/input/output, optional system and history),
nemo-gym (rollouts with ``responses_create_params``, ``output`` and ``reward``; keeps rows
with reward >= --min-reward), content-parts (messages whose content is a list of
text/reasoning/tool_call parts). Prints "kept K of N" at the end.
"""

from __future__ import annotations

import argparse
import sys

from slime.data.converters import CONVERTERS, ConversionError, convert_file, write_jsonl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=sorted(CONVERTERS))
    p.add_argument("--input", required=True, help=".json (list), .jsonl or .parquet file")
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--min-reward", type=float, default=0.8, help="nemo-gym: keep rows with reward >= this")
    p.add_argument("--skip-invalid", action="store_true", help="skip (and count) rows that cannot be converted")
    args = p.parse_args(argv)

    kwargs = {"min_reward": args.min_reward} if args.format == "nemo-gym" else {}
    try:
        rows, stats = convert_file(args.input, args.format, skip_invalid=args.skip_invalid, **kwargs)
    except (ConversionError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_jsonl(rows, args.output)
    print(stats.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
