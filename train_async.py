"""Training (SFT or RL) with the next rollout prepared while the current one trains.

Same as train.py, except that rollout k+1 is generated while rollout k trains. Checkpoints
record the data position before the prefetched rollout, so a resumed run neither skips nor
repeats it.
"""

from slime.ray.driver import start_trainer


def train(trainer) -> None:
    trainer.evaluate_before_training()  # the starting point (--skip-eval-before-train skips it)
    pending = trainer.generate_async(trainer.start_rollout)
    for rollout_id in trainer.progress():
        data = trainer.wait(pending)
        if rollout_id + 1 < trainer.num_rollout:
            pending = trainer.generate_async(rollout_id + 1)  # overlaps with the training below
        trainer.train(rollout_id, data)
        trainer.save_if_due(rollout_id)  # on --save-interval and at the end
        trainer.update_weights(after=pending)  # RL: once the prefetched rollout is generated (one step stale)
        trainer.evaluate_if_due(rollout_id)  # on --eval-interval and at the end
    trainer.finish()  # HF export


if __name__ == "__main__":
    with start_trainer(overlap=True) as t:
        train(t)
