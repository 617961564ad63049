"""Tokenize SFT data into the token cache ahead of training (LlamaFactory's ``tokenized_path`` step).

    python tools/prepare_sft_data.py --hf-checkpoint /models/Qwen3-4B-Base \
        --prompt-data /data/openhermes.jsonl [--eval-prompt-data dev /data/dev.jsonl] \
        [--data-num-workers 32] [--data-cache-dir /fast/cache]

Takes the training command's flags (extra ones are accepted and ignored), so running it
with the same command line as ``train_async.py`` builds exactly the entries the trainer,
its eval sets, its restarts and ``tools/inspect_sft_data.py`` will find: training then
starts in seconds. Progress (rows/s, tokens/s, ETA) and the data summary go to stderr;
stdout gets one line per data set with its cache entry. Exit code 1 on invalid data.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace

from slime.utils.arguments import get_parser


def main(argv: list[str] | None = None) -> int:
    parser = get_parser(description=__doc__.split("\n\n")[0])
    args, _ = parser.parse_known_args(argv)
    if not args.prompt_data or not args.hf_checkpoint:
        parser.error("--prompt-data and --hf-checkpoint are required")
    if args.no_data_cache:
        parser.error("--no-data-cache leaves nothing to prepare ahead of time")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    from slime.data.chat_template import TemplateError
    from slime.data.config import SFTDataConfig
    from slime.data.dataset import DataValidationError
    from slime.data.loader import load_prepared

    cfg = replace(SFTDataConfig.from_args(args), streaming=False)  # the point is to tokenize every row now
    pairs = args.eval_prompt_data or []
    sets = [("train", args.prompt_data), *zip(pairs[::2], pairs[1::2])]
    for name, path in sets:
        t0 = time.perf_counter()
        try:
            data = load_prepared(replace(cfg, prompt_data=path), progress=True)
        except (DataValidationError, TemplateError, ValueError, FileNotFoundError) as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            return 1
        r = data.report
        print(f"{name}: {path}: {r.samples} samples, {r.tokens} tokens ({r.rows_invalid} invalid rows, "
              f"{r.samples_truncated} truncated, {r.samples_dropped} dropped) -> {data.store.directory} "
              f"[{time.perf_counter() - t0:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
