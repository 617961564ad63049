"""End-of-run summary for a newcomer: where everything is, how the loss moved, what the model says.

    python tools/summarize_run.py --save OUT/ckpt --save-hf OUT/hf [--tensorboard-dir DIR] [--prompt "..."]

Reads ``SAVE/metrics.jsonl`` (one JSON line per optimizer step, written by the trainer; an RL
run adds one line per rollout, whose reward is summarised first and last, and per eval) and
``SAVE/latest_checkpointed_iteration.txt``, loads the HF export with transformers and
generates a greedy reply to one chat prompt. Exits non-zero if a piece the run should have
produced is missing, so a launcher that ends with it fails loudly rather than summarising
nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_losses(metrics: Path) -> tuple[list[float], dict[str, float]]:
    """Training losses in step order, and the last value of each eval metric."""
    losses, evals = [], {}
    with open(metrics, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                losses.append(float(record["loss"]))
            evals.update({k: float(v) for k, v in record.items() if k.startswith("eval/")})
    return losses, evals


def read_rewards(metrics: Path) -> tuple[list[float], dict[str, list[float]]]:
    """RL: the reward of each rollout in order, and each eval set's reward mean at each eval.

    A rollout's reward is ``rollout/unfiltered/reward_mean`` (every group the dynamic filter
    judged: the policy's success rate) where logged, else ``rollout/reward_mean`` (kept groups).
    """
    rollouts, evals = [], {}
    with open(metrics, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            value = record.get("rollout/unfiltered/reward_mean", record.get("rollout/reward_mean"))
            if value is not None:
                rollouts.append(float(value))
            for k, v in record.items():
                if k.startswith("eval/") and k.endswith("/reward_mean"):
                    evals.setdefault(k, []).append(float(v))
    return rollouts, evals


def generate_reply(hf_dir: Path, prompt: str, max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=False)


def summary_lines(save: Path, hf_dir: Path | None, tensorboard: Path | None, prompt: str, reply: str | None) -> list[str]:
    losses, evals = read_losses(save / "metrics.jsonl")
    if not losses:
        raise SystemExit(f"{save / 'metrics.jsonl'}: no training loss recorded")
    tracker = save / "latest_checkpointed_iteration.txt"
    latest = tracker.read_text().strip() if tracker.exists() else None
    lines = [
        "=" * 72,
        "run finished",
        f"  checkpoint (torch_dist, resume with --load): {save}" + (f"  [latest rollout {latest}]" if latest else "  [none saved]"),
    ]
    if hf_dir:
        lines.append(f"  HF export (transformers / SGLang load it):  {hf_dir}")
    lines.append(f"  metrics, one JSON line per step:           {save / 'metrics.jsonl'}")
    if tensorboard:
        lines.append(f"  TensorBoard logs:                          {tensorboard}  (tensorboard --logdir {tensorboard})")
    rollouts, eval_rewards = read_rewards(save / "metrics.jsonl")
    if rollouts:  # RL: the policy loss is no per-token likelihood; the reward is what moved
        first, last = rollouts[0], rollouts[-1]
        lines.append(f"  reward: first rollout {first:.4f} -> last rollout {last:.4f} over {len(rollouts)} rollouts")
        for name, values in sorted(eval_rewards.items()):
            lines.append(f"  {name}: first eval {values[0]:.4f} -> last eval {values[-1]:.4f} ({len(values)} evals)")
        lines.append(f"  policy loss: first step {losses[0]:.4f} -> last step {losses[-1]:.4f} ({len(losses)} steps)")
    else:
        lines.append(f"  loss (nats/token): first step {losses[0]:.4f} -> last step {losses[-1]:.4f} over {len(losses)} steps")
        for name, value in sorted(evals.items()):
            lines.append(f"  {name}: {value:.4f}")
    if reply is not None:
        lines.append(f"  reply of the exported model to {prompt!r}: {reply!r}")
    lines.append("=" * 72)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save", required=True, type=Path, help="the run's --save directory")
    p.add_argument("--save-hf", type=Path, default=None, help="the run's --save-hf directory (a reply is generated)")
    p.add_argument("--tensorboard-dir", type=Path, default=None, help="default: SAVE/tensorboard when it exists")
    p.add_argument("--prompt", default="What is 3 + 4?")
    p.add_argument("--max-new-tokens", type=int, default=40)
    args = p.parse_args(argv)
    tensorboard = args.tensorboard_dir or (args.save / "tensorboard")
    if not tensorboard.exists():
        tensorboard = None
    reply = None
    if args.save_hf:
        if not (args.save_hf / "config.json").exists():
            print(f"error: no HF export at {args.save_hf}", file=sys.stderr)
            return 1
        reply = generate_reply(args.save_hf, args.prompt, args.max_new_tokens)
    print("\n".join(summary_lines(args.save, args.save_hf, tensorboard, args.prompt, reply)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
