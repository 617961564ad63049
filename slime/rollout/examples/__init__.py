"""Runnable example plugins for the RL rollout (see docs/rl.md)."""
