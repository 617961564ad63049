"""The reward argument group (slime's flag names) and its typed view."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = ["RewardConfig", "add_reward_arguments"]


def add_reward_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from slime.rollout.rm_hub import RM_TYPES

    g = parser.add_argument_group("rewards")
    g.add_argument(
        "--rm-type",
        default=None,
        help=f"built-in reward: {', '.join(RM_TYPES)} (boxed_<type> grades the last \\boxed{{}})",
    )
    g.add_argument(
        "--rm-url", default=None, help="reward model server for --rm-type remote_rm (POST {prompt, response, label})"
    )
    g.add_argument(
        "--custom-rm-path",
        "--reward-fn-path",
        dest="custom_rm_path",
        default=None,
        help="async def reward(args, sample, **kwargs) -> float | dict (pkg.mod.fn or pkg.mod:fn)",
    )
    g.add_argument(
        "--group-rm", action="store_true", help="call --custom-rm-path once per group: reward(args, samples) -> list"
    )
    g.add_argument(
        "--reward-key", default=None, help="field of dict rewards used as the scalar reward (e.g. 'score' for dapo)"
    )
    g.add_argument("--eval-reward-key", default=None, help="as --reward-key for eval (default: --reward-key)")
    return parser


@dataclass(frozen=True)
class RewardConfig:
    """Which reward scores a sample; checked at start-up so a typo fails before generation."""

    rm_type: str | None = None
    rm_url: str | None = None
    custom_rm_path: str | None = None
    group_rm: bool = False
    reward_key: str | None = None
    eval_reward_key: str | None = None

    def __post_init__(self):
        from slime.rollout.plugin_contracts import load_reward_function
        from slime.rollout.rm_hub import RM_TYPES

        if self.custom_rm_path:
            load_reward_function(self.custom_rm_path, self.group_rm)  # signature checked now
        elif self.group_rm:
            raise ValueError("--group-rm needs --custom-rm-path (a function scoring a whole group)")
        elif self.rm_type:
            base = self.rm_type[len("boxed_") :] if self.rm_type.startswith("boxed_") else self.rm_type
            if base not in RM_TYPES:
                raise ValueError(
                    f"--rm-type {self.rm_type!r}: choose one of {', '.join(RM_TYPES)} (optionally boxed_<type>)"
                )
            if base == "remote_rm" and not self.rm_url:
                raise ValueError("--rm-type remote_rm needs --rm-url")
        if self.rm_type == "dapo" and not self.reward_key:
            raise ValueError("--rm-type dapo returns {score, acc, pred}: add --reward-key score")

    @classmethod
    def from_args(cls, args) -> "RewardConfig":
        return cls(
            rm_type=args.rm_type,
            rm_url=args.rm_url,
            custom_rm_path=args.custom_rm_path,
            group_rm=bool(args.group_rm),
            reward_key=args.reward_key,
            eval_reward_key=args.eval_reward_key,
        )
