"""CPU inference engine: batching correctness, log-probs, seeds, stops, aborts, weight updates, HTTP, Ray.

Most tests use a "sharp" random Qwen3 (the tiny config with a larger init) so greedy outputs
vary token to token and log-probs are far from uniform; the shipped tiny checkpoint is used
where only the plumbing matters.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import TINY

torch = pytest.importorskip("torch")

from slime.engines.config import EngineConfig  # noqa: E402


def _random_model_dir(path, seed: int, init: float = 0.3):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(TINY)
    cfg.initializer_range = init
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    for f in TINY.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    return _random_model_dir(tmp_path_factory.mktemp("sharp"), seed=0)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return _random_model_dir(tmp_path_factory.mktemp("other"), seed=1)


@pytest.fixture(scope="module")
def engine(sharp_dir):
    from slime.engines.cpu_engine import CpuEngine

    eng = CpuEngine(EngineConfig(model_path=str(sharp_dir), seed=0, max_running_requests=8, max_prefill_per_step=1))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_model(sharp_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(sharp_dir, dtype=torch.float32).eval()


PROMPTS = [[5, 17, 33], [100, 7, 250, 9, 12, 40, 41, 3, 77, 60, 61], [300], [12, 13, 14, 15, 16, 500, 501]]


def _full_log_probs(model, prompt: list[int], output: list[int], temperature: float = 1.0) -> list[float]:
    """What a trainer computes: one forward of prompt + output, log_softmax(logits / T) at each output token."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    lp = torch.log_softmax(logits, -1)
    return [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(output)]


def _greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation (no KV cache at all)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


# ---- batching and log-prob correctness ---------------------------------------------------------


def test_concurrent_greedy_equals_alone_and_cacheless_reference(engine, hf_model):
    lengths = [12, 5, 9, 16]  # requests leave the batch at different steps
    alone = [engine.generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": n, "ignore_eos": True}) for p, n in zip(PROMPTS, lengths)]
    engine.flush_cache()
    # max_prefill_per_step=1: request k joins while the first k are mid-decode, with other cache lengths.
    futures = [engine.submit(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": n, "ignore_eos": True}) for p, n in zip(PROMPTS, lengths)]
    together = [f.result(60) for f in futures]
    for p, n, a, t in zip(PROMPTS, lengths, alone, together):
        ref = _greedy_reference(hf_model, p, n)
        assert a["output_ids"] == ref
        assert t["output_ids"] == ref
        assert t["meta_info"]["finish_reason"] == {"type": "length", "length": n}
        assert t["meta_info"]["completion_tokens"] == n and t["meta_info"]["prompt_tokens"] == len(p)
    assert len({tuple(r["output_ids"]) for r in together}) == len(PROMPTS)  # the outputs really differ
    assert engine.stats["decode_rows"] > engine.stats["decode_steps"]  # and were decoded in shared batches


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.0, 1.0, -1), (0.7, 0.9, -1), (1.3, 1.0, 20)])
def test_logprobs_equal_full_sequence_forward(engine, hf_model, temperature, top_p, top_k):
    sp = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": 10, "ignore_eos": True}
    futures = [engine.submit(input_ids=p, sampling_params=dict(sp, sampling_seed=i), return_logprob=True) for i, p in enumerate(PROMPTS)]
    for p, f in zip(PROMPTS, futures):
        out = f.result(60)
        got = out["meta_info"]["output_token_logprobs"]
        assert [tok for _, tok, _ in got] == out["output_ids"] and all(text is None for _, _, text in got)
        # SGLang's default: log_softmax(logits / T), T = 1 for greedy; untouched by top-p / top-k.
        want = _full_log_probs(hf_model, p, out["output_ids"], temperature or 1.0)
        assert [lp for lp, _, _ in got] == pytest.approx(want, abs=2e-4)


def test_input_logprobs_and_original_logprob_mode(sharp_dir, hf_model):
    from slime.engines.cpu_engine import CpuEngine

    eng = CpuEngine(EngineConfig(model_path=str(sharp_dir), return_original_logprob=True))
    try:
        p = PROMPTS[1]
        out = eng.generate(input_ids=p, sampling_params={"temperature": 2.0, "max_new_tokens": 6, "sampling_seed": 3}, return_logprob=True, logprob_start_len=0)
    finally:
        eng.shutdown()
    want = _full_log_probs(hf_model, p, out["output_ids"], 1.0)  # raw logits despite temperature 2
    assert [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]] == pytest.approx(want, abs=2e-4)
    inputs = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == p and inputs[0][0] is None
    assert [lp for lp, _, _ in inputs[1:]] == pytest.approx(_full_log_probs(hf_model, p[:1], p[1:]), abs=2e-4)


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    sp = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True}
    alone = engine.generate(input_ids=PROMPTS[0], sampling_params=dict(sp, sampling_seed=123))
    crowd = [engine.submit(input_ids=p, sampling_params=dict(sp, sampling_seed=900 + i)) for i, p in enumerate(PROMPTS)]
    mine = engine.submit(input_ids=PROMPTS[0], sampling_params=dict(sp, sampling_seed=123))
    assert mine.result(60)["output_ids"] == alone["output_ids"]
    [f.result(60) for f in crowd]
    other = engine.generate(input_ids=PROMPTS[0], sampling_params=dict(sp, sampling_seed=124))
    assert other["output_ids"] != alone["output_ids"]
    # n samples of one prompt without sampling_seed (an RL group) must differ from each other.
    group = [engine.submit(input_ids=PROMPTS[0], sampling_params=sp) for _ in range(4)]
    assert len({tuple(f.result(60)["output_ids"]) for f in group}) == 4


def test_engine_seed_makes_unseeded_runs_repeatable(sharp_dir):
    from slime.engines.cpu_engine import CpuEngine

    def run():
        eng = CpuEngine(EngineConfig(model_path=str(sharp_dir), seed=7))
        try:
            return [eng.generate(input_ids=p, sampling_params={"max_new_tokens": 6, "ignore_eos": True})["output_ids"] for p in PROMPTS]
        finally:
            eng.shutdown()

    assert run() == run()


def test_prefix_cache_reuses_a_repeated_prompt(engine):
    engine.flush_cache()
    sp = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
    first = engine.generate(input_ids=PROMPTS[1], sampling_params=sp, return_logprob=True)
    second = engine.generate(input_ids=PROMPTS[1], sampling_params=sp, return_logprob=True)
    assert first["meta_info"]["cached_tokens"] == 0 and second["meta_info"]["cached_tokens"] == len(PROMPTS[1])
    assert second["output_ids"] == first["output_ids"]
    assert second["meta_info"]["output_token_logprobs"] == first["meta_info"]["output_token_logprobs"]
    engine.flush_cache()
    assert engine.generate(input_ids=PROMPTS[1], sampling_params=sp)["meta_info"]["cached_tokens"] == 0


def test_truncation_rules_on_crafted_logits():
    from slime.engines.sampling import SamplingParams, sample_next

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    probs = torch.softmax(logits[0], -1)  # [.012, .032, .086, .234, .636]

    def draws(**kw):
        params = SamplingParams(**kw)
        return [sample_next(logits, [params], [torch.Generator().manual_seed(s)])[0] for s in range(400)]

    assert set(draws(top_k=2)) == {3, 4}
    assert set(draws(top_p=0.8)) == {3, 4}  # .636 < .8 <= .636 + .234
    assert set(draws(top_p=0.5)) == {4}
    assert set(draws(min_p=0.1)) == {2, 3, 4}  # >= 0.1 x .636
    assert set(draws(temperature=0.0)) == {4}
    free = draws()
    assert set(free) == {0, 1, 2, 3, 4}
    assert abs(free.count(4) / len(free) - float(probs[4])) < 0.08  # inverse-CDF follows the distribution


# ---- stop conditions ---------------------------------------------------------------------------------


def test_stop_token_ids_eos_and_ignore_eos(engine):
    base = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    out = engine.generate(input_ids=PROMPTS[0], sampling_params=base)["output_ids"]
    stop_tok = out[4]
    cut = out.index(stop_tok) + 1
    r = engine.generate(input_ids=PROMPTS[0], sampling_params=dict(base, stop_token_ids=[stop_tok]))
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    assert r["output_ids"] == out[:cut]  # the stop token stays in output_ids ...
    assert r["text"] == engine.tokenizer.decode(out[: cut - 1], skip_special_tokens=True)  # ... and leaves the text
    kept = engine.generate(input_ids=PROMPTS[0], sampling_params=dict(base, stop_token_ids=[stop_tok], no_stop_trim=True))
    assert kept["text"] == engine.tokenizer.decode(out[:cut], skip_special_tokens=True)

    assert engine.eos_ids == frozenset({2})  # from generation_config / the tokenizer
    saved = engine.eos_ids
    engine.eos_ids = frozenset({stop_tok})
    try:
        eos = engine.generate(input_ids=PROMPTS[0], sampling_params=dict(base, ignore_eos=False))
        ignored = engine.generate(input_ids=PROMPTS[0], sampling_params=base)
    finally:
        engine.eos_ids = saved
    assert eos["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok} and eos["output_ids"] == out[:cut]
    assert ignored["output_ids"] == out and ignored["meta_info"]["finish_reason"]["type"] == "length"


def test_stop_strings_trim_unless_no_stop_trim(engine):
    base = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    full = engine.generate(input_ids=PROMPTS[3], sampling_params=base)
    text = full["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    r = engine.generate(input_ids=PROMPTS[3], sampling_params=dict(base, stop=stop))
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert r["text"] == text[: text.find(stop)]
    assert len(r["output_ids"]) < len(full["output_ids"]) and full["output_ids"][: len(r["output_ids"])] == r["output_ids"]
    kept = engine.generate(input_ids=PROMPTS[3], sampling_params=dict(base, stop=[stop, "never-there"], no_stop_trim=True))
    assert kept["text"] == text[: text.find(stop) + len(stop)]


def test_skip_special_tokens_reaches_the_decoder(engine):
    from slime.engines.sampling import SamplingParams

    special = engine.tokenizer.all_special_ids[0]
    ids = [special, 40, 41]
    assert engine._decode_text(ids, SamplingParams(skip_special_tokens=False)) == engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert engine._decode_text(ids, SamplingParams()) == engine.tokenizer.decode(ids[1:])


def test_bad_requests_name_the_field(engine):
    with pytest.raises(ValueError, match="exactly one"):
        engine.submit()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit(input_ids=[1, 10**6])
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(input_ids=[1], sampling_params={"top_p": 0})
    with pytest.raises(ValueError, match="frequency_penalty"):
        engine.submit(input_ids=[1], sampling_params={"frequency_penalty": 0.5})
    with pytest.raises(ValueError, match="context length"):
        engine.submit(input_ids=[1] * engine.context_length)
    # max_new_tokens is clamped to the context: a long prompt finishes by length at the limit.
    r = engine.generate(input_ids=[5] * (engine.context_length - 2), sampling_params={"max_new_tokens": 50, "ignore_eos": True, "temperature": 0})
    assert r["meta_info"]["finish_reason"] == {"type": "length", "length": 2}


def test_a_failing_model_fails_callers_loudly():
    from slime.engines.cpu_engine import CpuEngine, EngineError

    eng = CpuEngine(EngineConfig(model_path=str(TINY)))
    try:
        assert eng.healthy

        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        eng.model.forward = broken
        with pytest.raises(EngineError, match="boom"):
            eng.generate(input_ids=[5, 6], sampling_params={"max_new_tokens": 2}, timeout=60)
        _wait_for(lambda: not eng.healthy)
        with pytest.raises(EngineError, match="not running"):
            eng.submit(input_ids=[5, 6])
    finally:
        eng.shutdown()


# ---- abort ---------------------------------------------------------------------------------------------


def _wait_for(cond, timeout: float = 30.0):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def test_abort_one_and_all_return_partial_output(engine):
    long = {"max_new_tokens": 3000, "ignore_eos": True}
    victim = engine.submit(input_ids=PROMPTS[0], sampling_params=long, return_logprob=True)
    bystander = engine.submit(input_ids=PROMPTS[1], sampling_params={"max_new_tokens": 5, "ignore_eos": True})
    _wait_for(lambda: engine.load()["num_running"] >= 1 and engine.stats["decode_steps"] > 0)
    time.sleep(0.05)
    engine.abort(rid=victim.rid)
    r = victim.result(60)
    assert r["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < r["meta_info"]["completion_tokens"] < 3000
    assert len(r["meta_info"]["output_token_logprobs"]) == len(r["output_ids"]) == r["meta_info"]["completion_tokens"]
    assert bystander.result(60)["meta_info"]["finish_reason"]["type"] == "length"

    running = [engine.submit(input_ids=p, sampling_params=long) for p in PROMPTS]
    _wait_for(lambda: engine.load()["num_running"] >= 1)
    engine.abort(abort_all=True)
    assert {f.result(60)["meta_info"]["finish_reason"]["type"] for f in running} == {"abort"}
    after = engine.generate(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 3, "ignore_eos": True})
    assert after["meta_info"]["finish_reason"]["type"] == "length"  # abort_all does not reach later requests


# ---- weight updates -----------------------------------------------------------------------------------


def test_update_weights_in_buckets_matches_a_fresh_model(sharp_dir, other_dir):
    from transformers import AutoModelForCausalLM

    from slime.engines.cpu_engine import CpuEngine
    from slime.engines.weights import iter_hf_tensors

    eng = CpuEngine(EngineConfig(model_path=str(sharp_dir)))
    try:
        sp = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
        before = eng.generate(input_ids=PROMPTS[1], sampling_params=sp, return_logprob=True)
        named = list(iter_hf_tensors(str(other_dir)))
        with pytest.raises(KeyError, match="not-a-weight"):
            eng.update_weights([named[0], ("not-a-weight", named[0][1])])
        with pytest.raises(ValueError, match="shape"):
            eng.update_weights([(named[0][0], torch.zeros(3))])
        assert eng.generate(input_ids=PROMPTS[1], sampling_params=sp)["output_ids"] == before["output_ids"]  # untouched
        running = eng.submit(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 3000, "ignore_eos": True})
        _wait_for(lambda: eng.stats["decode_steps"] > 0)
        half = len(named) // 2
        eng.update_weights(named[:half], weight_version="step-1", abort_all_requests=True)
        eng.update_weights(named[half:], weight_version="step-1")
        after = eng.generate(input_ids=PROMPTS[1], sampling_params=sp, return_logprob=True)
        assert running.result(60)["meta_info"]["finish_reason"]["type"] == "abort"
    finally:
        eng.shutdown()
    fresh = AutoModelForCausalLM.from_pretrained(other_dir, dtype=torch.float32).eval()
    assert after["meta_info"]["weight_version"] == "step-1" and before["meta_info"]["weight_version"] == "default"
    assert after["meta_info"]["cached_tokens"] == 0  # the prefix cache was flushed
    assert after["output_ids"] == _greedy_reference(fresh, PROMPTS[1], 8) != before["output_ids"]
    got = [lp for lp, _, _ in after["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx(_full_log_probs(fresh, PROMPTS[1], after["output_ids"]), abs=2e-4)


def test_release_and_resume_memory_as_sglang_does_for_colocate(sharp_dir):
    """--colocate: released weights lose their values and free their memory; the engine refuses
    to generate until they are resumed *and* refilled by a weight sync, then generates as before."""
    from slime.engines.cpu_engine import CpuEngine, EngineError
    from slime.engines.weights import iter_hf_tensors

    eng = CpuEngine(EngineConfig(model_path=str(sharp_dir)))
    try:
        sp = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
        before = eng.generate(input_ids=PROMPTS[1], sampling_params=sp, return_logprob=True)
        param_bytes = sum(
            {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in eng.model.parameters()}.values()
        )
        running = eng.submit(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 3000, "ignore_eos": True})
        _wait_for(lambda: eng.load()["num_running"] == 1)
        with pytest.raises(EngineError, match="still queued or running"):
            eng.release_memory_occupation()
        eng.abort(abort_all=True)
        running.result(60)
        with pytest.raises(ValueError, match="cuda_graph"):
            eng.release_memory_occupation(["cuda_graph"])
        out = eng.release_memory_occupation()
        assert out == {"released": ["kv_cache", "weights"], "bytes": param_bytes}
        assert all(p.untyped_storage().nbytes() == 0 for p in eng.model.parameters())
        assert eng.release_memory_occupation(["weights"])["bytes"] == 0  # already released
        with pytest.raises(EngineError, match="released"):
            eng.submit(input_ids=PROMPTS[1], sampling_params=sp)
        named = list(iter_hf_tensors(str(sharp_dir)))
        with pytest.raises(EngineError, match="resume_memory_occupation"):
            eng.update_weights(named)
        assert eng.resume_memory_occupation(["weights"]) == {"released": ["kv_cache"], "bytes": param_bytes}
        assert eng.resume_memory_occupation(["kv_cache"])["released"] == []
        with pytest.raises(EngineError, match="not updated since"):
            eng.submit(input_ids=PROMPTS[1], sampling_params=sp)
        half = len(named) // 2
        eng.update_weights(named[:half], flush_cache=False)  # a sync's first bucket: still incomplete
        with pytest.raises(EngineError, match="not updated since"):
            eng.submit(input_ids=PROMPTS[1], sampling_params=sp)
        eng.update_weights(named[half:], flush_cache=True)
        after = eng.generate(input_ids=PROMPTS[1], sampling_params=sp, return_logprob=True)
    finally:
        eng.shutdown()
    assert after["output_ids"] == before["output_ids"]
    assert after["meta_info"]["output_token_logprobs"] == before["meta_info"]["output_token_logprobs"]


# ---- HTTP ------------------------------------------------------------------------------------------------


def _post(url: str, body: dict, timeout: float = 60):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read().decode()
            return r.status, (json.loads(raw) if raw.startswith(("{", "[")) else raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def _get(url: str):
    with urllib.request.urlopen(url, timeout=60) as r:
        raw = r.read().decode()
        return r.status, (json.loads(raw) if raw.startswith("{") else raw)


@pytest.fixture(scope="module")
def server():
    from slime.engines.http_server import get_server, launch_server, shutdown_server

    url = launch_server(EngineConfig(model_path=str(TINY), seed=0))
    yield url, get_server(url)
    shutdown_server(url)


def test_http_generate_matches_sglang_shapes(server):
    url, srv = server
    assert url.startswith("http://127.0.0.1:")
    status, r = _post(url + "/generate", {"text": "hello world", "sampling_params": {"temperature": 0, "max_new_tokens": 4}, "return_logprob": True})
    assert status == 200 and set(r) == {"text", "output_ids", "meta_info"}
    meta = r["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 4} and meta["completion_tokens"] == 4
    assert meta["prompt_tokens"] == len(srv.engine.tokenizer.encode("hello world")) and meta["weight_version"] == "default"
    assert [len(x) for x in meta["output_token_logprobs"]] == [3] * 4 and [x[1] for x in meta["output_token_logprobs"]] == r["output_ids"]
    same = srv.engine.generate(input_ids=srv.engine.tokenizer.encode("hello world"), sampling_params={"temperature": 0, "max_new_tokens": 4})
    assert same["output_ids"] == r["output_ids"] and same["text"] == r["text"]

    status, batch = _post(url + "/generate", {"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 3}], "rid": ["a", "b"]})
    assert status == 200 and [b["meta_info"]["completion_tokens"] for b in batch] == [2, 3] and [b["meta_info"]["id"] for b in batch] == ["a", "b"]

    for bad, needle in [
        ({"input_ids": [1], "stream": True}, "stream"),
        ({"input_ids": [1], "sampling_params": {"bogus": 1}}, "bogus"),
        ({"sampling_params": {}}, "exactly one"),
        ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "sampling_params"),
    ]:
        status, err = _post(url + "/generate", bad)
        assert status == 400 and needle in err["error"]["message"]


def test_http_control_routes(server, other_dir):
    url, srv = server
    assert _get(url + "/health")[0] == 200 and _get(url + "/health_generate")[0] == 200
    status, info = _get(url + "/get_model_info")
    assert info["model_path"] == str(TINY) and info["is_generation"] is True
    assert _get(url + "/get_server_info")[1]["max_running_requests"] == 32
    status, text = _post(url + "/flush_cache", {})
    assert status == 200 and "flushed" in text.lower()

    # abort_all over HTTP while a long request is in flight from another thread.
    results = []
    t = threading.Thread(target=lambda: results.append(_post(url + "/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}})))
    t.start()
    _wait_for(lambda: srv.engine.load()["num_running"] >= 1)
    assert _post(url + "/abort_request", {"abort_all": True})[0] == 200
    t.join(60)
    status, r = results[0]
    assert status == 200 and r["meta_info"]["finish_reason"]["type"] == "abort" and 0 < len(r["output_ids"]) < 3000

    # A client that hangs up has its request aborted instead of decoded to the end.
    import socket

    body = json.dumps({"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}).encode()
    host, port = url.removeprefix("http://").split(":")
    before = srv.engine.stats["generated_tokens"]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        _wait_for(lambda: srv.engine.load()["num_running"] >= 1)
    _wait_for(lambda: srv.engine.load()["num_running"] == 0)
    assert srv.engine.stats["generated_tokens"] - before < 3000

    status, r = _post(url + "/update_weights_from_disk", {"model_path": str(other_dir), "weight_version": "v2"})
    assert status == 200 and r["success"] is True
    assert _get(url + "/get_weight_version")[1] == {"weight_version": "v2"}
    status, out = _post(url + "/generate", {"input_ids": PROMPTS[1], "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}})
    assert out["meta_info"]["weight_version"] == "v2"
    from transformers import AutoModelForCausalLM

    assert out["output_ids"] == _greedy_reference(AutoModelForCausalLM.from_pretrained(other_dir).eval(), PROMPTS[1], 6)
    status, r = _post(url + "/update_weights_from_disk", {"model_path": str(other_dir / "missing")})
    assert status == 400 and r["success"] is False and "missing" in r["message"]

    # SGLang's colocate routes: release (tags), refuse generation, resume, refill, generate.
    assert _post(url + "/release_memory_occupation", {"tags": ["kv_cache"]}) == (200, {"released": ["kv_cache"], "bytes": 0})
    status, err = _post(url + "/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}})
    assert status == 503 and "released" in err["error"]["message"]
    status, err = _post(url + "/release_memory_occupation", {"tags": ["bogus"]})
    assert status == 400 and "bogus" in err["error"]["message"]
    status, r = _post(url + "/release_memory_occupation", {})
    assert status == 200 and r["released"] == ["kv_cache", "weights"] and r["bytes"] > 0
    assert _post(url + "/resume_memory_occupation", {})[1]["released"] == []
    status, err = _post(url + "/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}})
    assert status == 503 and "not updated since" in err["error"]["message"]
    assert _post(url + "/update_weights_from_disk", {"model_path": str(other_dir), "weight_version": "v3"})[0] == 200
    status, out = _post(url + "/generate", {"input_ids": PROMPTS[1], "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}})
    assert status == 200 and out["output_ids"] == _greedy_reference(AutoModelForCausalLM.from_pretrained(other_dir).eval(), PROMPTS[1], 6)


# ---- config --------------------------------------------------------------------------------------------


def test_engine_arguments_and_choice(monkeypatch, caplog):
    import argparse
    import logging

    from slime.engines import config as cfg_mod

    parser = cfg_mod.add_cpu_engine_arguments(argparse.ArgumentParser())
    parser.add_argument("--hf-checkpoint")
    parser.add_argument("--rollout-seed", type=int, default=42)
    args = parser.parse_args(["--hf-checkpoint", str(TINY), "--rollout-engine", "cpu", "--cpu-engine-max-running-requests", "4"])
    cfg = EngineConfig.from_args(args)
    assert cfg.kind == "cpu" and cfg.max_running_requests == 4 and cfg.seed == 42 and cfg.host == "127.0.0.1"
    with pytest.raises(ValueError, match="--cpu-engine-max-running-requests"):
        EngineConfig.from_args(parser.parse_args(["--hf-checkpoint", "x", "--cpu-engine-max-running-requests", "0"]))
    with pytest.raises(ValueError, match="--hf-checkpoint"):
        EngineConfig.from_args(parser.parse_args([]))

    monkeypatch.setattr(cfg_mod, "_sglang_importable", lambda: False)
    with caplog.at_level(logging.INFO, logger="slime.engines.config"):
        assert cfg_mod.resolve_engine_kind("auto") == "cpu"
    assert "sglang is not installed" in caplog.text
    monkeypatch.setattr(cfg_mod, "_sglang_importable", lambda: True)
    monkeypatch.setattr(cfg_mod, "_cuda_available", lambda: True)
    assert cfg_mod.resolve_engine_kind("auto") == "sglang"
    assert cfg_mod.resolve_engine_kind("cpu") == "cpu"


# ---- Ray ---------------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_ray_actor_serves_generate_on_a_placement_group_bundle(other_dir):
    ray = pytest.importorskip("ray")
    from ray.util.placement_group import placement_group, remove_placement_group

    from slime.engines.ray_engine import bundle_resources, create_cpu_engine
    from slime.engines.weights import iter_hf_tensors

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        pg = placement_group([{"CPU": 1}], strategy="PACK")
        ray.get(pg.ready(), timeout=60)
        assert bundle_resources(pg, 0) == (1.0, 0.0)
        actor = create_cpu_engine(EngineConfig(model_path=str(TINY), num_threads=1), pg, 0)
        url = ray.get(actor.start.remote(), timeout=120)
        assert url.startswith("http://127.0.0.1:")
        sp = {"input_ids": PROMPTS[1], "sampling_params": {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}}
        status, r = _post(url + "/generate", sp)
        assert status == 200 and r["meta_info"]["completion_tokens"] == 5
        version = ray.get(actor.update_weights.remote(list(iter_hf_tensors(str(other_dir))), weight_version="rl-1"), timeout=60)
        status, r = _post(url + "/generate", sp)
        assert version == "rl-1" and r["meta_info"]["weight_version"] == "rl-1"
        ray.get(actor.shutdown.remote(), timeout=60)
        remove_placement_group(pg)
    finally:
        ray.shutdown()
