"""The launch scripts: bash syntax, slime's structure, and every flag known to the parser."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, dry_run_flags, free_port

SCRIPTS = ["run-tiny-sft.sh", "run-qwen3-4B-base-sft.sh", "run-qwen3-30B-A3B-sft.sh", "run-glm4-9B-sft.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_flags_parse(tmp_path, name):
    path = ROOT / "scripts" / name
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    text = path.read_text()
    for group in ("MODEL_ARGS", "CKPT_ARGS", "SFT_ARGS", "PERF_ARGS", "OPTIMIZER_ARGS", "WANDB_ARGS", "MISC_ARGS", "submit_job"):
        assert group in text, group
    assert "pkill" not in text and "0.0.0.0" not in text
    flags = dry_run_flags(name, tmp_path / "out")
    from slime.utils.arguments import get_parser

    args = get_parser().parse_args(flags)  # unknown flags exit with an error
    assert args.rollout_function_path == "slime.rollout.sft_rollout.generate_rollout"
    assert args.debug_train_only and args.calculate_per_token_loss


RL_SCRIPTS = ["run-qwen3-4B.sh", "run-qwen3-4B-grpo-dapo.sh", "run-glm4-9B.sh"]


@pytest.mark.parametrize("name", RL_SCRIPTS)
def test_rl_script_flags_parse_and_pass_every_config_check(tmp_path, name):
    """slime's GRPO launchers: slime's groups, every flag known, every combination check passed;
    what stops them here is only the data (and GPUs) this machine lacks."""
    path = ROOT / "scripts" / name
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    text = path.read_text()
    for group in ("MODEL_ARGS", "CKPT_ARGS", "ROLLOUT_ARGS", "EVAL_ARGS", "PERF_ARGS", "GRPO_ARGS", "OPTIMIZER_ARGS",
                  "SGLANG_ARGS", "MISC_ARGS", "submit_job"):
        assert group in text, group
    assert "pkill" not in text and "0.0.0.0" not in text
    flags = dry_run_flags(name, tmp_path / "out")
    from slime.backends.megatron_utils.arguments import actor_config_from_args
    from slime.utils.arguments import parse_args, validate_trainer_args

    args = parse_args(flags)
    cfg = actor_config_from_args(args, total_steps=args.num_rollout)
    assert cfg.train.loss_type == "policy_loss" and cfg.algorithm.eps_clip_high == 0.28
    assert args.colocate != bool(args.rollout_num_gpus)  # colocated, or engines on GPUs of their own
    with pytest.raises(FileNotFoundError, match="--prompt-data"):
        validate_trainer_args(args)


def test_ray_helper_binds_localhost_with_auth():
    text = (ROOT / "scripts" / "ray_local.sh").read_text()
    assert "--dashboard-host 127.0.0.1" in text and "--node-ip-address 127.0.0.1" in text
    assert "RAY_AUTH_MODE" in text and "pkill" not in text and "ray stop" not in text
    assert "ray job submit" in text  # submit_job, which the launchers call


@pytest.fixture
def short_tmp():
    """A short temp dir: Ray's socket paths under TMPDIR must stay within AF_UNIX's 107 bytes."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _bare_env(tmp_path, tmp=None, **extra) -> dict:
    """A new user's environment: empty HOME and temp dir, no Ray settings of anyone."""
    home, tmp = tmp_path / "home", tmp or tmp_path / "tmp"
    home.mkdir(parents=True)
    tmp.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HF_", "XDG_"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), **extra)
    return env


def _source_helper(script: str, env: dict) -> subprocess.CompletedProcess:
    cmd = f'source "{ROOT}/scripts/ray_local.sh"; {script}'
    return subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)


def test_auth_token_created_on_a_bare_home_private_and_never_printed(tmp_path):
    env = _bare_env(tmp_path)
    proc = _source_helper("ensure_ray_auth_token", env)
    assert proc.returncode == 0, proc.stderr
    token = tmp_path / "home" / ".ray" / "auth_token"
    assert token.exists() and (token.stat().st_mode & 0o777) == 0o600
    secret = token.read_text().strip()
    assert len(secret) >= 16 and secret not in proc.stdout + proc.stderr
    again = _source_helper("ensure_ray_auth_token", env)  # an existing token is kept, not replaced
    assert again.returncode == 0 and token.read_text().strip() == secret


def test_users_own_token_and_cluster_are_left_alone(tmp_path):
    home_token = tmp_path / "home" / ".ray" / "auth_token"
    env = _bare_env(tmp_path, RAY_AUTH_TOKEN="user-token-1234567890")
    assert _source_helper("ensure_ray_auth_token", env).returncode == 0
    assert not home_token.exists()  # RAY_AUTH_TOKEN given: nothing written
    env = _bare_env(tmp_path / "b", RAY_ADDRESS="http://10.0.0.1:8265")
    proc = _source_helper('OUT=/nonexistent; start_local_ray 1 0; echo "$SUBMIT_ADDRESS|${RAY_AUTH_MODE:-unset}"', env)
    assert proc.stdout.strip() == "http://10.0.0.1:8265|unset", proc.stderr  # their cluster, their auth mode
    assert not (tmp_path / "b" / "home" / ".ray").exists()


@pytest.mark.parametrize(
    "failure, job_created, submits, rc",
    [
        ("No available agent to submit job, please try again later", False, 3, 0),  # refused twice, then accepted
        ("ConnectionError: ('Connection aborted.', RemoteDisconnected(...))", True, 1, 0),  # created: followed, not resubmitted
        ("job failed", False, 1, 1),  # the job's own failure is final
    ],
)
def test_submit_retries_only_when_no_job_was_created(tmp_path, failure, job_created, submits, rc):
    """A fake `ray` CLI: `job submit` fails twice with ``failure``; `job status` knows the job
    only if ``job_created``. A refused submission is retried, a created job is followed."""
    bin_dir, count = tmp_path / "bin", tmp_path / "submits"
    bin_dir.mkdir()
    fake = bin_dir / "ray"
    status = "echo \"Job 'x' succeeded\"; exit 0" if job_created else "exit 1"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$2" in\n'
        f'  submit) n=$(( $(cat "{count}" 2>/dev/null || echo 0) + 1 )); echo $n > "{count}"\n'
        f'          if [ $n -le 2 ]; then echo "RuntimeError: {failure}"; exit 1; fi; echo "Job succeeded"; exit 0 ;;\n'
        f"  status) {status} ;;\n"
        "  logs) exit 0 ;;\n"
        "esac\n"
    )
    fake.chmod(0o755)
    env = _bare_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SUBMIT_ADDRESS="http://127.0.0.1:1")
    proc = _source_helper("sleep() { :; }; submit_job -- python3 train.py", env)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert int(count.read_text()) == submits


def test_ci_runs_the_test_command_in_a_clean_environment():
    text = (ROOT / ".ci" / "run").read_text()
    assert "scripts/run-tests.sh" in text
    for setting in ('export HOME="${CI_ROOT}/home"', 'TMPDIR="${CI_ROOT}/tmp"', 'XDG_CACHE_HOME="${CI_ROOT}/cache"', "HF_HOME="):
        assert setting in text, setting
    assert "RAY_* |" in text and "mktemp -d" in text


def test_tiny_script_end_to_end_on_a_bare_home(tmp_path, short_tmp):
    """What a new user runs: empty HOME, no Ray token, no Ray running. ray start --head +
    ray job submit + train_async + save + HF export + the summary, then no Ray left."""
    env = _bare_env(
        tmp_path, short_tmp, OUT=str(tmp_path / "run"), NUM_EPOCH="1", OMP_NUM_THREADS="1",
        RAY_DASHBOARD_PORT=str(free_port()), RAY_GCS_PORT=str(free_port()),
    )
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "run-tiny-sft.sh")], env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out
    assert "attention: --attention-backend flash -> sdpa" in out  # says which path it picked
    run = tmp_path / "run"
    assert (run / "hf" / "model.safetensors").exists() and (run / "ckpt" / "latest_checkpointed_iteration.txt").exists()
    summary = proc.stdout[proc.stdout.index("run finished") :]
    for where in (run / "ckpt", run / "hf", run / "ckpt" / "metrics.jsonl", run / "ckpt" / "tensorboard"):
        assert str(where) in summary, where
    assert "loss (nats/token): first step" in summary and "reply of the exported model" in summary
    assert (tmp_path / "home" / ".ray" / "auth_token").exists()
    from test_trainer_e2e import ray_processes

    assert not ray_processes(str(short_tmp))


def test_flag_reference_is_current():
    from conftest import load_tool

    assert load_tool("gen_flag_reference").main(["--check"]) == 0
