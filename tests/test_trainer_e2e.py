"""The trainer end to end through Ray on CPU: DP=2, loss falls, checkpoints, resume equals an
uninterrupted run (train_async.py, prefetched batch neither skipped nor repeated), HF export
loads, wandb offline never writes the key, and bad set-ups fail fast leaving no Ray behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, TINY_DATA

TIMEOUT_S = 300
SECRET = "slime-test-secret-key-0123456789abcdef0123"


def base_cmd(save, script="train_async.py"):
    return [
        sys.executable, script, "--hf-checkpoint", str(TINY), "--prompt-data", str(TINY_DATA),
        "--rollout-batch-size", "8", "--num-rollout", "4", "--actor-num-gpus-per-node", "2",
        "--use-dynamic-batch-size", "--max-tokens-per-gpu", "1024", "--calculate-per-token-loss",
        "--lr", "3e-3", "--rollout-shuffle", "--save", str(save), "--load", str(save), "--save-interval", "2",
        "--rollout-function-path", "slime.rollout.sft_rollout.generate_rollout", "--loss-type", "sft_loss", "--debug-train-only",
    ]


def run(cmd, **env):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=TIMEOUT_S)


def ray_processes(marker: str = "") -> list[str]:
    """Running raylet / GCS processes (whose command line holds ``marker``). Zombies are not
    running: where PID 1 does not reap orphans (containers), a stopped raylet stays listed as
    ``[raylet] <defunct>`` although it is gone."""
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    rows = [line.strip().split(None, 1) for line in out.splitlines() if line.strip()]
    return [
        args for stat, args in (r for r in rows if len(r) == 2)
        if not stat.startswith("Z") and marker in args and ("raylet" in args or "gcs_server" in args)
    ]


def losses(save):
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    save, hf = root / "ckpt", root / "hf"
    cmd = base_cmd(save) + [
        "--save-hf", str(hf), "--eval-prompt-data", "tiny", str(TINY_DATA), "--eval-interval", "2",
        "--use-tensorboard", "--use-wandb", "--wandb-mode", "offline", "--wandb-dir", str(root), "--wandb-key", SECRET,
    ]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, save, hf, proc


def test_training_runs_and_loss_falls(uninterrupted):
    root, save, hf, proc = uninterrupted
    history = losses(save)
    assert [s for s, _ in history] == [1, 2, 3, 4]
    assert history[-1][1] < history[0][1]
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    evals = [r for r in rows if "eval/tiny/loss" in r]
    # The starting model (step 0, before any training), then every 2 rollouts.
    assert [r["global_step"] for r in evals] == [0, 2, 4]
    assert evals[2]["eval/tiny/loss"] < evals[1]["eval/tiny/loss"] < evals[0]["eval/tiny/loss"]
    for key in ("lr", "grad_norm", "supervised_tokens", "total_tokens", "tokens_per_s", "packing_efficiency", "step_time_s"):
        assert key in next(r for r in rows if "eval/tiny/loss" not in r)  # the first step's record
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert (save / "iter_0000001" / "slime_state.json").exists() and (save / "iter_0000003").is_dir()
    assert any((save / "tensorboard").iterdir())
    assert not ray_processes()


def test_hf_export_loads_and_generates(uninterrupted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, hf, _ = uninterrupted
    tok = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_wandb_key_never_written(uninterrupted):
    root, _, _, proc = uninterrupted
    assert SECRET not in proc.stdout + proc.stderr
    wandb_files = [p for p in root.rglob("*") if p.is_file() and "wandb" in str(p)]
    assert wandb_files, "wandb offline wrote nothing"
    for p in wandb_files:
        assert SECRET.encode() not in p.read_bytes(), p


def test_resume_matches_uninterrupted(uninterrupted, tmp_path):
    _, save_ref, _, _ = uninterrupted
    save = tmp_path / "ckpt"
    first = run(base_cmd(save), SLIME_STOP_AFTER_ROLLOUT="1")
    assert first.returncode != 0 and "fault injection" in first.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1"
    second = run(base_cmd(save))
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stderr
    ours, ref = losses(save), losses(save_ref)
    assert [s for s, _ in ours] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(ours, ref):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), s
    assert not ray_processes()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--global-batch-size", "3"], "--global-batch-size 3 must divide --rollout-batch-size 8"),
        (["--prompt-data", "/nonexistent/data.jsonl"], "--prompt-data: data file not found: /nonexistent/data.jsonl"),
        (["--n-samples-per-prompt", "4"], "--n-samples-per-prompt must be 1"),
    ],
)
def test_bad_setups_fail_fast_before_ray(tmp_path, extra, message):
    proc = run(base_cmd(tmp_path / "ckpt", script="train.py") + extra)
    assert proc.returncode == 1 and message in proc.stderr
    assert not ray_processes()


def test_unreadable_checkpoint_fails_before_ray(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("5")  # names a missing iteration
    proc = run(base_cmd(save, script="train.py"))
    assert proc.returncode == 1
    assert "--load: " in proc.stderr and "iter_0000005" in proc.stderr
    assert "slime.ray" not in proc.stderr and "Ray cluster" not in proc.stderr  # stopped before Ray started
    assert not ray_processes()
