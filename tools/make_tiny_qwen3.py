"""Build the embedded tiny default: a Qwen3-architecture HF checkpoint + SFT data set.

    python tools/make_tiny_qwen3.py [--qwen3-tokenizer ../shared/assets/qwen3-tokenizer]

Writes ``slime/assets/tiny_sft.jsonl`` (OpenAI ``messages``: single-turn, multi-turn, system
prompts, tool calls, reasoning) and ``slime/assets/tiny-qwen3/`` (byte-level BPE tokenizer
trained on that data with Qwen3's special tokens, pre-tokenizer and real chat template, plus
a randomly initialized ``Qwen3ForCausalLM`` of ~200k parameters). Everything is seeded, so a
rerun with the same library versions writes the same files. The outputs are committed: the
project needs no download and no ../shared to run its default job.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "slime" / "assets"
DEFAULT_QWEN3 = ROOT.parent / "shared" / "assets" / "qwen3-tokenizer"

# Qwen3's control tokens, in Qwen3's id order; the first three are the ones the template uses
# as turn delimiters, the tool/think tags are plain added tokens in the chat format.
ADDED_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]

CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Hanoi", "Perth"]
WEATHER = ["sunny", "rainy", "cloudy", "windy", "snowy"]
NAMES = ["Ada", "Linus", "Grace", "Alan", "Edsger", "Barbara"]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def _arith(rng: random.Random) -> list[dict]:
    a, b = rng.randint(1, 40), rng.randint(1, 40)
    return [
        {"role": "user", "content": f"What is {a} + {b}?"},
        {
            "role": "assistant",
            "reasoning_content": f"{a} plus {b} is {a + b}.",
            "content": f"{a} + {b} = {a + b}.",
        },
    ]


def _greeting(rng: random.Random) -> list[dict]:
    name = rng.choice(NAMES)
    return [
        {"role": "system", "content": "You are a friendly assistant. Answer briefly."},
        {"role": "user", "content": f"Hi, I am {name}."},
        {"role": "assistant", "content": f"Hello {name}! How can I help?"},
    ]


def _multi_turn(rng: random.Random) -> list[dict]:
    a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 20)
    return [
        {"role": "system", "content": ""},  # empty system prompt on purpose
        {"role": "user", "content": f"Add {a} and {b}."},
        {"role": "assistant", "reasoning_content": f"{a} + {b} = {a + b}.", "content": f"The sum is {a + b}."},
        {"role": "user", "content": f"Now add {c} to that."},
        {
            "role": "assistant",
            "reasoning_content": f"{a + b} + {c} = {a + b + c}.",
            "content": f"The new sum is {a + b + c}.",
        },
    ]


def _weather(rng: random.Random) -> list[dict]:
    city, weather = rng.choice(CITIES), rng.choice(WEATHER)
    temp = rng.randint(-5, 35)
    return [
        {"role": "user", "content": f"What's the weather in {city}? Ünïcödé ✓ 天气"},
        {
            "role": "assistant",
            "reasoning_content": f"I should call get_weather for {city}.",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
            ],
        },
        {"role": "tool", "content": json.dumps({"weather": weather, "celsius": temp})},
        {
            "role": "assistant",
            "reasoning_content": "The tool answered.",
            "content": f"It is {weather} in {city}, {temp}°C.",
        },
    ]


def _two_tools(rng: random.Random) -> list[dict]:
    c1, c2 = rng.sample(CITIES, 2)
    w1, w2 = rng.choice(WEATHER), rng.choice(WEATHER)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": f"Weather in {c1} and {c2}?"},
        {
            "role": "assistant",
            "content": "Let me check both.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": c1}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": c2})}},
            ],
        },
        {"role": "tool", "content": w1},
        {"role": "tool", "content": w2},  # consecutive tool messages
        {"role": "assistant", "content": f"{c1}: {w1}. {c2}: {w2}."},
        {"role": "user", "content": f"And {a} + {b}?"},
        {
            "role": "assistant",
            "reasoning_content": "Use the add tool.",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}],
        },
        {"role": "tool", "content": str(a + b)},
        {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
    ]


KINDS = [(_arith, None), (_greeting, None), (_multi_turn, None), (_weather, [WEATHER_TOOL]), (_two_tools, [WEATHER_TOOL, ADD_TOOL])]


def make_rows(n: int = 80, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        make, tools = KINDS[i % len(KINDS)]
        row = {"messages": make(rng)}
        if tools:
            row["tools"] = tools
        row["metadata"] = {"kind": make.__name__.lstrip("_"), "id": i}
        rows.append(row)
    return rows


def build_tokenizer(rows: list[dict], qwen3_dir: Path, out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    ref = json.loads((qwen3_dir / "tokenizer.json").read_text())
    template = (qwen3_dir / "chat_template.jinja").read_text()
    regex = ref["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(__import__("tokenizers").Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=ADDED_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = []
    for row in rows:
        for m in row["messages"]:
            texts.append(m.get("content") or "")
            texts.append(m.get("reasoning_content") or "")
        texts.append(json.dumps(row.get("tools") or []))
    texts.append(template)
    tok.train_from_iterator(texts, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
    )
    fast.chat_template = template
    fast.save_pretrained(out)


def build_model(out: Path, vocab_size: int, seed: int) -> int:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qwen3-tokenizer", type=Path, default=DEFAULT_QWEN3, help="dir with Qwen3 tokenizer.json + chat_template.jinja")
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rows = make_rows(seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "tiny_sft.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    model_dir = args.out / "tiny-qwen3"
    build_tokenizer(rows, args.qwen3_tokenizer, model_dir, args.vocab_size)
    from transformers import AutoTokenizer

    n_vocab = len(AutoTokenizer.from_pretrained(model_dir))
    n_params = build_model(model_dir, n_vocab, args.seed)
    print(f"wrote {len(rows)} rows and a {n_params:,}-parameter Qwen3 (vocab {n_vocab}) to {args.out}")


if __name__ == "__main__":
    main()
