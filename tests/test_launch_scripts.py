"""The launch scripts: bash syntax, slime's structure, and every flag known to the parser."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import ROOT

SCRIPTS = ["run-tiny-sft.sh", "run-qwen3-4B-base-sft.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_flags_parse(tmp_path, name):
    path = ROOT / "scripts" / name
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    text = path.read_text()
    for group in ("MODEL_ARGS", "CKPT_ARGS", "SFT_ARGS", "PERF_ARGS", "OPTIMIZER_ARGS", "WANDB_ARGS", "MISC_ARGS", "ray job submit"):
        assert group in text, group
    assert "pkill" not in text and "0.0.0.0" not in text
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"))
    flags = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    from slime.utils.arguments import get_parser

    args = get_parser().parse_args(flags)  # unknown flags exit with an error
    assert args.rollout_function_path == "slime.rollout.sft_rollout.generate_rollout"
    assert args.debug_train_only and args.calculate_per_token_loss


def test_ray_helper_binds_localhost_with_auth():
    text = (ROOT / "scripts" / "ray_local.sh").read_text()
    assert "--dashboard-host 127.0.0.1" in text and "--node-ip-address 127.0.0.1" in text
    assert "RAY_AUTH_MODE" in text and "pkill" not in text and "ray stop" not in text


def _port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tiny_script_end_to_end_through_ray_job_submit(tmp_path):
    """ray start --head + ray job submit + train_async + HF export + generate, then no Ray left."""
    env = dict(
        os.environ, OUT=str(tmp_path / "run"), NUM_EPOCH="1", OMP_NUM_THREADS="1",
        RAY_DASHBOARD_PORT=str(_port()), RAY_GCS_PORT=str(_port()),
    )
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "run-tiny-sft.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    assert "reply of the exported model:" in proc.stdout
    run = tmp_path / "run"
    assert (run / "hf" / "model.safetensors").exists() and (run / "ckpt" / "latest_checkpointed_iteration.txt").exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines() if "raylet" in line or "gcs_server" in line]


def test_flag_reference_is_current():
    from conftest import load_tool

    assert load_tool("gen_flag_reference").main(["--check"]) == 0
