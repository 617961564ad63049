"""Training (SFT or RL) with the next rollout prepared while the current one trains.

Same as train.py, except that rollout k+1 is generated while rollout k trains. Checkpoints
record the data position before the prefetched rollout, so a resumed run neither skips nor
repeats it.
"""

from slime.ray.driver import start_trainer


def train(trainer) -> None:
    pending = trainer.generate_async(trainer.start_rollout)
    for rollout_id in trainer.progress():
        data = trainer.wait(pending)
        if rollout_id + 1 < trainer.num_rollout:
            pending = trainer.generate_async(rollout_id + 1)  # overlaps with the training below
        trainer.train(rollout_id, data)
        trainer.update_weights(after=pending)  # RL: once the prefetched rollout is generated (one step stale)
        trainer.after_rollout(rollout_id)  # evaluate / save on their intervals
    trainer.finish()  # HF export


if __name__ == "__main__":
    with start_trainer() as t:
        train(t)
