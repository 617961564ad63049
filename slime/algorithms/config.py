"""The RL algorithm flags (slime's names and defaults) and their typed, checked group.

``add_algorithm_arguments(parser)`` registers them; ``AlgorithmConfig.from_args(args)`` builds
the frozen group the loss and the advantage code read. Attribute names equal the argparse
destinations (``eps_clip``, ``kl_coef``, ``grpo_std_normalization``...), so a slime
``--custom-advantage-function-path`` plugin that reads ``args.<name>`` gets the config itself.

Flags another group already owns are not registered here: ``--loss-type``,
``--custom-loss-function-path``, ``--calculate-per-token-loss`` (Megatron training group),
``--n-samples-per-prompt``, ``--rollout-batch-size`` and ``--global-batch-size``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_TYPES",
    "AlgorithmConfig",
    "add_algorithm_arguments",
    "derive_global_batch_size",
]

ADVANTAGE_ESTIMATORS = ("grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
KL_TYPES = ("k1", "k2", "k3", "low_var_kl")
# Estimators whose per-sample reward is normalized within its prompt group before use.
GROUP_MEAN_ESTIMATORS = ("grpo", "gspo", "reinforce_plus_plus_baseline")
GROUP_STD_ESTIMATORS = ("grpo", "gspo")


def add_algorithm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("RL algorithm")
    g.add_argument(
        "--advantage-estimator",
        choices=(*ADVANTAGE_ESTIMATORS, "ppo"),
        default="grpo",
        help="grpo | gspo (sequence-level ratio) | reinforce_plus_plus | reinforce_plus_plus_baseline; "
        "ppo needs a critic, which is not built (refused)",
    )
    g.add_argument("--eps-clip", type=float, default=0.2, help="PPO ratio kept in [1 - eps-clip, 1 + eps-clip-high]")
    g.add_argument("--eps-clip-high", type=float, default=None, help="upper clip (DAPO clip-higher); default: eps-clip")
    g.add_argument("--eps-clip-c", type=float, default=None, help="dual clip (> 1): loss at A < 0 capped at -c * A")
    g.add_argument("--use-kl-loss", action="store_true", help="add kl(actor || reference) to the loss (GRPO's KL term)")
    g.add_argument("--kl-loss-coef", type=float, default=0.0, help="weight of the KL loss term (needs --use-kl-loss)")
    g.add_argument("--kl-loss-type", choices=KL_TYPES, default="k1", help="KL estimator for the loss and for --kl-coef")
    g.add_argument(
        "--kl-coef",
        type=float,
        default=0.0,
        help="KL reward shaping (reinforce_plus_plus*): reward - kl_coef * kl before advantages",
    )
    g.add_argument("--entropy-coef", type=float, default=0.0, help="loss -= entropy_coef * mean token entropy")
    g.add_argument("--gamma", type=float, default=1.0, help="discount of reinforce_plus_plus returns")
    g.add_argument("--normalize-advantages", action="store_true", help="whiten advantages over the rollout's tokens")
    g.add_argument(
        "--disable-grpo-std-normalization",
        action="store_false",
        dest="grpo_std_normalization",
        help="Dr. GRPO: subtract the group mean reward but do not divide by its std",
    )
    g.add_argument(
        "--disable-rewards-normalization",
        action="store_false",
        dest="rewards_normalization",
        help="use raw rewards (no per-prompt-group mean/std normalization)",
    )
    g.add_argument(
        "--custom-advantage-function-path",
        default=None,
        help="fn(args, rollout_data) -> None; sets rollout_data['advantages'] (per-sample token lists)",
    )
    g.add_argument(
        "--use-rollout-logprobs",
        action="store_true",
        help="use the engine's log-probs as the old policy (no recompute by the actor)",
    )
    g.add_argument("--use-tis", action="store_true", help="truncated importance sampling for engine/trainer mismatch")
    g.add_argument("--tis-clip", type=float, default=2.0, help="upper bound of the TIS weight exp(old - rollout)")
    g.add_argument("--tis-clip-low", type=float, default=0.0, help="lower bound of the TIS weight")
    g.add_argument(
        "--num-steps-per-rollout",
        type=int,
        default=None,
        help="optimizer steps per rollout: global batch = rollout_batch_size * n_samples_per_prompt / this",
    )
    return parser


@dataclass(frozen=True)
class AlgorithmConfig:
    """How rewards become advantages and log-probs become the policy loss.

    advantage_estimator: grpo | gspo | reinforce_plus_plus | reinforce_plus_plus_baseline.
    eps_clip / eps_clip_high: the ratio is clipped to [1 - eps_clip, 1 + eps_clip_high]
    (``eps_clip_high`` None means symmetric). eps_clip_c: dual-clip bound (> 1) or None.
    use_kl_loss / kl_loss_coef / kl_loss_type: KL(actor, reference) term of the loss.
    kl_coef: KL reward shaping before advantages (reinforce_plus_plus* only).
    entropy_coef: entropy bonus weight. gamma: reinforce_plus_plus discount.
    normalize_advantages: masked whitening over all response tokens of the rollout.
    rewards_normalization / grpo_std_normalization: per-prompt-group reward mean (and std).
    custom_advantage_function_path: slime-style plugin replacing the estimator.
    use_rollout_logprobs: the engine's log-probs are the old policy.
    use_tis / tis_clip / tis_clip_low: truncated importance weight clamp(exp(old - rollout)).
    num_steps_per_rollout: optimizer steps per rollout (see `derive_global_batch_size`).
    """

    advantage_estimator: str = "grpo"
    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    eps_clip_c: float | None = None
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.0
    kl_loss_type: str = "k1"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    gamma: float = 1.0
    normalize_advantages: bool = False
    grpo_std_normalization: bool = True
    rewards_normalization: bool = True
    custom_advantage_function_path: str | None = None
    use_rollout_logprobs: bool = False
    use_tis: bool = False
    tis_clip: float = 2.0
    tis_clip_low: float = 0.0
    num_steps_per_rollout: int | None = None

    def __post_init__(self):
        if self.advantage_estimator == "ppo":
            raise ValueError(
                "--advantage-estimator ppo needs a critic (value model), which this trainer does not build; "
                "use grpo, gspo, reinforce_plus_plus or reinforce_plus_plus_baseline"
            )
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"--advantage-estimator {self.advantage_estimator!r} is not one of {ADVANTAGE_ESTIMATORS}")
        if not 0 <= self.eps_clip < 1:
            raise ValueError(f"--eps-clip must be in [0, 1), got {self.eps_clip}")
        if self.eps_clip_high is not None and self.eps_clip_high < 0:
            raise ValueError(f"--eps-clip-high must be >= 0, got {self.eps_clip_high}")
        if self.eps_clip_c is not None and self.eps_clip_c <= 1:
            raise ValueError(f"--eps-clip-c (dual clip) must be > 1, got {self.eps_clip_c}")
        if self.kl_loss_type not in KL_TYPES:
            raise ValueError(f"--kl-loss-type must be one of {KL_TYPES}, got {self.kl_loss_type!r}")
        if self.kl_loss_coef and not self.use_kl_loss:
            raise ValueError("--kl-loss-coef has no effect without --use-kl-loss; add --use-kl-loss or drop it")
        if self.kl_coef and self.kl_loss_coef:
            raise ValueError("set only one of --kl-coef (reward shaping) and --kl-loss-coef (loss term)")
        if self.kl_coef and self.advantage_estimator in ("grpo", "gspo"):
            raise ValueError(
                f"--kl-coef shapes rewards for reinforce_plus_plus* only; with {self.advantage_estimator} "
                "use --use-kl-loss --kl-loss-coef"
            )
        if self.advantage_estimator.startswith("reinforce_plus_plus") and not self.normalize_advantages:
            raise ValueError(f"--advantage-estimator {self.advantage_estimator} needs --normalize-advantages")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"--gamma must be in (0, 1], got {self.gamma}")
        if self.use_tis and self.use_rollout_logprobs:
            raise ValueError(
                "--use-tis corrects trainer log-probs towards the engine's; with --use-rollout-logprobs the engine's "
                "already are the old policy: choose one"
            )
        if not 0 <= self.tis_clip_low <= self.tis_clip:
            raise ValueError(f"need 0 <= --tis-clip-low ({self.tis_clip_low}) <= --tis-clip ({self.tis_clip})")
        if self.num_steps_per_rollout is not None and self.num_steps_per_rollout < 1:
            raise ValueError(f"--num-steps-per-rollout must be >= 1, got {self.num_steps_per_rollout}")

    @property
    def clip_high(self) -> float:
        """The upper clip offset actually used (``eps_clip`` when ``--eps-clip-high`` is unset)."""
        return self.eps_clip if self.eps_clip_high is None else self.eps_clip_high

    @property
    def needs_ref_log_probs(self) -> bool:
        """Whether the reference model's log-probs must be computed before training."""
        return self.use_kl_loss or self.kl_coef != 0

    @property
    def needs_old_log_probs(self) -> bool:
        """Whether the actor recomputes the old policy's log-probs (else the engine's are used)."""
        return not self.use_rollout_logprobs

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AlgorithmConfig":
        names = cls.__dataclass_fields__
        values = {name: getattr(args, name) for name in names if hasattr(args, name)}
        # One sample per prompt has no group std (slime turns it off the same way).
        if getattr(args, "n_samples_per_prompt", None) == 1 and values.get("grpo_std_normalization", True):
            logger.info("--n-samples-per-prompt 1: no group std to divide by, GRPO std normalization is off")
            values["grpo_std_normalization"] = False
        return cls(**values)


def derive_global_batch_size(
    rollout_batch_size: int, n_samples_per_prompt: int, global_batch_size: int | None, num_steps_per_rollout: int | None
) -> int:
    """slime's rule: rollout_batch_size * n_samples_per_prompt = global_batch_size * num_steps_per_rollout.

    The global batch (samples per optimizer step) is derived when unset (one step per rollout
    without --num-steps-per-rollout) and checked when set.
    """
    per_rollout = rollout_batch_size * n_samples_per_prompt
    if num_steps_per_rollout is not None:
        if per_rollout % num_steps_per_rollout:
            raise ValueError(
                f"--rollout-batch-size {rollout_batch_size} x --n-samples-per-prompt {n_samples_per_prompt} = "
                f"{per_rollout} samples do not split into --num-steps-per-rollout {num_steps_per_rollout} equal steps"
            )
        derived = per_rollout // num_steps_per_rollout
        if global_batch_size is not None and global_batch_size != derived:
            raise ValueError(
                f"--global-batch-size {global_batch_size} contradicts --num-steps-per-rollout {num_steps_per_rollout}: "
                f"{rollout_batch_size} x {n_samples_per_prompt} / {num_steps_per_rollout} = {derived}"
            )
        return derived
    if global_batch_size is None:
        return per_rollout
    if global_batch_size < 1 or per_rollout % global_batch_size:
        raise ValueError(
            f"--global-batch-size {global_batch_size} must divide --rollout-batch-size {rollout_batch_size} x "
            f"--n-samples-per-prompt {n_samples_per_prompt} = {per_rollout}"
        )
    return global_batch_size
