"""Weight sync, trainer side (DESIGN invariant 8): the HF buckets of a trained actor are the
exporter's mapping of its weights, respect the size cap, and once loaded into the CPU engine
(in process, and through Ray actors as the trainer does it) give the actor's log-probs.
TP=2 buckets are checked in test_policy_loss_packed.py, which shares its two-process run."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY
from megatron_helpers import build_actor, synthetic_samples

VOCAB = 849  # tiny-qwen3's tokenizer
CAP = 100_000  # bytes: several tensors per bucket, and some single tensors above it
RAY_TIMEOUT_S = 120
ENGINES = 2  # the fan-out is what is tested: every handle gets every bucket


@pytest.fixture(scope="module")
def trained():
    """(actor, fixed probe sample): an actor moved away from TINY's weights by two SFT steps."""
    from slime.backends.megatron_utils.batching import BatchingArgs
    from slime.backends.megatron_utils.cpu_compat import disable_cpu_mode
    from slime.backends.megatron_utils.parallel import destroy_parallel

    actor = build_actor(TINY, BatchingArgs(use_dynamic_batch_size=True, max_tokens_per_gpu=400), 4)
    data = synthetic_samples(8, VOCAB, seed=5)
    actor.train_rollout([data[:4], data[4:]])
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (40,), generator=g).tolist()
    probe = {"tokens": tokens, "loss_mask": [1] * 39, "response_length": 39}
    yield actor, probe
    destroy_parallel()
    disable_cpu_mode()


def nbytes(bucket) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)


def test_bucketing_rule():
    from slime.backends.megatron_utils.weight_sync import bucket_named_tensors

    sizes = {"a": 3, "b": 2, "c": 9, "d": 1, "e": 4, "f": 5}  # float32 elements: 4 bytes each
    named = [(k, torch.zeros(n)) for k, n in sizes.items()]
    got = [([k for k, _ in b], last) for b, last in bucket_named_tensors(named, 20)]
    # a+b = 20 bytes fits; c (36 B) is over the cap and goes alone; d+e = 20; f alone.
    assert got == [(["a", "b"], False), (["c"], False), (["d", "e"], False), (["f"], True)]
    assert list(bucket_named_tensors([], 20)) == []
    with pytest.raises(ValueError, match="bucket size"):
        list(bucket_named_tensors(named, 0))


def test_buckets_are_the_exporters_mapping_under_the_cap(trained):
    from slime.backends.megatron_utils.weight_sync import hf_buckets

    actor, _ = trained
    exported = actor.gather_hf(actor.megatron_state())  # what export_hf writes
    pairs = list(hf_buckets(actor, CAP))
    buckets = [b for b, _ in pairs]
    assert [last for _, last in pairs] == [False] * (len(pairs) - 1) + [True]
    assert len(buckets) > 3
    assert all(nbytes(b) <= CAP or len(b) == 1 for b in buckets)
    assert any(nbytes(b) > CAP for b in buckets)  # the single-tensor case is exercised
    assert any(len(b) > 1 for b in buckets)
    names = [n for b in buckets for n, _ in b]
    assert len(names) == len(set(names)) and set(names) == set(exported)
    for b in buckets:
        for name, t in b:
            assert torch.equal(t, exported[name]), name
    # The public iterator gives the same buckets.
    assert [[n for n, _ in b] for b in actor.iter_hf_buckets(CAP)] == [[n for n, _ in b] for b in buckets]


def engine_log_probs(generate, tokens: list[int]) -> torch.Tensor:
    out = generate(input_ids=tokens, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
    values = [v for v, _, _ in out["meta_info"]["input_token_logprobs"][1:]]
    return torch.tensor(values, dtype=torch.float64)


def test_engine_after_sync_gives_the_actors_log_probs(trained):
    from slime.backends.megatron_utils.weight_sync import hf_buckets
    from slime.engines.config import EngineConfig
    from slime.engines.cpu_engine import CpuEngine

    actor, probe = trained
    ours = actor.compute_log_probs([probe])["log_probs"][0].double()
    engine = CpuEngine(EngineConfig(model_path=str(TINY), num_threads=1))
    try:
        before = engine_log_probs(engine.generate, probe["tokens"])
        assert (before - ours).abs().max() > 1e-2  # training moved the weights: the sync has work to do
        for bucket, last in hf_buckets(actor, CAP):
            assert engine.update_weights(bucket, weight_version="step-2", flush_cache=last) == "step-2"
        after = engine_log_probs(engine.generate, probe["tokens"])
    finally:
        engine.shutdown()
    torch.testing.assert_close(after, ours, rtol=0, atol=2e-5)


@pytest.mark.timeout(240)
def test_ray_update_weights_reaches_every_engine(trained):
    """TrainRayActor.update_weights (called in process on the rank-0 actor) streams the buckets
    to two CpuEngineActor handles; both then serve the actor's log-probs over HTTP."""
    import json
    import urllib.request

    import ray

    from slime.engines.config import EngineConfig
    from slime.engines.ray_engine import create_cpu_engine
    from slime.ray.train_group import TrainRayActor

    actor, probe = trained
    ours = actor.compute_log_probs([probe])["log_probs"][0].double()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    try:
        engines = [create_cpu_engine(EngineConfig(model_path=str(TINY), num_threads=1), num_cpus=0.5) for _ in range(ENGINES)]
        urls = ray.get([e.start.remote() for e in engines], timeout=RAY_TIMEOUT_S)
        sender = TrainRayActor()
        sender.actor = actor
        stats = sender.update_weights(engines, "v7", CAP)
        assert stats["weight_version"] == "v7" and stats["buckets"] > 3
        assert stats["tensors"] == len(actor.gather_hf(actor.megatron_state()))

        def generate(**body):
            req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=RAY_TIMEOUT_S) as r:
                return json.loads(r.read())

        for url in urls:
            torch.testing.assert_close(engine_log_probs(generate, probe["tokens"]), ours, rtol=0, atol=2e-5)
            with urllib.request.urlopen(url + "/get_weight_version", timeout=RAY_TIMEOUT_S) as r:
                assert "v7" in r.read().decode()
        ray.get([e.shutdown.remote() for e in engines], timeout=RAY_TIMEOUT_S)
    finally:
        ray.shutdown()


def test_weight_sync_flag():
    import argparse

    from slime.backends.megatron_utils.weight_sync import WeightSyncConfig, add_weight_sync_arguments

    parser = add_weight_sync_arguments(argparse.ArgumentParser())
    assert WeightSyncConfig.from_args(parser.parse_args([])).bucket_bytes == 512 * 2**20
    assert WeightSyncConfig.from_args(parser.parse_args(["--update-weight-buffer-size", "1024"])).bucket_bytes == 1024
    with pytest.raises(ValueError, match="--update-weight-buffer-size"):
        WeightSyncConfig.from_args(parser.parse_args(["--update-weight-buffer-size", "0"]))
