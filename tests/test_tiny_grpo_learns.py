"""The proof RL learns: scripts/run-tiny-grpo.sh's two jobs on CPU (format-only SFT warm start,
then GRPO with dynamic sampling and KL through the CPU engine) raise the reward of a toy task
from about 1/10 to near 1. Also: the script's flags parse, the toy task's warm-start set
carries no answer, and building the rollout flags stays light (no aiohttp)."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, load_tool

make_toy_task = load_tool("make_toy_task")
summarize_run = load_tool("summarize_run")

SCRIPT = ROOT / "scripts" / "run-tiny-grpo.sh"
JOB_TIMEOUT_S = 240
GRPO_ROLLOUTS = 8  # the script runs 12; 8 already end far above the start (docs/rl.md)


def dry_run(out: Path, **env) -> tuple[list[str], list[str]]:
    """The script's (SFT flags, GRPO flags) with OUT=out."""
    full_env = dict(os.environ, DRY_RUN="1", OUT=str(out), **env)
    proc = subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True, check=True, timeout=60)
    text = proc.stdout
    sft, grpo = text.strip("\n").split("\n\n")
    return sft.splitlines(), grpo.splitlines()


def test_script_flags_parse(tmp_path):
    from slime.utils.arguments import get_parser, is_sft

    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    text = SCRIPT.read_text()
    groups = ("MODEL_ARGS", "CKPT_ARGS", "ROLLOUT_ARGS", "EVAL_ARGS", "GRPO_ARGS", "OPTIMIZER_ARGS", "SGLANG_ARGS")
    for group in groups + ("MISC_ARGS",):
        assert group in text, group
    assert "submit_job" in text and "SLIME_SKIP_INSTALL" in text and "pkill" not in text and "0.0.0.0" not in text
    sft_flags, grpo_flags = dry_run(tmp_path / "out")
    sft, grpo = get_parser().parse_args(sft_flags), get_parser().parse_args(grpo_flags)  # unknown flags exit
    assert is_sft(sft) and sft.save_hf == str(tmp_path / "out" / "warmstart_hf")
    assert not is_sft(grpo) and grpo.hf_checkpoint == sft.save_hf  # GRPO starts from the warm start
    assert grpo.advantage_estimator == "grpo" and grpo.use_kl_loss and grpo.kl_loss_coef > 0
    assert grpo.over_sampling_batch_size > grpo.rollout_batch_size
    filters = "slime.rollout.filter_hub.dynamic_sampling_filters"
    assert grpo.dynamic_sampling_filter_path.startswith(f"{filters}.check_reward_nonzero_std")
    assert grpo.rm_type == "math" and grpo.eval_prompt_data[1].endswith("eval.jsonl")


@pytest.mark.parametrize("task", make_toy_task.TASKS)
def test_warm_start_set_teaches_the_format_not_the_answer(task):
    files = make_toy_task.build(task, seed=3, train_rows=200)
    assert files == make_toy_task.build(task, seed=3, train_rows=200)  # seeded
    labels = {row["messages"][0]["content"]: row["label"] for row in files["eval.jsonl"]}
    assert len(files["train.jsonl"]) == 200 and {r["label"] for r in files["train.jsonl"]} <= set(labels.values())
    answers = collections.defaultdict(collections.Counter)
    for row in files["sft_format.jsonl"]:
        user, assistant = row["messages"]
        assert assistant["content"].startswith("\\boxed{") and assistant["content"].endswith("}")
        answers[user["content"]][assistant["content"][len("\\boxed{") : -1]] += 1
    assert set(answers) == set(labels)
    for counts in answers.values():  # every digit equally often for every prompt: no hint of the label
        assert sorted(counts) == make_toy_task.DIGITS and len(set(counts.values())) == 1


def test_toy_labels_are_right():
    assert make_toy_task.problems("add")[:3] == [("0 + 0 =", "0"), ("0 + 1 =", "1"), ("0 + 2 =", "2")]
    for text, label in make_toy_task.problems("add"):
        a, b = text[: -len(" =")].split(" + ")
        assert int(a) + int(b) == int(label) <= 9
    assert all(text == label * make_toy_task.COPY_REPEATS for text, label in make_toy_task.problems("copy"))
    secrets = {make_toy_task.problems("secret", seed)[0][1] for seed in range(20)}
    assert len(secrets) > 3  # drawn from the seed, not a constant
    with pytest.raises(ValueError, match="--task 'mul'"):
        make_toy_task.problems("mul")


def test_rollout_flags_build_without_aiohttp():
    code = (
        "import argparse, sys\n"
        "from slime.rollout.config import add_rollout_rl_arguments\n"
        "from slime.rollout.rm_hub.config import RewardConfig\n"
        "add_rollout_rl_arguments(argparse.ArgumentParser()); RewardConfig(rm_type='math')\n"
        "print(sorted(m for m in ('aiohttp', 'torch', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def run_job(script: str, flags: list[str], log: Path) -> float:
    """``python script flags`` in its own session; killed with everything it started after JOB_TIMEOUT_S."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)  # a private local Ray, never a user's cluster
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, script, *flags],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one session: everything it starts can be found and killed
        )
        try:
            rc = proc.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{script} ran past {JOB_TIMEOUT_S} s; log tail:\n{log.read_text()[-3000:]}")
        finally:
            _kill_leftovers(proc.pid)
    assert rc == 0, log.read_text()[-4000:]
    return time.monotonic() - start


def _kill_leftovers(session: int) -> None:
    """Anything still in the job's session (a Ray worker that outlived its driver) is killed."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # field 6 of /proc/PID/stat: the session id
            os.kill(int(stat.parent.name), signal.SIGKILL)


def test_grpo_raises_the_reward_of_the_toy_task(tmp_path):
    out = tmp_path / "run"
    make_toy_task.main(["--out-dir", str(out / "data"), "--task", "secret"])
    sft_flags, grpo_flags = dry_run(out)
    sft_s = run_job("train_async.py", sft_flags, tmp_path / "sft.log")
    assert (out / "warmstart_hf" / "config.json").exists()
    short = ["--num-rollout", str(GRPO_ROLLOUTS), "--eval-interval", str(GRPO_ROLLOUTS)]
    grpo_s = run_job("train.py", grpo_flags + short, tmp_path / "grpo.log")

    rewards, evals = summarize_run.read_rewards(out / "ckpt" / "metrics.jsonl")
    final_eval = evals["eval/toy/reward_mean"][-1]
    shown = [round(r, 3) for r in rewards]
    print(f"sft {sft_s:.0f} s, grpo {grpo_s:.0f} s; rollout rewards {shown}; final eval {final_eval:.3f}")
    assert len(rewards) == GRPO_ROLLOUTS
    # The warm start answers a uniform digit: ~0.1 (64 samples: sd ~0.04). A broken policy
    # update (wrong sign, stale engine weights, advantages detached from their samples) stays
    # there or falls; a working one ends near 1 (measured: 0.10 -> 0.96, eval 0.95).
    assert rewards[0] <= 0.3
    assert sum(rewards[-2:]) / 2 >= rewards[0] + 0.4
    assert final_eval >= 0.6
    summary = "\n".join(summarize_run.summary_lines(out / "ckpt", None, None, "", None))
    assert f"first rollout {rewards[0]:.4f}" in summary and "eval/toy/reward_mean: first eval" in summary
