"""Benchmark: loss-mask generation throughput of `slime.data.chat_template.ChatTemplate`.

The floor is ONE ``tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)`` of
the whole conversation: any mask builder has to render and tokenize at least that much.
For each number of assistant turns we time the floor and ``ChatTemplate.encode`` under the
"full", "keep-reasoning" and "per-turn" policies on deterministic synthetic conversations,
check that "full" yields exactly the floor's ids, and report tokens/s, the time ratio to the
floor, and µs/token of "full" (roughly constant across turn counts = linear in turns; prefix
re-rendering would make it grow with the number of turns).

    python benchmarks/bench_mask_generation.py [--turns 1 2 4] [--conversations 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import transformers
from transformers import AutoTokenizer

from slime.data.chat_template import ChatTemplate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TOKENIZER = os.path.join(REPO, "..", "shared", "assets", "qwen3-tokenizer")
TINY_TOKENIZER = os.path.join(REPO, "slime", "assets", "tiny-qwen3")
TARGET = 1.5  # acceptable time(full) / time(floor)

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search_docs", "description": "Full-text search over the documentation.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "top_k": {"type": "integer"}}, "required": ["query"]}}},
]
WORDS = ("the model gradient batch token sequence learning rate checkpoint optimizer loss "
         "attention layer weather Zürich café naïve 東京 数据 模型 训练 Привет мир λ ∑ → ✓ 🚀 😊").split()
CITIES = ["Zürich", "東京", "São Paulo", "Reykjavík", "Kraków", "Москва"]


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + rng.choice([".", "?", "!", " …"])


def paragraph(rng: random.Random, n: int) -> str:
    return " ".join(sentence(rng, 6, 18) for _ in range(n))


def make_conversation(rng: random.Random, turns: int) -> tuple[list[dict], list[bool]]:
    """System + ``turns`` (user, assistant[, tool call + 1-2 tool results + final answer]) rounds."""
    msgs = [{"role": "system", "content": "You are a helpful assistant. " + paragraph(rng, 2)}]
    for _ in range(turns):
        msgs.append({"role": "user", "content": paragraph(rng, rng.randint(1, 3))})
        if rng.random() < 0.4:  # an assistant turn that calls tools, then the tool results
            n_calls = rng.randint(1, 2)
            calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {
                "city": rng.choice(CITIES), "unit": rng.choice("cf")}}} if rng.random() < 0.5 else
                {"type": "function", "function": {"name": "search_docs", "arguments": {
                    "query": sentence(rng, 2, 5), "top_k": rng.randint(1, 10)}}} for _ in range(n_calls)]
            msgs.append({"role": "assistant", "content": sentence(rng, 4, 10),
                         "reasoning_content": paragraph(rng, 2), "tool_calls": calls})
            for _ in range(n_calls):
                msgs.append({"role": "tool", "content": paragraph(rng, 1)})
        # A plain assistant answer with reasoning (a non-final turn counts as a turn too).
        msgs.append({"role": "assistant", "content": paragraph(rng, rng.randint(1, 4)),
                     "reasoning_content": paragraph(rng, rng.randint(1, 3))})
    return msgs, [m["role"] == "assistant" for m in msgs]


def best_times(fns: dict, repeats: int) -> dict:
    """Best-of-``repeats`` wall time of each callable; runs are interleaved so that load on a
    shared machine hits every variant alike. One untimed warm-up run each (jinja compile, caches)."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=None, help="tokenizer path (default: shared Qwen3, else tiny-qwen3)")
    ap.add_argument("--turns", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--conversations", type=int, default=50, help="conversations per turn count")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    ap.add_argument("--per-turn-convs", type=int, default=10, help="subset timed (once) for per-turn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown-out", default=None, help="also write the table to this file")
    args = ap.parse_args()

    note = ""
    path = args.tokenizer
    if path is None:
        path = os.path.normpath(SHARED_TOKENIZER)
        if not os.path.isdir(path):
            path, note = TINY_TOKENIZER, " (shared Qwen3 tokenizer not found; FALLBACK to embedded tiny-qwen3)"
    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 10**9  # silence the "sequence longer than max length" warning; ids are unaffected
    ct = ChatTemplate(tok)
    header = (f"Tokenizer: `{path}`{note} | python {sys.version.split()[0]} | "
              f"transformers {transformers.__version__} | repeats={args.repeats} (best) | seed={args.seed}")
    print(header)

    lines = ["| turns | convs | tokens | floor tok/s | full tok/s | full/floor | keep-reasoning/floor "
             "| keep-reasoning/floor per output token | per-turn/floor | full µs/token |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    failed, ratios, us_per_tok, floor_us = False, {}, {}, {}
    for turns in args.turns:
        rng = random.Random(args.seed * 1000 + turns)
        convs = [make_conversation(rng, turns) for _ in range(args.conversations)]

        # Correctness: "full" must produce exactly the floor's token ids.
        floor_ids = [tok.apply_chat_template(m, tools=TOOLS, tokenize=True) for m, _ in convs]
        tokens = sum(len(ids) for ids in floor_ids)
        for k, ((m, tr), ids) in enumerate(zip(convs, floor_ids)):
            (enc,) = ct.encode(m, tr, tools=TOOLS, policy="full")
            if enc.token_ids != ids:
                print(f"FAIL: turns={turns} conversation {k}: full-policy ids differ from apply_chat_template "
                      f"({len(enc.token_ids)} vs {len(ids)} tokens)")
                failed = True

        # keep-reasoning emits more tokens than the floor (history reasoning is kept), so its cost
        # is also given per token it outputs.
        keep_tokens = sum(len(ct.encode(m, tr, tools=TOOLS, policy="keep-reasoning")[0].token_ids) for m, tr in convs)

        def run(policy):
            return lambda: [ct.encode(m, tr, tools=TOOLS, policy=policy) for m, tr in convs]

        t = best_times({"floor": lambda: [tok.apply_chat_template(m, tools=TOOLS, tokenize=True) for m, _ in convs],
                        "full": run("full"), "keep-reasoning": run("keep-reasoning")}, args.repeats)
        # per-turn renders every supervised prefix (quadratic by design): to keep the run short it is
        # timed once, on a subset, against the floor on that same subset.
        sub = convs[: args.per_turn_convs]
        t0 = time.perf_counter()
        [tok.apply_chat_template(m, tools=TOOLS, tokenize=True) for m, _ in sub]
        sub_floor = time.perf_counter() - t0
        t0 = time.perf_counter()
        [ct.encode(m, tr, tools=TOOLS, policy="per-turn") for m, tr in sub]
        per_turn_ratio = (time.perf_counter() - t0) / sub_floor
        ratios[turns] = t["full"] / t["floor"]
        us_per_tok[turns] = 1e6 * t["full"] / tokens
        floor_us[turns] = 1e6 * t["floor"] / tokens
        row = (f"| {turns} | {len(convs)} | {tokens} | {tokens / t['floor']:,.0f} | {tokens / t['full']:,.0f} "
               f"| {ratios[turns]:.2f}x | {t['keep-reasoning'] / t['floor']:.2f}x "
               f"| {(t['keep-reasoning'] / keep_tokens) / (t['floor'] / tokens):.2f}x | {per_turn_ratio:.2f}x "
               f"| {us_per_tok[turns]:.2f} |")
        lines.append(row)
        print(row, flush=True)

    lo, hi = min(us_per_tok), max(us_per_tok)
    growth = us_per_tok[hi] / us_per_tok[lo]
    worst = max(ratios, key=ratios.get)
    verdict = [
        "",
        "full/floor by turns: " + ", ".join(f"{n}: {r:.2f}x" for n, r in ratios.items()),
        f"max full/floor = {ratios[worst]:.2f}x (turns={worst}); target <= {TARGET}x: "
        + ("MET" if ratios[worst] <= TARGET else "NOT MET"),
        f"Linearity: full µs/token {us_per_tok[lo]:.2f} at {lo} turns -> {us_per_tok[hi]:.2f} at {hi} turns "
        f"({growth:.2f}x; floor {floor_us[lo]:.2f} -> {floor_us[hi]:.2f}): " + ("LINEAR (per-token cost roughly constant)" if growth <= 1.5
                                 else "NOT LINEAR (per-token cost grows with turns)"),
        "ids check: " + ("FAIL (full-policy ids differ from the floor, see above)" if failed
                         else "OK (full-policy ids == apply_chat_template ids for every conversation)"),
        f"(per-turn re-renders each supervised prefix by design: reference only, timed once on "
        f"{args.per_turn_convs} conversations per row, not held to the target)",
    ]
    print("\n".join(verdict))
    if args.markdown_out:
        with open(args.markdown_out, "w", encoding="utf-8") as f:
            f.write(header + "\n\n" + "\n".join(lines) + "\n" + "\n".join(verdict) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
