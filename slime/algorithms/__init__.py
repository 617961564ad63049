"""RL algorithm math in plain torch (no Megatron, no Ray): advantage estimators and reward
normalization (`advantages`), KL estimators (`kl`), the clipped policy objective with entropy,
KL loss and truncated importance sampling (`policy`), and the flags of all of it (`config`).

The Megatron actor applies `policy.policy_objective` on its packed micro-batches
(`slime.backends.megatron_utils.loss.policy_loss`); the rollout side applies
`advantages.post_process_rewards`; the train side `advantages.compute_advantages`.
"""
