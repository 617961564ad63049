"""Rollout functions (``--rollout-function-path``) and what they share.

The two built-in paths are named here, in a module with no imports, so the argument modules
of every part (trainer, Megatron, rollout) can tell an SFT run from an RL run without
importing each other.
"""

# slime's default: RL rollouts through an inference engine.
DEFAULT_ROLLOUT_FUNCTION = "slime.rollout.sglang_rollout.generate_rollout"
# Prepared chat samples with loss masks; no engine.
SFT_ROLLOUT_FUNCTION = "slime.rollout.sft_rollout.generate_rollout"
