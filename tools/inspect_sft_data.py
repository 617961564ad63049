"""Inspect what SFT training will see: token ids, loss masks, counts, a coloured sample.

    python tools/inspect_sft_data.py --hf-checkpoint slime/assets/tiny-qwen3 \
        --prompt-data slime/assets/tiny_sft.jsonl --dump /tmp/samples.jsonl

Takes the same data flags as training (--input-key, --tool-key, --multi-turn-policy,
--rollout-max-context-len, --skip-invalid-samples, --data-cache-dir, ...), so it reads the
token cache entry training uses (or builds it); a directory holding only tokenizer files is
enough for --hf-checkpoint. Writes one JSON line per sample with full-length,
aligned ``token_ids`` and ``loss_mask`` and prints the data summary (samples, tokens,
supervised tokens, length percentiles, truncated and skipped counts) and one sample with
the supervised text highlighted.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace

from slime.utils.arguments import get_parser


def render_sample(tokenizer, token_ids: list[int], loss_mask: list[int], color: bool = True) -> str:
    """The decoded sample with supervised runs in green (or inside [[ ]] without colour)."""
    from rich.console import Console
    from rich.text import Text

    text = Text()
    start = 0
    for i in range(1, len(token_ids) + 1):
        if i == len(token_ids) or loss_mask[i] != loss_mask[start]:
            piece = tokenizer.decode(token_ids[start:i])
            if loss_mask[start]:
                text.append(piece if color else f"[[{piece}]]", style="bold green" if color else None)
            else:
                text.append(piece, style="dim" if color else None)
            start = i
    console = Console(force_terminal=color, no_color=not color, width=120, highlight=False)
    with console.capture() as cap:
        console.print(text)
    return cap.get()


def main(argv: list[str] | None = None) -> int:
    parser = get_parser(description=__doc__)
    parser.add_argument("--dump", type=str, default=None, help="write one JSON line per sample here")
    parser.add_argument("--show", type=int, default=0, help="index of the sample to render")
    parser.add_argument("--no-color", action="store_true", help="mark supervised text with [[ ]] instead of colour")
    args = parser.parse_args(argv)
    if not args.prompt_data or not args.hf_checkpoint:
        parser.error("--prompt-data and --hf-checkpoint are required")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Preparation progress (rows/s, ETA) on stderr; the summary is printed below.
    logging.getLogger("slime.data.progress").setLevel(logging.INFO)

    from slime.data.config import SFTDataConfig, build_data_source
    from slime.data.dataset import DataValidationError
    from slime.data.chat_template import TemplateError

    try:
        # The summary and the dump need every row: prepared whole-first, never streamed.
        source = build_data_source(replace(SFTDataConfig.from_args(args), streaming=False), progress=True)
    except (DataValidationError, TemplateError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    data = source.data
    if args.dump:
        with open(args.dump, "w", encoding="utf-8") as f:
            for k in range(len(data)):
                s = data.sample(k)
                rec = {
                    "index": k,
                    "row_index": s.metadata["row_index"],
                    "turn_index": s.metadata["turn_index"],
                    "token_ids": s.tokens,
                    "loss_mask": s.full_loss_mask(),
                }
                f.write(json.dumps(rec) + "\n")
    for line in data.report.summary_lines():
        print(line)
    print(f"  token cache: {data.store.directory}" if not args.no_data_cache else "  token cache: off (--no-data-cache)")
    if args.dump:
        print(f"  wrote {len(data)} samples to {args.dump}")
    k = min(max(args.show, 0), len(data) - 1)
    s = data.sample(k)
    print(f"\nsample {k} (row {s.metadata['row_index']}); supervised text {'in green' if not args.no_color else 'in [[ ]]'}:")
    print(render_sample(data.encoder.template.tokenizer, s.tokens, s.full_loss_mask(), color=not args.no_color))
    return 0


if __name__ == "__main__":
    sys.exit(main())
