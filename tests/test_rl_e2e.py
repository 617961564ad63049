"""RL end to end through Ray on CPU: train_async.py starts the CPU engine, generates groups,
scores them, trains with policy_loss (KL to the reference), syncs weights to the engine after
every rollout, evaluates by reward, saves, and a resumed run continues from the saved rollout
with the losses of an uninterrupted run."""

from __future__ import annotations

import json
import random

import pytest

from conftest import TINY, write_jsonl
from test_trainer_e2e import ray_processes, run

pytestmark = pytest.mark.timeout(600)


def prompts(path, n=12, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}? Answer in \\boxed{{}}."}], "label": str(a + b)})
    return write_jsonl(path, rows)


def rl_cmd(data, save, num_rollout, script="train_async.py"):
    import sys

    return [
        sys.executable, script, "--hf-checkpoint", str(TINY), "--prompt-data", str(data),
        "--input-key", "messages", "--label-key", "label", "--apply-chat-template", "--rollout-shuffle",
        "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--num-rollout", str(num_rollout),
        "--rollout-max-response-len", "6", "--rm-type", "deepscaler", "--rollout-engine", "cpu",
        "--rollout-deterministic-seeds", "--actor-num-gpus-per-node", "1", "--use-kl-loss", "--kl-loss-coef", "0.01",
        "--lr", "1e-4", "--save", str(save), "--load", str(save), "--save-interval", "1",
        "--eval-prompt-data", "toy", str(data), "--eval-interval", "2",
    ]


def records(save):
    return [json.loads(line) for line in open(save / "metrics.jsonl")]


def test_grpo_through_ray_with_weight_sync_eval_and_resume(tmp_path):
    data = prompts(tmp_path / "prompts.jsonl")
    save = tmp_path / "ckpt"
    # train_async.py (rollout 1 prefetched while rollout 0 trains), crashing right after rollout
    # 0's save; then the resume. The resume uses train.py: after a restart the engines hold the
    # latest weights, so train_async.py's one-step-stale rollout cannot be replayed, while
    # train.py's on-policy rollout can (compared with an uninterrupted train.py run below).
    proc = run(rl_cmd(data, save, 2), SLIME_STOP_AFTER_ROLLOUT="0")
    assert proc.returncode != 0 and "fault injection" in proc.stdout + proc.stderr
    proc = run(rl_cmd(data, save, 2, "train.py"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out and "at rollout 1" in out
    rows = records(save)
    rollouts = [r for r in rows if "rollout/reward_mean" in r]
    steps = [r for r in rows if "pg_loss" in r]
    syncs = [r for r in rows if "weight_sync/bytes" in r]
    evals = [r for r in rows if "eval/toy/reward_mean" in r]
    assert [r["rollout_id"] for r in rollouts] == [0, 1]  # rollout 0 before the crash, 1 after resume
    assert [r["rollout/num_samples"] for r in rollouts] == [8, 8]  # 4 prompts x 2 samples
    assert len(steps) == 2 and all("kl_loss" in r and "entropy" in r and "ppo_ratio" in r for r in steps)
    # Weights go to the engine at every start (the resumed run's engine must not sample from
    # --hf-checkpoint) and after every rollout's save, the whole model each time: the crashed
    # run syncs once (it stops right after rollout 0's save), the resumed one twice.
    assert len(syncs) == 3 and len({r["weight_sync/bytes"] for r in syncs}) == 1 and syncs[0]["weight_sync/bytes"] > 0
    assert [r["global_step"] for r in syncs] == [0, 1, 2]
    # Before training (the crashed run starts at rollout 0; the resumed one does not repeat it)
    # and after the last rollout.
    assert [r["global_step"] for r in evals] == [0, 2] and evals[0]["eval/toy/num_samples"] == 12
    # Invariant 5 for RL: uninterrupted, the run generates the same rollouts (seeded per sample)
    # and trains to the same losses as the crashed-and-resumed run. It also runs colocated: the
    # trainer's state leaves while the engine generates, the engine's weights and KV cache are
    # released while the trainer trains (their values lost: the sync must refill them), so the
    # equality below also proves every offload round trip exact.
    whole = tmp_path / "whole"
    proc = run(rl_cmd(data, whole, 2, "train.py") + ["--colocate"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for line in ("colocate: engines: release kv_cache weights", "colocate: trainer: offload all but the weights",
                 "colocate: engines: resume weights", "colocate: trainer: offload (", "colocate: engines: resume kv_cache",
                 "colocate: trainer: onload"):  # fmt: skip
        assert line in out, line
    ref = records(whole)
    assert [r["colocate/switch_seconds_total"] > 0 for r in ref if "weight_sync/bytes" in r] == [True] * 3
    for key in ("rollout/reward_mean", "rollout/response_len_tokens_mean"):
        assert [r[key] for r in ref if key in r] == [r[key] for r in rollouts]
    for key in ("loss", "pg_loss", "kl_loss"):
        assert [r[key] for r in ref if "pg_loss" in r] == pytest.approx([r[key] for r in steps], rel=1e-5, abs=1e-7)
    assert not ray_processes()


def test_debug_rollout_only_generates_and_scores_without_training(tmp_path):
    import sys

    data = prompts(tmp_path / "prompts.jsonl", n=4)
    save = tmp_path / "ckpt"
    cmd = [
        sys.executable, "train.py", "--hf-checkpoint", str(TINY), "--prompt-data", str(data), "--input-key", "messages",
        "--label-key", "label", "--apply-chat-template", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
        "--num-rollout", "2", "--rollout-max-response-len", "4", "--rm-type", "deepscaler", "--rollout-engine", "cpu",
        "--debug-rollout-only", "--save", str(save),
    ]
    proc = run(cmd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = records(save)
    assert [r["rollout_id"] for r in rows if "rollout/reward_mean" in r] == [0, 1]
    assert not [r for r in rows if "pg_loss" in r or "weight_sync/bytes" in r]
    assert not list(save.glob("iter_*"))  # nothing trained, nothing saved
