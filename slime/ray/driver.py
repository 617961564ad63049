"""The driver side of train.py / train_async.py: start-up, per-rollout bookkeeping, shutdown.

`start_trainer` parses and checks the command line (before Ray starts), starts or joins Ray
(``RAY_ADDRESS`` / ``ray job submit`` join a cluster, a plain ``python train.py`` starts a local
one bound to 127.0.0.1), starts the inference engines of an RL run (`rollout_engines`), builds
the RolloutManager (data validated here) and the train group (weights from --load, else --ref-load, else --hf-checkpoint), and resumes the data
position and rollout id from --load. Everything is shut down on exit, errors included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "start_trainer"]

# Fault injection for resume tests: stop (as a crash would) right after saving this rollout.
STOP_AFTER_ENV = "SLIME_STOP_AFTER_ROLLOUT"


class Trainer:
    def __init__(self, args):
        import ray

        from slime.ray.colocate import OffloadArgs, Residency
        from slime.ray.placement_group import create_placement_group
        from slime.ray.rollout_manager import RolloutManager
        from slime.ray.train_group import RayTrainGroup
        from slime.utils.metrics_logger import MetricsLogger

        from slime.ray.rollout_engines import RolloutEngines, start_rollout_engines
        from slime.utils.arguments import data_parallel_size, global_batch_size, is_sft, starts_engines

        self.args, self.sft = args, is_sft(args)
        world = args.actor_num_nodes * args.actor_num_gpus_per_node
        dp = data_parallel_size(args)
        # The trainer's placement group first: with --colocate the engines share its GPU bundles.
        self.pg, use_gpu = (None, False)
        if not args.debug_rollout_only:
            self.pg, use_gpu = create_placement_group(args.actor_num_nodes, args.actor_num_gpus_per_node)
        self.engines = start_rollout_engines(args, placement_group=self.pg) if starts_engines(args) else RolloutEngines()
        # --colocate: which side holds the devices; each verb below asks for what it needs.
        self.residency = Residency(OffloadArgs.from_args(args), engines=self.engines.handles)
        self.residency.before_trainer_starts()
        self.manager = RolloutManager.remote(args, dp, self.engines.url)
        for line in ray.get(self.manager.report.remote()):
            logger.info(line)
        n = ray.get(self.manager.num_samples.remote())
        self.num_rollout = args.num_rollout or args.num_epoch * n // args.rollout_batch_size
        if self.num_rollout < 1:
            raise ValueError(f"{n} samples make no rollout of --rollout-batch-size {args.rollout_batch_size}")
        per_rollout = args.rollout_batch_size * args.n_samples_per_prompt
        total_steps = self.num_rollout * (per_rollout // global_batch_size(args))
        self.group, state = None, {}
        if args.debug_rollout_only:  # generation and rewards only: no trainer, no checkpoints
            logger.info("--debug-rollout-only: no train actors start; rollouts are generated, scored and logged")
        else:
            self.group = RayTrainGroup(args, self.pg, use_gpu, world)
            self.residency.group = self.group
            first = self.group.init(args, total_steps)[0]
            logger.info(first["attention"])
            state = first["state"]
        self.start_rollout = 0
        if state:
            self.start_rollout = state["rollout_id"] + 1
            ray.get(self.manager.load_state.remote(state["data_state"]))
            logger.info("resumed from %s at rollout %d", args.load, self.start_rollout)
        self.eval_names = ray.get(self.manager.eval_names.remote())
        self.metrics = MetricsLogger(args, args.save)
        self.step = int(state.get("step", 0)) if state else 0  # optimizer steps taken
        self.last_saved = None
        # The engines loaded --hf-checkpoint; the trainer may hold other weights (--load on a
        # resume, --ref-load): they generate with the trainer's from the first rollout on.
        self.update_weights()
        self._bar = None

    # ------------------------------------------------------------------ the loop's verbs
    def progress(self):
        from tqdm import tqdm

        self._bar = tqdm(range(self.start_rollout, self.num_rollout), initial=self.start_rollout, total=self.num_rollout, desc="rollouts", unit="rollout")
        return self._bar

    def generate_async(self, rollout_id: int):
        self.residency.for_generation()
        return self.manager.generate.remote(rollout_id)

    def wait(self, pending):
        import ray

        return ray.get(pending)

    def generate(self, rollout_id: int):
        return self.wait(self.generate_async(rollout_id))

    def train(self, rollout_id: int, data: dict) -> None:
        """Train on one rollout (``data`` from `generate`); logs its rollout metrics and each step's."""
        if data["metrics"]:
            self.metrics.log(dict(data["metrics"], rollout_id=rollout_id), step=self.step)
        if self.group is None:  # --debug-rollout-only
            return
        self.residency.for_training()
        for m in self.group.train(rollout_id, data["refs"]):
            self.metrics.log(m, step=m["step"])
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")
        self.step = m["step"]

    def update_weights(self, after=None) -> None:
        """RL: push the trained weights to the engines (nothing to do without engines).

        ``after``: a rollout still being generated (train_async.py's prefetch); the engines
        finish it with the old weights first, so it is one step stale, as in slime.
        """
        if not self.engines.handles or self.group is None:
            return
        import ray

        if after is not None:
            ray.wait([after], num_returns=1)
        self.residency.for_weight_sync()
        sync = self.group.update_weights(self.engines.handles, str(self.step), self.args.update_weight_buffer_size)
        metrics = {"weight_sync/seconds": sync["seconds"], "weight_sync/bytes": sync["bytes"], "weight_sync/buckets": sync["buckets"]}
        if self.residency.plan.active:
            metrics["colocate/switch_seconds_total"] = self.residency.seconds
        self.metrics.log(metrics, step=self.step)

    def save_if_due(self, rollout_id: int) -> None:
        """Checkpoint on ``--save-interval`` and after the last rollout. The loop saves before
        the weight sync, while (under --colocate) the trainer still holds the devices."""
        import ray

        args, last = self.args, rollout_id == self.num_rollout - 1
        if self.group is not None and args.save and ((args.save_interval and (rollout_id + 1) % args.save_interval == 0) or last):
            data_state = ray.get(self.manager.state_before.remote(rollout_id + 1))
            self.residency.for_training()  # the whole training state on the devices
            path = self.group.save(args.save, rollout_id, {"rollout_id": rollout_id, "data_state": data_state})
            self.last_saved = rollout_id
            logger.info("saved rollout %d to %s", rollout_id, path)
            if os.environ.get(STOP_AFTER_ENV) == str(rollout_id):
                raise SystemExit(f"{STOP_AFTER_ENV}={rollout_id}: stopping after the save (fault injection)")

    def _evaluates(self) -> bool:
        return bool(self.eval_names if self.sft else self.args.eval_prompt_data) and bool(self.args.eval_interval)

    def evaluate_before_training(self) -> None:
        """The starting model's eval metrics (logged at step 0, rollout_id 0), as slime does
        with --eval-interval; not on a resume, nor with --skip-eval-before-train."""
        if self._evaluates() and self.start_rollout == 0 and not self.args.skip_eval_before_train:
            self.evaluate(0)

    def evaluate_if_due(self, rollout_id: int) -> None:
        """Evaluate on ``--eval-interval`` and after the last rollout."""
        last = rollout_id == self.num_rollout - 1
        if self._evaluates() and ((rollout_id + 1) % self.args.eval_interval == 0 or last):
            self.evaluate(rollout_id)

    def evaluate(self, rollout_id: int) -> None:
        import ray

        if self.sft:
            results = {}
            for name in self.eval_names:
                refs = ray.get(self.manager.eval_data.remote(name))
                results[f"eval/{name}/loss"] = self.group.evaluate(refs)
        else:  # RL: generate on the eval prompts and score them (reward mean, truncation, ...)
            self.residency.for_generation()
            results = ray.get(self.manager.eval_rollout.remote(rollout_id))
        self.metrics.log(dict(results, rollout_id=rollout_id), step=self.step)
        logger.info("rollout %d: %s", rollout_id, results)

    def finish(self) -> None:
        if self.args.save_hf and self.group is not None:
            self.residency.for_training()  # the engines are done: the trainer gets the devices
            self.group.export_hf(self.args.save_hf, self.args.hf_checkpoint)
            logger.info("exported the final model to %s", self.args.save_hf)

    def close(self) -> None:
        import ray

        if self._bar is not None:
            self._bar.close()
        self.metrics.close()
        with contextlib.suppress(Exception):  # stops a data preparation still running (streamed start)
            ray.get(self.manager.close.remote(), timeout=90)
        if self.group is not None:
            with contextlib.suppress(Exception):
                self.group.shutdown()
        self.engines.shutdown()


def _ray_init(args) -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)  # ray job submit / an existing cluster
        return
    world = args.actor_num_nodes * args.actor_num_gpus_per_node
    ray.init(
        address="local",  # always a fresh private instance, never a stale /tmp/ray/ray_current_cluster
        num_cpus=max(os.cpu_count() or 1, world + 1),
        include_dashboard=False,
        logging_level=logging.WARNING,
        _node_ip_address="127.0.0.1",
    )


@contextlib.contextmanager
def start_trainer(argv: list[str] | None = None, overlap: bool = False):
    """Parse, check, start; yields a `Trainer`; always shuts Ray down. Errors exit with code 1.
    ``overlap``: the loop generates while it trains (train_async.py), checked against --colocate."""
    import ray

    from slime.utils.arguments import parse_args, validate_trainer_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    trainer = None
    try:
        validate_trainer_args(args, overlap=overlap)
        _ray_init(args)
        trainer = Trainer(args)
        yield trainer
    except (ValueError, FileNotFoundError, TimeoutError, ray.exceptions.RayError) as e:
        cause = getattr(e, "cause", None) or e
        if not isinstance(cause, (ValueError, FileNotFoundError, TimeoutError)):
            logger.error("%s", e)  # an unexpected failure inside an actor: keep its traceback
        print(f"error: {type(cause).__name__}: {cause}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if trainer is not None:
            trainer.close()
        if ray.is_initialized():
            ray.shutdown()
