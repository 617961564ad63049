"""Generate a verifiable toy RL task for the embedded tiny model (scripts/run-tiny-grpo.sh).

    python tools/make_toy_task.py --out-dir OUT/toy [--task secret|copy|add] [--seed 0] [--train-rows 2000]

Writes three JSONL files (OpenAI ``messages``, one user turn each):

- ``train.jsonl``: RL prompts with a ``label`` (``--input-key messages --label-key label``),
  the task's problems shuffled and repeated to ``--train-rows`` rows;
- ``eval.jsonl``: every problem of the task once, with its label (``--eval-prompt-data``);
- ``sft_format.jsonl``: a warm-start SFT set that teaches the answer *format* only
  (``\\boxed{d}``). Every problem appears with each of the ten digits equally often, so the set holds
  no information about which answer is right: a model fitted to it answers in the right shape
  with a uniform digit, i.e. a reward of about 1/10. Whatever reward GRPO reaches beyond
  that, it learned from the reward alone.

Tasks (answers are one digit, graded by ``--rm-type math``: the last ``\\boxed{}`` equals the label):

- ``secret``: ``"What is the secret digit?"`` -> a digit drawn from ``--seed`` that appears
  nowhere in the data but the labels. The policy can only find it by trying digits and
  being rewarded: the proof that GRPO learns (CI and run-tiny-grpo.sh; 0.14 -> ~0.95 in 8
  rollouts, docs/rl.md);
- ``copy``: name the digit the prompt repeats, ``"555555555555"`` -> ``5`` (10 problems; the
  digit fills the prompt so that even unfocused attention carries it to the answer);
- ``add``: single-digit additions with a one-digit sum, ``"3 + 4 ="`` -> ``7`` (55 problems).

``copy`` and ``add`` need an answer that depends on the prompt; the ~400k-parameter tiny model
did not learn either by GRPO within 40 rollouts (docs/rl.md): they are there for bigger models
and longer runs.

Everything is seeded; the same arguments write the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DIGITS = [str(d) for d in range(10)]
COPY_REPEATS = 12  # digits in a copy prompt
SECRET_PROMPT = "What is the secret digit?"
TASKS = ("secret", "copy", "add")
MIN_SFT_ROWS = 100  # the format set is repeated (whole balanced passes) up to at least this


def problems(task: str, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt text, label) of every problem of ``task``, in a fixed order."""
    if task == "secret":
        return [(SECRET_PROMPT, random.Random(f"secret-{seed}").choice(DIGITS))]
    if task == "add":
        return [(f"{a} + {b} =", str(a + b)) for a in range(10) for b in range(10) if a + b <= 9]
    if task == "copy":
        return [(d * COPY_REPEATS, d) for d in DIGITS]
    raise ValueError(f"--task {task!r}: choose one of {', '.join(TASKS)}")


def prompt_row(text: str, label: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "label": label}


def answer(digit: str) -> str:
    return f"\\boxed{{{digit}}}"


def build(task: str, seed: int, train_rows: int) -> dict[str, list[dict]]:
    """The three files' rows (see the module doc)."""
    if train_rows < 1:
        raise ValueError(f"--train-rows must be >= 1, got {train_rows}")
    rng = random.Random(seed)
    probs = problems(task, seed)
    train: list[dict] = []
    while len(train) < train_rows:  # whole shuffled passes, so every problem is seen equally often
        order = probs[:]
        rng.shuffle(order)
        train.extend(prompt_row(t, label) for t, label in order)
    one_pass = [
        {"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": answer(d)}]}
        for t, _ in probs
        for d in DIGITS  # every digit once per problem: the format, and no hint of the right one
    ]
    sft = one_pass * -(-MIN_SFT_ROWS // len(one_pass))
    rng.shuffle(sft)
    return {
        "train.jsonl": train[:train_rows],
        "eval.jsonl": [prompt_row(t, label) for t, label in probs],
        "sft_format.jsonl": sft,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--task", default="secret", choices=TASKS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train-rows", type=int, default=2000, help="RL prompt rows (whole shuffled passes over the problems)"
    )
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in build(args.task, args.seed, args.train_rows).items():
        with open(args.out_dir / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{args.out_dir / name}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
