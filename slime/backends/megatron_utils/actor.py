"""The Megatron training actor of one rank: model, DDP, optimizer, the train step and a rollout.

One code path for CPU (gloo, fp32) and GPU (nccl, bf16, distributed optimizer). It takes
this rank's samples as plain dicts (``tokens``, ``loss_mask``, ``response_length``; RL adds
``reward`` and ``rollout_log_probs``), so it runs the same under Ray (one actor per rank),
torchrun, or a single test process. RL pieces live in their own modules: `rl_step` (the
order of one rollout), `ref_model` (reference weights), `weight_sync` (HF buckets for engines).

The model is a list of DDP-wrapped chunks (``self.chunks``): one, or with virtual pipeline
stages one per stage of this pipeline rank (`pipeline`), all under one optimizer. Weights and
gradients by name (`megatron_state`, `gradients`, `load_state`) use the chunk's own names
with one chunk, and with several the names of `pipeline.join_chunks` (layers under their
global index), since the chunks' local layer numbers collide.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

from slime.backends.megatron_utils import pipeline
from slime.backends.megatron_utils.batching import BatchingArgs, MicroBatch, make_micro_batches
from slime.backends.megatron_utils.lean_ce import CrossEntropyConfig
from slime.backends.megatron_utils.loss import LOSSES, LossContext, resolve_loss
from slime.backends.megatron_utils.model_config import ModelArgs
from slime.backends.megatron_utils.model_provider import ModelBuildArgs, build_gpt_chunks
from slime.backends.megatron_utils.offload import TrainerOffload
from slime.backends.megatron_utils.optimizer import OptimizerArgs, build_optimizer
from slime.backends.megatron_utils.output_head import OutputHead
from slime.backends.megatron_utils.parallel import init_parallel
from slime.backends.megatron_utils.throughput import ThroughputConfig, train_flops

if TYPE_CHECKING:
    from slime.algorithms.config import AlgorithmConfig

logger = logging.getLogger(__name__)

__all__ = ["MegatronActor", "TrainArgs"]


@dataclass(frozen=True)
class TrainArgs:
    """Step-level settings.

    global_batch_size: samples per optimizer step over all DP ranks.
    total_steps: optimizer steps of the whole run (for the LR schedule).
    loss_type / custom_loss_function_path: `loss.resolve_loss`.
    """

    global_batch_size: int
    total_steps: int
    seed: int = 1234
    loss_type: str = "sft_loss"
    custom_loss_function_path: str | None = None

    def __post_init__(self):
        if self.global_batch_size < 1:
            raise ValueError("--global-batch-size must be >= 1")
        if self.total_steps < 1:
            raise ValueError("the run needs at least one optimizer step")


class MegatronActor:
    """One rank of the trainer. ``train_step(samples)`` = one optimizer step on this rank's share."""

    def __init__(
        self,
        model: ModelArgs,
        build: ModelBuildArgs,
        batching: BatchingArgs,
        optim: OptimizerArgs,
        train: TrainArgs,
        algorithm: "AlgorithmConfig | None" = None,
        cross_entropy: CrossEntropyConfig | None = None,
        throughput: ThroughputConfig | None = None,
    ):
        """``algorithm``: the RL flags read by policy_loss (slime's defaults when None);
        ``cross_entropy``: the memory-lean output layer (`lean_ce`, on by default);
        ``throughput``: the peak FLOP/s for MFU (`throughput`)."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

        self.model_args, self.build_args, self.batching, self.train_args = model, build, batching, train
        self.optim_args = optim
        self.loss_fn = resolve_loss(train.loss_type, train.custom_loss_function_path)
        self.cross_entropy = cross_entropy or CrossEntropyConfig()
        self.throughput = throughput or ThroughputConfig()
        from slime.backends.megatron_utils.expert_parallel import MicroBatchAlignment, check_expert_layout

        check_expert_layout(model, build)
        self.alignment = MicroBatchAlignment.for_layout(model, build)  # EP / sequence-parallel padding
        if build.deterministic_mode:  # before any CUDA work (cuBLAS reads its workspace setting once)
            from slime.backends.megatron_utils.parallel import use_deterministic_algorithms

            use_deterministic_algorithms()
        self.info = init_parallel(build.layout, seed=train.seed)
        if train.global_batch_size % self.info.dp_size:
            raise ValueError(f"--global-batch-size {train.global_batch_size} is not divisible by DP size {self.info.dp_size}")
        if self.info.cp_size > 1:
            from slime.backends.megatron_utils.arguments import check_context_parallel

            check_context_parallel(self.info.cp_size, batching.qkv_format)
            if build.attention_backend != "sdpa":
                logger.info("CP: --attention-backend %s runs the masked all-gather attention", build.attention_backend)
        cuda = torch.cuda.is_available()
        if build.bf16 and not cuda:
            raise ValueError("--bf16 needs CUDA; CPU runs train in fp32")
        if build.attention_backend in ("flex", "varlen") and not cuda:
            raise ValueError(f"--attention-backend {build.attention_backend} trains on CUDA only; use sdpa on CPU")
        # Lean loss: the model stops before the output layer; the loss applies it chunk by chunk.
        modules = build_gpt_chunks(model, build, output_head=self.cross_entropy.lean)
        config = self.config = modules[0].config  # shared by the chunks
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=build.grad_reduce_in_fp32,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cuda,
        )
        self.chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=m) for m in modules]
        self._vp_stages = pipeline.chunk_stages(len(self.chunks))
        self._layer_ranges = [pipeline.layer_range(config, vp) for vp in self._vp_stages]
        # One module holding every chunk, for what walks parameters by name (reference weights,
        # MoE router statistics); the chunk itself with one, so names are unchanged there.
        self._tree = modules[0] if len(modules) == 1 else torch.nn.ModuleList(modules)
        # The interleaved schedule takes one no_sync per chunk.
        config.no_sync_func = self.chunks[0].no_sync if len(self.chunks) == 1 else [c.no_sync for c in self.chunks]
        # The schedule passes every chunk: DP sums per chunk, tied-embedding sum over first/last.
        config.finalize_model_grads_func = lambda models, num_tokens=None, **kw: finalize_model_grads(models, None)
        self.optimizer, self.scheduler = build_optimizer(self.chunks, optim, train.total_steps, build.bf16, distributed=cuda)
        padded = model.padded_vocab_size(build.tensor_model_parallel_size)
        if algorithm is None and train.loss_type == "policy_loss":
            from slime.algorithms.config import AlgorithmConfig

            algorithm = AlgorithmConfig()
        self.padded_vocab_size = padded
        self.loss_ctx = LossContext(
            vocab_size=model.vocab_size,
            vocab_start=self.info.tp_rank * padded // self.info.tp_size,
            algorithm=algorithm,
            chunk_tokens=self.cross_entropy.chunk_tokens,
            segment_reduce=self._cp_sum() if self.info.cp_size > 1 else None,
        )
        self.peak_flops = self.throughput.peak_flops(build.bf16)
        self.step = 0
        self.ref = None  # ReferenceWeights, set by the initial-weight loaders when a KL term needs it
        self._offload = TrainerOffload()  # --offload-train: the state leaves the device while engines generate

    @property
    def model(self):
        """The DDP-wrapped model when this rank has one chunk (no virtual pipeline stages)."""
        if len(self.chunks) != 1:
            raise RuntimeError(f"this rank holds {len(self.chunks)} model chunks (virtual pipeline stages): use .chunks")
        return self.chunks[0]

    def _split(self, named: dict) -> list[dict]:
        """This rank's tensors by name (see the module docstring) as one dict per chunk."""
        return [named] if len(self.chunks) == 1 else pipeline.split_chunks(named, self._layer_ranges)

    def _join(self, per_chunk: list[dict]) -> dict:
        """The inverse of `_split`."""
        return per_chunk[0] if len(per_chunk) == 1 else pipeline.join_chunks(per_chunk, [r[0] for r in self._layer_ranges])

    @staticmethod
    def _cp_sum():
        from megatron.core import parallel_state as ps

        from slime.backends.megatron_utils.context_parallel import cp_sum

        return partial(cp_sum, group=ps.get_context_parallel_group())

    # ----------------------------------------------------------------- weights
    def load_hf(self, hf_dir: str) -> None:
        """Initial weights from a HF checkpoint, converted in memory for this TP rank and its
        experts (and, when a KL term needs one, the reference copy)."""
        from slime.backends.megatron_utils.expert_parallel import placement
        from slime.backends.megatron_utils.hf_weights import hf_to_mcore, load_hf_state_dict

        state = load_hf_state_dict(hf_dir)
        shards = hf_to_mcore(state, self.model_args, self.info.tp_rank, self.info.tp_size, placement())
        if self.info.pp_size > 1:  # each chunk's layers, renamed to local indices
            per_chunk = [pipeline.to_stage(shards, self.config, self._tied, vp) for vp in self._vp_stages]
        else:
            per_chunk = [shards]
        self._load_chunks(per_chunk)
        self._capture_reference(f"hf:{hf_dir}")

    def load_dist(self, path: str) -> str:
        """Initial weights from a torch_dist checkpoint (any TP size it was saved at); also the
        reference copy when a KL term needs one."""
        from slime.backends.megatron_utils.checkpoint import load_model_weights

        source = load_model_weights([c.module for c in self.chunks], path)
        self._refresh_main_params()
        self._capture_reference(f"torch_dist:{source}")
        return source

    @property
    def _tied(self) -> bool:
        return not self.model_args.untie_embeddings_and_output_weights

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs (--use-kl-loss / --kl-coef with an RL loss)."""
        cfg, args = self.loss_ctx.algorithm, self.train_args
        rl_loss = args.loss_type == "policy_loss" or bool(args.custom_loss_function_path)
        return cfg is not None and cfg.needs_ref_log_probs and rl_loss

    def _capture_reference(self, source: str) -> None:
        if self.needs_reference:
            from slime.backends.megatron_utils.ref_model import ReferenceWeights

            self.ref = ReferenceWeights(self._tree, source)

    def _refresh_main_params(self) -> None:
        # megatron's optimizer keeps fp32 main params for bf16 models: refresh them too.
        reload = getattr(self.optimizer, "reload_model_params", None)
        if reload is not None:
            reload()

    def load_state(self, shards: dict[str, torch.Tensor]) -> None:
        """This rank's weights by name (what `megatron_state` returns)."""
        self._load_chunks(self._split(shards))

    def _chunk_weights(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v for k, v in c.module.state_dict().items() if not k.endswith("_extra_state")} for c in self.chunks]

    def _load_chunks(self, per_chunk: list[dict[str, torch.Tensor]]) -> None:
        owns = self._chunk_weights()
        for i, (own, shards) in enumerate(zip(owns, per_chunk, strict=True)):
            missing, unexpected = sorted(set(own) - set(shards)), sorted(set(shards) - set(own))
            if missing or unexpected:
                where = f" (model chunk {i})" if len(owns) > 1 else ""
                raise ValueError(f"weights do not match the model{where}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for own, shards in zip(owns, per_chunk):
                for name, tensor in shards.items():
                    if own[name].shape != tensor.shape:
                        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(own[name].shape)}")
                    own[name].copy_(tensor)
        self._refresh_main_params()

    # ----------------------------------------------------------------- colocate
    def offload(self, keep_weights: bool = False) -> int:
        """--offload-train: release this rank's training state from its device (bytes released);
        ``keep_weights``: all but the weights (a weight sync can still read them)."""
        return self._offload.offload(self.chunks, self.optimizer, keep_weights=keep_weights)

    def check_weights_resident(self, what: str) -> None:
        self._offload.check_resident(what, weights_only=True)

    def onload(self) -> int:
        """Bring the offloaded state back, bit-exact (bytes restored; 0 when resident)."""
        return self._offload.onload()

    def megatron_state(self) -> dict[str, torch.Tensor]:
        """This rank's weights by name (CPU copies; see the module docstring for the names)."""
        self.check_weights_resident("reading the weights")
        return {k: v.detach().cpu() for k, v in self.named_weights().items()}

    def named_weights(self) -> dict[str, torch.Tensor]:
        """`megatron_state`'s names over the live tensors (no copy)."""
        return self._join(self._chunk_weights())

    # ----------------------------------------------------------------- training
    def _global_counts(self, samples: list[dict]) -> tuple[int, int]:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        local = torch.tensor(
            [sum(sum(s["loss_mask"]) for s in samples), len(samples)], dtype=torch.int64, device=self.info.device
        )
        dist.all_reduce(local, group=ps.get_data_parallel_group())
        return int(local[0]), int(local[1])

    @staticmethod
    def _logits(model, mb: MicroBatch) -> "torch.Tensor | OutputHead":
        """This TP rank's vocabulary slice of the logits of one micro-batch, or with the lean
        loss the `OutputHead` they would be computed from."""
        from megatron.core.packed_seq_params import PackedSeqParams

        psp = None
        if mb.cu_seqlens is not None:
            psp = PackedSeqParams(
                qkv_format="thd",
                cu_seqlens_q=mb.cu_seqlens,
                cu_seqlens_kv=mb.cu_seqlens,
                max_seqlen_q=mb.max_seqlen,
                max_seqlen_kv=mb.max_seqlen,
            )
        # Padding (EP alignment, sequence parallelism) is masked out of MoE routing statistics.
        extra = {}
        if mb.padding_mask is not None:
            from slime.backends.megatron_utils.moe_layers import stage_padding_mask

            extra["padding_mask"] = stage_padding_mask(model, mb.padding_mask)
        return model(mb.tokens, mb.position_ids, attention_mask=None, packed_seq_params=psp, **extra)

    def _loss(self, mb: MicroBatch, output):
        if isinstance(output, OutputHead) and self.loss_fn not in LOSSES.values():
            output = output.logits()  # custom losses keep their (logits, batch, ctx) contract
        loss, metrics = self.loss_fn(output, mb, self.loss_ctx)
        n = torch.tensor(mb.supervised_tokens, dtype=torch.int, device=loss.device)
        return loss, n, metrics

    def _micro_batches(self, samples: list[dict], batching: BatchingArgs) -> tuple[list[MicroBatch], int]:
        self._offload.check_resident("a forward pass")
        global_sup, global_samples = self._global_counts(samples)
        cp = self.info.cp_size
        if cp > 1:  # the CP ranks share N x --max-tokens-per-gpu; each keeps its zigzag share
            from slime.backends.megatron_utils.context_parallel import cp_batching, split_micro_batch

            remake = partial(make_micro_batches, samples, cp_batching(batching, cp), global_sup, global_samples)
            mbs = self.alignment.match_counts(remake(), remake)  # before the split: the CP ranks count alike
            mbs = [split_micro_batch(mb, cp, self.info.cp_rank, self.alignment.multiple) for mb in mbs]
        else:
            mbs = make_micro_batches(samples, batching, global_sup, global_samples)
            mbs = self.alignment.align(mbs, partial(make_micro_batches, samples, batching, global_sup, global_samples))
        pipeline.check_micro_batch_count(len(mbs))
        return [mb.to(self.info.device) for mb in mbs], global_sup

    def _run_schedule(self, mbs: list[MicroBatch], forward_only: bool, loss_func=None) -> list[dict]:
        """megatron-core's forward/backward schedule over the micro-batches (pipelined under PP:
        the loss dicts of the last stage are then broadcast to every stage). ``loss_func(mb,
        output)`` replaces the training loss (forward-only scoring)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb: MicroBatch = next(data_iterator)
            return self._logits(model, mb), partial(loss_func or self._loss, mb)

        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(mbs) for _ in self.chunks],  # every chunk runs every micro-batch
            model=self.chunks,
            num_microbatches=len(mbs),
            seq_length=max(mb.tokens.shape[-1] for mb in mbs),
            micro_batch_size=1,
            forward_only=forward_only,
        )
        return pipeline.broadcast_from_last_stage(losses)

    def _forward_backward(self, samples: list[dict]):
        """Forward and backward over this rank's micro-batches; grads end up DP-summed."""
        mbs, global_sup = self._micro_batches(samples, self.batching)
        if not mbs:
            raise ValueError(f"rank {self.info.rank} got no samples for this step")
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.model_args.is_moe:  # this step's router statistics only (see moe_step_metrics)
            from slime.backends.megatron_utils.moe_layers import reset_moe_stats

            reset_moe_stats(self._tree)
        return self._run_schedule(mbs, forward_only=False), mbs, global_sup

    def gradients(self, samples: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
        """(global loss, this TP rank's gradients by parameter name) without an optimizer step."""
        losses, _, _ = self._forward_backward(samples)
        grads = self._join(
            [{name: p.main_grad.detach().float().cpu().clone() for name, p in c.module.named_parameters()} for c in self.chunks]
        )
        return self._dp_sum([float(sum(d["loss"] for d in losses))])[0], grads

    def _dp_sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        # With context parallel: each CP rank's loss terms are its own tokens' (global weights).
        t = torch.tensor(values, dtype=torch.float64, device=self.info.device)
        dist.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
        return t.tolist()

    def train_step(self, samples: list[dict]) -> dict[str, float]:
        """One optimizer step on this rank's samples of the global batch; returns global metrics."""
        start = time.perf_counter()
        losses, mbs, global_sup = self._forward_backward(samples)
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step applies
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
        self.step += 1
        # Loss metrics are weighted sums (global denominators baked in): summing them over
        # micro-batches and DP ranks gives the global means.
        keys = sorted({k for d in losses for k in d})
        per_key = [float(sum(d.get(k, 0.0) for d in losses)) for k in keys]
        # Every CP rank holds the same samples: each counts 1/N of their FLOPs.
        flops = train_flops(self.model_args, [len(s["tokens"]) for s in samples], self.padded_vocab_size) / self.info.cp_size
        sums = self._dp_sum(per_key + [sum(mb.real_tokens for mb in mbs), sum(mb.capacity for mb in mbs), flops])
        loss_metrics, (real, capacity, flops) = dict(zip(keys, sums[: len(keys)])), sums[len(keys) :]
        moe_metrics = {}
        if self.model_args.is_moe:  # router load and the load-balancing loss (a DP collective)
            from slime.backends.megatron_utils.moe_layers import moe_step_metrics

            moe_metrics = moe_step_metrics(self._tree, len(mbs))
        elapsed = time.perf_counter() - start
        return {
            **self._throughput(real, flops, elapsed),
            **loss_metrics,
            **moe_metrics,
            "step": self.step,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "supervised_tokens": global_sup,
            "total_tokens": int(real),
            "tokens_per_s": real / elapsed,
            "packing_efficiency": real / capacity if capacity else 1.0,
            "step_time_s": elapsed,
            "micro_batches": len(mbs),
            "update_successful": bool(update_ok),
        }

    def _eval(self) -> None:
        for chunk in self.chunks:
            chunk.eval()

    def _throughput(self, tokens: float, flops: float, elapsed: float) -> dict[str, float]:
        """Per-device rates of one step over all ranks (DP x TP); MFU only with a known peak."""
        import torch.distributed as dist

        gpus = dist.get_world_size()
        out = {
            "tokens_per_s_per_gpu": tokens / elapsed / gpus,
            "model_tflops_per_s_per_gpu": flops / elapsed / gpus / 1e12,
        }
        if self.peak_flops:
            out["mfu_percent"] = 100.0 * flops / elapsed / gpus / self.peak_flops
        return out

    # ----------------------------------------------------------------- checkpoints
    def save(self, root: str, iteration: int, extra: dict) -> str:
        from slime.backends.megatron_utils.checkpoint import save_training_state

        self._offload.check_resident("saving a checkpoint")
        if self.ref is not None:
            extra = dict(extra, ref_source=self.ref.source)
        return save_training_state(self.chunks, self.optimizer, self.scheduler, root, iteration, extra)

    def load(self, root: str, ref_load: str | None = None, hf_checkpoint: str | None = None) -> dict:
        """Resume from ``root``. The reference weights are not the resumed ones: when a KL term
        needs them they are reloaded from where the run started (``ref_load``, a torch_dist
        checkpoint, else the HF ``hf_checkpoint``), as the first start of the run did."""
        from slime.backends.megatron_utils.checkpoint import load_training_state

        if self.needs_reference:
            if ref_load:
                self.load_dist(ref_load)
            elif hf_checkpoint:
                self.load_hf(hf_checkpoint)
            else:
                raise ValueError(
                    "resuming with a KL term (--use-kl-loss / --kl-coef) needs the reference weights: "
                    "give --ref-load or --hf-checkpoint"
                )
        state = load_training_state(self.chunks, self.optimizer, self.scheduler, root)
        self.step = int(state.get("step", 0))
        saved_ref = state.get("ref_source")
        if self.ref is not None and saved_ref and saved_ref != self.ref.source:
            logger.warning("resume: the reference weights now come from %s, the run started with %s", self.ref.source, saved_ref)
        return state

    def export_hf(self, out_dir: str, origin_hf_dir: str) -> None:
        """Write the current weights as a HF checkpoint (global rank 0 writes)."""
        import torch.distributed as dist

        from slime.backends.megatron_utils.hf_weights import save_hf_checkpoint

        hf = self.gather_hf(self.megatron_state())
        if hf is not None:
            save_hf_checkpoint(hf, out_dir, origin_hf_dir, self.model_args)
        dist.barrier()

    def gather_hf(self, shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """HF-named full tensors from this TP rank's megatron-named ``shard`` (weights or grads,
        mapped alike), on global rank 0; None elsewhere. Every rank must call it."""
        from slime.backends.megatron_utils.hf_weights import mcore_to_hf

        if self.info.pp_size > 1:  # every stage's layers on pipeline rank 0, full-model names
            shard = self.gather_stages(shard) or {}
        shards = self.gather_tp(shard)
        return None if shards is None else mcore_to_hf(shards, self.model_args)

    def gather_stages(self, shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Every pipeline stage's ``shard`` (this rank's tensors by name, as `megatron_state`)
        under full-model names on pipeline rank 0, None on the other stages; ``shard`` itself
        without PP. A collective of the pipeline group."""
        if self.info.pp_size == 1:
            return shard
        mine: dict[str, torch.Tensor] = {}
        for vp, part in zip(self._vp_stages, self._split(shard)):
            mine.update(pipeline.to_global(part, self.config, self._tied, vp))
        return pipeline.gather_stages(mine)

    def gather_tp(self, shard: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]] | None:
        """Every TP rank's ``shard`` (CPU tensors), in TP rank order, with every EP rank's experts
        under their global index (`expert_parallel.gather_shards`), on global rank 0; None
        elsewhere. A collective of this rank's TP (and expert-parallel) group."""
        from slime.backends.megatron_utils.expert_parallel import gather_shards

        return gather_shards(shard, self.info)

    def iter_hf_buckets(self, bucket_bytes: int):
        """The current weights as lists of (HF name, full tensor), each list at most
        ``bucket_bytes`` bytes (one larger tensor goes alone): on global rank 0; other ranks
        yield nothing but must iterate too (TP gathers). See `weight_sync`."""
        from slime.backends.megatron_utils.weight_sync import hf_buckets

        for bucket, _ in hf_buckets(self, bucket_bytes):
            yield bucket

    @torch.no_grad()
    def evaluate(self, samples: list[dict]) -> float:
        """Token-weighted loss over all DP ranks' samples (every supervised token counts once)."""
        from dataclasses import replace

        mbs, _ = self._micro_batches(samples, replace(self.batching, calculate_per_token_loss=True))
        if not mbs:  # this rank holds none of the eval set; it still joins the sum
            return self._dp_sum([0.0])[0]
        self._eval()
        losses = self._run_schedule(mbs, forward_only=True)
        return self._dp_sum([float(sum(d["loss"] for d in losses))])[0]

    @torch.no_grad()
    def compute_log_probs(self, samples: list[dict], with_entropy: bool = False) -> dict[str, list[torch.Tensor]]:
        """Per-response-token log-probs (and entropy) of the current weights, forward only.

        Same packing as training; every rank of the DP group must call it. Returns
        ``{"log_probs": [...], "entropy": [...]}``: one float32 CPU tensor of
        ``response_length`` values per sample, in order (the old policy's or, with the
        reference weights loaded, the reference's log-probs).
        """
        from slime.backends.megatron_utils.log_probs import token_stats

        mbs, _ = self._micro_batches(samples, self.batching)
        self._eval()
        out: dict[str, list[torch.Tensor]] = {"log_probs": [], **({"entropy": []} if with_entropy else {})}
        ctx = self.loss_ctx

        def per_sample(mb: MicroBatch, output) -> dict[str, list[torch.Tensor]]:
            logp, entropy = token_stats(
                output, mb.labels, ctx.vocab_size, ctx.vocab_start, chunk_tokens=ctx.chunk_tokens,
                with_entropy=with_entropy,
            )  # fmt: skip
            per_position = {"log_probs": logp, **({"entropy": entropy} if with_entropy else {})}
            if mb.cp is not None:  # this CP rank's tokens -> the full pack, where the spans point
                from megatron.core import parallel_state as ps

                from slime.backends.megatron_utils.context_parallel import cp_gather

                group = ps.get_context_parallel_group()
                per_position = {k: cp_gather(v, mb.cp, group) for k, v in per_position.items()}
            rows = [mb.response_positions(i) for i in range(mb.num_samples)]
            return {k: [values[row, cols].float().cpu() for row, cols in rows] for k, values in per_position.items()}

        if self.info.pp_size > 1 and mbs:  # computed on the last stage, sent to the others
            results = pipeline.last_stage_outputs(self._run_schedule, mbs, per_sample)
        else:
            results = [per_sample(mb, self._logits(self.model, mb)) for mb in mbs]
        for result in results:
            for key, values in result.items():
                out[key].extend(values)
        return out

    def compute_ref_log_probs(self, samples: list[dict]) -> list[torch.Tensor]:
        """`compute_log_probs` of the reference weights (swapped in for the forward, then back)."""
        if self.ref is None:
            raise ValueError(
                "no reference weights: they are captured by load_hf / load_dist / load when the RL flags "
                "need them (--use-kl-loss or --kl-coef)"
            )
        with self.ref.swapped_in(self._tree):
            return self.compute_log_probs(samples)["log_probs"]

    def train_rollout(self, samples_per_step: list[list[dict]]) -> list[dict]:
        """Train on this rank's share of one rollout, split into optimizer steps; per-step
        metrics. RL losses first compute old/reference log-probs and advantages over the whole
        rollout (see `rl_step`); SFT is one `train_step` per step. All DP ranks call it."""
        from slime.backends.megatron_utils.rl_step import train_rollout

        return train_rollout(self, samples_per_step)

    def compute_advantages(self, samples: list[dict]) -> dict[str, float]:
        """--advantage-estimator on this rank's samples (``reward`` set, log-probs as needed);
        whitening and the returned statistics span the DP group. Every DP rank must call it."""
        from megatron.core import parallel_state as ps

        from slime.algorithms.advantages import compute_advantages

        if self.loss_ctx.algorithm is None:
            raise ValueError("compute_advantages needs the RL algorithm flags (MegatronActor(..., algorithm=...))")
        return compute_advantages(self.loss_ctx.algorithm, samples, ps.get_data_parallel_group(), self.info.device)

    @torch.no_grad()
    def logits(self, tokens: list[int]) -> torch.Tensor:
        """Full-vocabulary logits of one sequence (gathered over TP), for parity checks. Under
        CP the sequence is one packed micro-batch split over the CP ranks and gathered back;
        building it counts tokens over DP, so every rank calls this, as every rank trains."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        from slime.backends.megatron_utils.context_parallel import cp_gather

        self._eval()
        if self.info.cp_size > 1:
            sample = {"tokens": list(tokens), "loss_mask": [1], "response_length": 1}
            mbs, _ = self._micro_batches([sample], BatchingArgs(micro_batch_size=1))  # more under VPP: padding-only
        else:
            m = self.alignment.multiple  # sequence parallelism: pad to a multiple of TP (causal: the end is unseen)
            ids = torch.tensor(tokens + [0] * (-len(tokens) % m), device=self.info.device)[None]
            # Virtual stages run micro-batches in groups of PP: the same one again fills the group.
            mbs = [pipeline.unpacked_batch(ids)] * self.alignment.count_multiple

        def full_logits(mb, out) -> torch.Tensor:
            if isinstance(out, OutputHead):
                out = out.logits()
            out = gather_from_tensor_model_parallel_region(out)[0, :, : self.model_args.vocab_size]
            if mb is not None and mb.cp is not None:  # this CP rank's shard -> the whole sequence
                out = cp_gather(out.T.contiguous(), mb.cp, ps.get_context_parallel_group()).T
            return out[: len(tokens)].float().cpu()

        if self.info.pp_size > 1:  # the last stage's logits, on every stage
            return pipeline.last_stage_outputs(self._run_schedule, mbs, full_logits)[0]
        if self.info.cp_size > 1:
            return full_logits(mbs[0], self._logits(self.model, mbs[0]))
        out = self.model(ids, torch.arange(ids.shape[1], device=self.info.device)[None], attention_mask=None)
        return full_logits(None, out)
