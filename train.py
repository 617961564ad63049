"""Training (SFT or RL), synchronously: generate rollout k, train on it, repeat.

    python train.py --hf-checkpoint ... --prompt-data ... --rollout-batch-size 64 --num-epoch 1 ...

See train_async.py for the version that prepares rollout k+1 while training on rollout k.
"""

from slime.ray.driver import start_trainer


def train(trainer) -> None:
    trainer.evaluate_before_training()  # the starting point (--skip-eval-before-train skips it)
    for rollout_id in trainer.progress():
        data = trainer.generate(rollout_id)
        trainer.train(rollout_id, data)
        trainer.save_if_due(rollout_id)  # on --save-interval and at the end
        trainer.update_weights()  # RL: the engines get the new policy (SFT starts none)
        trainer.evaluate_if_due(rollout_id)  # on --eval-interval and at the end
    trainer.finish()  # HF export


if __name__ == "__main__":
    with start_trainer() as t:
        train(t)
