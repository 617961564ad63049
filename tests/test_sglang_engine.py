"""SGLang engines, router and placement on a machine without SGLang or GPUs.

The real code paths run: server command lines, child processes with their health waits, the
weight-bucket wire format of ``/update_weights_from_tensor`` (shared memory between unrelated
processes), memory release/resume, the router, and `start_rollout_engines` on Ray placement
groups with logical GPUs. What stands in: ``tests/fakes/fake_sglang_server.py`` (SGLang's command
line and routes over our CPU engine) and ``tests/fakes/fake_sglang_router.py`` (round robin),
selected through ``SLIME_SGLANG_LAUNCH_COMMAND`` / ``SLIME_SGLANG_ROUTER_COMMAND``. SGLang's own
behaviour (CUDA, its unpickler, TP sharding) is not exercised here.
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
from conftest import ROOT, TINY

FAKES = ROOT / "tests" / "fakes"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def fake_commands():
    old = {
        k: os.environ.get(k) for k in ("SLIME_SGLANG_LAUNCH_COMMAND", "SLIME_SGLANG_ROUTER_COMMAND", "OMP_NUM_THREADS")
    }
    os.environ["SLIME_SGLANG_LAUNCH_COMMAND"] = f"{sys.executable} {FAKES / 'fake_sglang_server.py'}"
    os.environ["SLIME_SGLANG_ROUTER_COMMAND"] = f"{sys.executable} {FAKES / 'fake_sglang_router.py'}"
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _greedy(url_or_engine, ids, n=6):
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
    }
    if isinstance(url_or_engine, str):
        from slime.engines.server_process import http_call

        return http_call("POST", url_or_engine + "/generate", body)
    return url_or_engine.generate(timeout=120, **body)


# ---------------------------------------------------------------------------------- pure logic
def test_server_argv_passes_every_sglang_flag_through(fake_commands):
    from slime.engines.sglang_engine import SGLangEngineConfig, server_argv

    cfg = SGLangEngineConfig(
        model_path="/m",
        tp_size=2,
        gpu_ids=("4", "5"),
        memory_saver=True,
        seed=7,
        server_args={
            "mem_fraction_static": 0.7,
            "cuda_graph_bs": [1, 2, 4],
            "disable_radix_cache": True,
            "json_model_override_args": {"a": 1},
            "chunked_prefill_size": None,
        },
    )
    argv = server_argv(cfg, port=1234, nccl_port=5678)
    assert argv[:2] == [sys.executable, str(FAKES / "fake_sglang_server.py")]
    joined = " ".join(argv[2:])
    for part in ("--model-path /m", "--tp-size 2", "--port 1234", "--nccl-port 5678", "--base-gpu-id 0", "--random-seed 7",
                 "--mem-fraction-static 0.7", "--cuda-graph-bs 1 2 4", '--json-model-override-args {"a": 1}'):  # fmt: skip
        assert part in joined, part
    assert argv.count("--enable-memory-saver") == 1 and argv.count("--disable-radix-cache") == 1
    assert "--chunked-prefill-size" not in argv  # None: not given
    seeded = server_argv(SGLangEngineConfig(model_path="/m", seed=7, server_args={"random_seed": 99}), 1, 2)
    assert seeded.count("--random-seed") == 1 and seeded[seeded.index("--random-seed") + 1] == "99"


def test_flags_slime_decides_are_refused_with_the_flag_to_use():
    from slime.engines.sglang_engine import SGLangEngineConfig

    with pytest.raises(ValueError, match="--sglang-tp-size.*--rollout-num-gpus-per-engine"):
        SGLangEngineConfig(model_path="/m", server_args={"tp_size": 4})
    with pytest.raises(ValueError, match="--sglang-port"):
        SGLangEngineConfig(model_path="/m", server_args={"port": 30000})
    with pytest.raises(ValueError, match="3 GPUs given for a tp size of 2"):
        SGLangEngineConfig(model_path="/m", tp_size=2, gpu_ids=("0", "1", "2"))
    with pytest.raises(ValueError, match="--hf-checkpoint"):
        SGLangEngineConfig(model_path="")


def test_engine_gpu_layout():
    from slime.ray.rollout_engines import engine_gpu_layout

    assert engine_gpu_layout(4, 2) == [[0, 1], [2, 3]]
    assert engine_gpu_layout(3, 1) == [[0], [1], [2]]
    for total, per in ((3, 2), (1, 2), (0, 1)):
        with pytest.raises(ValueError, match="multiple of --rollout-num-gpus-per-engine"):
            engine_gpu_layout(total, per)


def test_share_named_tensors_copies_into_one_segment():
    import torch

    from slime.engines.sglang_engine import share_named_tensors

    src = [
        ("a", torch.randn(3, 5)),
        ("b", torch.randn(7).to(torch.bfloat16)),
        ("c", torch.tensor([True, False, True])),
        ("d", torch.arange(6, dtype=torch.int64).view(2, 3).t()),  # non-contiguous source
        ("e", torch.empty(0, 4)),
    ]
    shared, segment = share_named_tensors(src)
    assert segment.is_shared() and [n for n, _ in shared] == list("abcde")
    for (_, s), (_, v) in zip(src, shared):
        assert v.dtype == s.dtype and v.shape == s.shape and torch.equal(v, s)
    base = segment.untyped_storage().data_ptr()
    assert all(v.untyped_storage().data_ptr() == base for n, v in shared if v.numel())
    with pytest.raises(TypeError, match="expected \\(str, torch.Tensor\\)"):
        share_named_tensors([("x", [1.0])])


def test_bucket_larger_than_free_shared_memory_is_refused(monkeypatch):
    import torch

    from slime.engines import sglang_engine

    class Small:  # 40 KiB free in /dev/shm
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(sglang_engine.os, "statvfs", lambda path: Small)
    with pytest.raises(RuntimeError, match="does not fit in /dev/shm.*--update-weight-buffer-size"):
        sglang_engine.share_named_tensors([("a", torch.zeros(100_000))])


# ---------------------------------------------------------------------- one engine process
@pytest.fixture(scope="module")
def engine(fake_commands):
    from slime.engines.sglang_engine import SGLangEngineActor, SGLangEngineConfig

    actor = SGLangEngineActor(
        SGLangEngineConfig(
            model_path=str(TINY),
            tp_size=2,
            gpu_ids=("3", "5"),
            memory_saver=True,
            server_args={"mem_fraction_static": "0.7"},
            start_timeout=300,
        )
    )
    actor.start()
    yield actor
    actor.shutdown()
    assert actor.url is None


def test_engine_starts_with_its_gpus_and_flags(engine):
    from slime.engines.server_process import http_call

    info = http_call("GET", engine.url + "/fake_info")
    assert info["cuda_visible_devices"] == "3,5"
    assert info["args"]["tp_size"] == 2 and info["args"]["enable_memory_saver"] is True
    assert info["extra"] == ["--mem-fraction-static", "0.7"]
    assert engine.healthy()


def test_bucketed_update_matches_a_reference_with_the_same_weights(engine):
    """Trainer-shaped sync (buckets, version, flush on the last): the served model then
    generates exactly what a CPU engine holding the same weights generates."""
    import torch

    from slime.engines.config import EngineConfig
    from slime.engines.cpu_engine import CpuEngine
    from slime.engines.server_process import http_call
    from slime.engines.weights import iter_hf_tensors

    g = torch.Generator().manual_seed(0)
    new = [(n, t + 0.05 * torch.randn(t.shape, generator=g)) for n, t in iter_hf_tensors(str(TINY))]
    half = len(new) // 2
    assert engine.update_weights(new[:half], weight_version="3", flush_cache=False) == "3"
    assert engine.update_weights(new[half:], weight_version="3", flush_cache=True) == "3"
    first = http_call("POST", engine.url + "/get_weights_by_name", {"name": new[0][0], "truncate_size": 5})
    assert torch.allclose(torch.tensor(first), new[0][1].flatten()[:5])

    reference = CpuEngine(EngineConfig(model_path=str(TINY), kind="cpu", num_threads=1))
    try:
        reference.update_weights(new)
        ids = [5, 17, 99, 3]
        served, expected = _greedy(engine.url, ids), _greedy(reference, ids)
    finally:
        reference.shutdown()
    assert served["meta_info"]["weight_version"] == "3"
    assert served["output_ids"] == expected["output_ids"]
    lp = [x[0] for x in served["meta_info"]["output_token_logprobs"]]
    assert lp == pytest.approx([x[0] for x in expected["meta_info"]["output_token_logprobs"]], abs=1e-5)


def test_bad_bucket_fails_naming_the_tensor(engine):
    import torch

    from slime.engines.server_process import HTTPCallError

    with pytest.raises(HTTPCallError, match="not_a_weight"):
        engine.update_weights([("not_a_weight", torch.zeros(2))], weight_version="x")


def test_memory_tags_as_sglang_takes_them():
    from slime.engines.sglang_engine import sglang_memory_tags

    assert sglang_memory_tags(None, True) == {} and sglang_memory_tags(["kv_cache", "weights"], True) == {}
    assert sglang_memory_tags(["weights"], True) == {"tags": ["weights"]}
    assert sglang_memory_tags(["kv_cache"], True) == {"tags": ["kv_cache", "cuda_graph"]}
    assert sglang_memory_tags(["kv_cache"], False) == {"tags": ["kv_cache"]}


def test_release_and_resume_memory(engine):
    from slime.engines.server_process import HTTPCallError

    engine.release_memory_occupation()
    with pytest.raises(HTTPCallError) as e:
        _greedy(engine.url, [1, 2], n=1)
    assert e.value.status == 503
    engine.resume_memory_occupation()
    assert len(_greedy(engine.url, [1, 2], n=1)["output_ids"]) == 1


def test_router_spreads_requests_and_takes_workers(engine):
    from slime.engines.config import EngineConfig
    from slime.engines.http_server import get_server, launch_server, shutdown_server
    from slime.engines.router import launch_router, register_workers
    from slime.engines.server_process import http_call

    local = launch_server(EngineConfig(model_path=str(TINY), kind="cpu", num_threads=1))
    router = None
    try:
        before = http_call("GET", engine.url + "/fake_info")["generate_calls"]
        router = launch_router([engine.url, local], policy="round_robin", timeout=120)
        outs = [_greedy(router.url, [7, 8, 9], n=2) for _ in range(4)]
        assert all(len(o["output_ids"]) == 2 for o in outs)
        assert http_call("GET", engine.url + "/fake_info")["generate_calls"] - before == 2
        assert get_server(local).engine.load()["generated_tokens"] >= 2

        # An existing router (--sglang-router-ip/port): our engines join it and leave at shutdown.
        joined = register_workers(router.url, ["http://127.0.0.1:1"])
        assert "http://127.0.0.1:1" in [w["url"] for w in http_call("GET", router.url + "/workers")["workers"]]
        joined.shutdown()
        assert "http://127.0.0.1:1" not in [w["url"] for w in http_call("GET", router.url + "/workers")["workers"]]
    finally:
        if router is not None:
            router.shutdown()
        shutdown_server(local)
    assert router.process is None


def test_a_server_that_dies_at_start_fails_fast_with_its_output(fake_commands):
    from slime.engines.sglang_engine import SGLangEngineActor, SGLangEngineConfig

    actor = SGLangEngineActor(
        SGLangEngineConfig(model_path=str(TINY), server_args={"fail_at_start": True}, start_timeout=120)
    )
    with pytest.raises(RuntimeError, match="(?s)exited with code 3.*asked to fail at start"):
        actor.start()


# ---------------------------------------------------------------------------- through Ray
@pytest.fixture(scope="module")
def ray_gpus(fake_commands):
    import ray

    # Logical GPUs: placement groups, bundle GPU ids and CUDA_VISIBLE_DEVICES work as on a GPU node.
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()


def _engine_args(**overrides) -> argparse.Namespace:
    from slime.engines.config import add_cpu_engine_arguments
    from slime.ray.rollout_engines import add_engine_placement_arguments

    parser = argparse.ArgumentParser()
    add_engine_placement_arguments(add_cpu_engine_arguments(parser))
    args = parser.parse_args(["--rollout-engine", "sglang", "--cpu-engine-num-threads", "1"])
    fields = {
        "hf_checkpoint": str(TINY),
        "rollout_num_gpus": 2,
        "colocate": False,
        "sglang_server_args": {},
        "rollout_seed": 1,
    }
    for k, v in {**fields, **overrides}.items():
        setattr(args, k, v)
    return args


def test_sglang_engines_on_their_own_gpus_behind_a_router(ray_gpus):
    import ray
    import torch

    from slime.engines.server_process import http_call
    from slime.ray.rollout_engines import start_rollout_engines

    engines = start_rollout_engines(_engine_args(rollout_num_gpus_per_engine=1))
    try:
        assert engines.kind == "sglang" and len(engines.handles) == 2 and engines.router is not None
        assert engines.url == engines.router.url
        urls = ray.get([h.get_url.remote() for h in engines.handles])
        devices = sorted(http_call("GET", u + "/fake_info")["cuda_visible_devices"] for u in urls)
        assert devices == ["0", "1"]  # each engine got its own bundle's GPU
        seeds = sorted(http_call("GET", u + "/fake_info")["args"]["random_seed"] for u in urls)
        assert seeds == [1, 2]
        name, tensor = "model.norm.weight", torch.full((128,), 0.5)
        assert ray.get(
            [
                h.update_weights.remote(ray.put([(name, tensor)]), weight_version="9", flush_cache=True)
                for h in engines.handles
            ]
        ) == ["9", "9"]
        out = _greedy(engines.url, [1, 2, 3], n=2)
        assert out["meta_info"]["weight_version"] == "9"
    finally:
        pg = engines.placement_group
        engines.shutdown()
    from ray.util.placement_group import placement_group_table

    assert placement_group_table(pg)["state"] == "REMOVED"


def test_colocated_engine_uses_the_trainers_bundles(ray_gpus):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from slime.engines.server_process import http_call
    from slime.ray.rollout_engines import start_rollout_engines

    args = _engine_args(colocate=True, rollout_num_gpus=None, rollout_num_gpus_per_engine=2)
    with pytest.raises(ValueError, match="trainer's placement group"):
        start_rollout_engines(args)
    cpu_pg = placement_group([{"CPU": 1}])
    ray.get(cpu_pg.ready(), timeout=60)
    with pytest.raises(ValueError, match="bundles without a GPU"):
        start_rollout_engines(args, placement_group=cpu_pg)
    remove_placement_group(cpu_pg)
    trainer_pg = placement_group([{"GPU": 1, "CPU": 1}] * 2, strategy="PACK")
    ray.get(trainer_pg.ready(), timeout=60)
    try:
        engines = start_rollout_engines(args, placement_group=trainer_pg)
        try:
            assert engines.router is None and engines.placement_group is None  # one engine; the trainer owns the group
            info = http_call("GET", engines.url + "/fake_info")
            assert info["cuda_visible_devices"] == "0,1" and info["args"]["enable_memory_saver"] is True
            ray.get(engines.handles[0].release_memory_occupation.remote())
            ray.get(engines.handles[0].resume_memory_occupation.remote())
        finally:
            engines.shutdown()
    finally:
        remove_placement_group(trainer_pg)


def test_cpu_engine_runs_on_its_own_bundle(ray_gpus):
    from slime.ray.rollout_engines import start_rollout_engines

    engines = start_rollout_engines(_engine_args(rollout_engine="cpu", rollout_num_gpus=None))
    try:
        assert engines.kind == "cpu" and engines.placement_group is not None
        assert engines.placement_group.bundle_specs == [{"CPU": 1.0}]
        assert len(_greedy(engines.url, [4, 5], n=3)["output_ids"]) == 3
    finally:
        engines.shutdown()
    assert engines.placement_group is None
