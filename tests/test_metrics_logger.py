"""MetricsLogger: JSONL always; wandb (offline here) under slime's --wandb-team / --wandb-host."""

from __future__ import annotations

import argparse
import json

import pytest


def _args(tmp_path, **over):
    base = dict(
        use_tensorboard=False, use_wandb=True, wandb_mode="offline", wandb_key=None, wandb_project="p",
        wandb_group="g", wandb_team=None, wandb_host=None, wandb_dir=str(tmp_path),
    )  # fmt: skip
    return argparse.Namespace(**{**base, **over})


def test_wandb_team_and_host_reach_the_run(tmp_path):
    """slime's run scripts pass --wandb-team (the entity) and --wandb-host (the server): the
    wandb run is made under them; metrics go to the JSONL file as well."""
    pytest.importorskip("wandb")
    from slime.utils.metrics_logger import MetricsLogger

    m = MetricsLogger(_args(tmp_path, wandb_team="my-team", wandb_host="https://api.example.com"), str(tmp_path))
    try:
        assert m.wandb.entity == "my-team"
        assert m.wandb.settings.base_url == "https://api.example.com"
        m.log({"loss": 1.5}, step=3)
    finally:
        m.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line) == {"loss": 1.5, "global_step": 3}


def test_bad_wandb_host_names_the_flag(tmp_path):
    """wandb refuses https://wandb.ai as a server (its API is api.wandb.ai): said with the flag."""
    pytest.importorskip("wandb")
    from slime.utils.metrics_logger import MetricsLogger

    with pytest.raises(ValueError, match=r"--wandb-host https://wandb.ai/: .*not a valid server address"):
        MetricsLogger(_args(tmp_path, wandb_host="https://wandb.ai/"), str(tmp_path))
